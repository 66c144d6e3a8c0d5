"""The floor under the operator's latency on a given control plane: the least a controller must do for a
LoRAFineTune, and nothing else. `operator_latency.py --floor` runs it in the operator's place.

For each new fine-tune it parses the spec and creates the Job the operator would create (`builders.build_job`, so
the API server stores the same object and kwok starts the same pod), then patches the fine-tune's status phase to
Running and to Succeeded as its pod gets there. No NetworkPolicy, events, preflight checks, conditions, retries,
leader election or informer caches; the same Python Kubernetes client with one shared connection pool, and as many
workers as the operator. Whatever the operator's apply -> Job takes beyond this process's is the operator's own
cost; what this process takes is the control plane's (and the client library's) on this machine.

    python benchmarks/floor_controller.py --namespace bench --metrics-port 9100 --workers 32   # KUBECONFIG set

`--via-kopf` receives the fine-tunes as the operator does, from a kopf event handler (cluster-wide, standalone, kopf's
own events off), instead of its own watch: the difference between the two is what kopf's event delivery costs.
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import asyncio  # noqa: E402
import logging  # noqa: E402
from typing import Any  # noqa: E402

import kopf  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402
from prometheus_client import Counter, start_http_server  # noqa: E402

from lorafinetune.api.base import CLUSTER  # noqa: E402
from lorafinetune.api.manifest import GROUP, PLURAL, VERSION  # noqa: E402
from lorafinetune.api.spec import LoRAFineTuneSpec  # noqa: E402
from lorafinetune.operator import builders  # noqa: E402
from lorafinetune.operator.settings import OperatorSettings  # noqa: E402

# The operator's metric name, so that the benchmark reads both processes' request counts the same way.
REQUESTS = Counter("lorafinetune_operator_api_requests", "API requests sent", ["verb", "resource"])


class Floor:
    def __init__(self, namespace: str, workers: int) -> None:
        configuration = client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = workers + 2
        self.api = client.ApiClient(configuration)
        self.namespace, self.settings = namespace, OperatorSettings.from_env()
        self.work: queue.Queue[tuple[str, dict | str]] = queue.Queue()
        self.phase: dict[str, str] = {}  # the phase each fine-tune was patched to: each phase is written once
        self.phase_guard = threading.Lock()
        for _ in range(workers):
            threading.Thread(target=self._worker, daemon=True).start()

    def watch_fine_tunes(self) -> None:
        custom = client.CustomObjectsApi(self.api)
        while True:
            stream = watch.Watch().stream(custom.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                                          timeout_seconds=300, deserialize=False)  # fmt: skip
            for event in stream:
                obj = event["object"]
                if event["type"] == "ADDED" and not obj.get("status"):
                    self.work.put(("create", obj))

    def watch_pods(self) -> None:
        core = client.CoreV1Api(self.api)
        while True:
            stream = watch.Watch().stream(core.list_namespaced_pod, self.namespace, label_selector=builders.LABEL_NAME,
                                          timeout_seconds=300, deserialize=False)  # fmt: skip
            for event in stream:
                pod = event["object"]
                phase = pod.get("status", {}).get("phase")
                if phase in ("Running", "Succeeded"):
                    self.work.put((phase, pod["metadata"]["labels"][builders.LABEL_NAME]))

    def _first(self, name: str, phase: str) -> bool:
        """Whether this phase is news for this fine-tune (a pod's watch repeats Running with every change)."""
        with self.phase_guard:
            if self.phase.get(name) == phase or (phase == "Running" and name in self.phase):
                return False
            self.phase[name] = phase
            return True

    def _worker(self) -> None:
        batch, custom = client.BatchV1Api(self.api), client.CustomObjectsApi(self.api)
        while True:
            kind, item = self.work.get()
            try:
                if kind == "create":
                    assert isinstance(item, dict)
                    meta = item["metadata"]
                    owner = builders.Owner(meta["name"], meta["namespace"], meta["uid"])
                    spec = LoRAFineTuneSpec.model_validate(item["spec"], context={CLUSTER: True})
                    REQUESTS.labels("create", "jobs").inc()
                    batch.create_namespaced_job(self.namespace, builders.build_job(owner, spec, 1, self.settings),
                                                _preload_content=False)  # fmt: skip
                elif self._first(str(item), kind):
                    REQUESTS.labels("patch", f"{PLURAL}/status").inc()
                    custom.patch_namespaced_custom_object_status(GROUP, VERSION, self.namespace, PLURAL, str(item),
                                                                 {"status": {"phase": kind}}, _preload_content=False)
            except Exception as err:  # noqa: BLE001 - a benchmark stand-in: say so and go on
                print(f"{kind} {item if isinstance(item, str) else item['metadata']['name']}: {err}", flush=True)


def via_kopf(floor: Floor) -> None:
    @kopf.on.startup()
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:  # as the operator's (handlers.configure)
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 60
        settings.scanning.disabled = True

    @kopf.on.event(GROUP, VERSION, PLURAL)
    async def on_fine_tune(event: kopf.RawEvent, **_: Any) -> None:
        if event["type"] in (None, "ADDED") and not event["object"].get("status"):
            floor.work.put(("create", dict(event["object"])))

    asyncio.run(kopf.operator(standalone=True, clusterwide=True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--metrics-port", type=int, required=True)
    ap.add_argument("--workers", type=int, default=32)
    ap.add_argument("--via-kopf", action="store_true", help="receive the fine-tunes from kopf, as the operator does")
    args = ap.parse_args()
    config.load_kube_config()
    floor = Floor(args.namespace, args.workers)
    threading.Thread(target=floor.watch_pods, daemon=True).start()
    start_http_server(args.metrics_port, addr="127.0.0.1")  # after the workers: answering means ready
    if args.via_kopf:
        via_kopf(floor)
    else:
        floor.watch_fine_tunes()


if __name__ == "__main__":
    main()
