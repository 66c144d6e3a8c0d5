"""A real control plane for the whole session (etcd, kube-apiserver, controller-manager, scheduler; kwok as the
kubelet of two fake 8-GPU nodes), the operator running against it as a separate process, and helpers.

Pods never run anything: kwok marks them Running, and a test decides how each ends by annotating it
(`finish_pods`), the way envtest-based operator tests write child status themselves.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, free_port, wait_for
from tests.manifests import SHARED_CLAIM

GROUP, VERSION, PLURAL = "lorafinetune.io", "v1alpha1", "lorafinetunes"


# config.json of the models the operator tests name, as a stand-in Hugging Face Hub serves them (LFT_HUB_ENDPOINT): the
# operator reads them to check that a run fits in the nodes' GPU memory (lorafinetune/operator/fit.py).
HUB_CONFIGS = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": {  # the published config's shape
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "meta-llama/Llama-3.1-70B": {  # the published shape of a model no 80 GB GPU holds unsharded
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
}  # fmt: skip
_hub: list[str] = []


def hub_endpoint() -> str:
    """Start (once) a local HTTP server answering /<repo>/resolve/<revision>/config.json as the Hub does."""
    if _hub:
        return _hub[0]
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Hub(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            repo, sep, _ = self.path.lstrip("/").partition("/resolve/")
            body = json.dumps(HUB_CONFIGS[repo]).encode() if sep and repo in HUB_CONFIGS else None
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _hub.append(f"http://127.0.0.1:{server.server_port}")
    return _hub[0]


@contextlib.contextmanager
def local_cluster(work: Path, apply_crd: bool = True, real_node: bool = False) -> Iterator[Path]:
    """Start a control plane with hack/cluster/up.sh (and a real node beside the kwok ones); yield its kubeconfig;
    stop it on exit."""
    name = f"lft-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "LFT_CLUSTER_WORK": str(work), "LFT_APPLY_CRD": "1" if apply_crd else "0",
           "LFT_REAL_NODE": "1" if real_node else "0"}  # fmt: skip
    up = subprocess.run([REPO / "hack/cluster/up.sh", name], env=env, capture_output=True, text=True, timeout=3600)
    try:
        if up.returncode != 0:
            pytest.fail(f"the test cluster did not start:\n{up.stderr[-4000:]}")
        yield Path(up.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run([REPO / "hack/cluster/down.sh", name], env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def kubeconfig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with local_cluster(tmp_path_factory.mktemp("cluster")) as path:
        yield path


class Operator:
    """The operator as its own process, restartable (to test convergence after a crash)."""

    def __init__(self, kubeconfig: Path, log: Path, repo: Path = REPO, **env: str):
        """`repo`: the checkout whose operator runs (benchmarks compare an older one)."""
        self.kubeconfig, self.log, self.env, self.repo = kubeconfig, log, env, repo
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        liveness = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "LFT_RECONCILE_INTERVAL_SECONDS": "1",
            "LFT_BACKOFF_BASE_SECONDS": "2",
            "LFT_BACKOFF_CAP_SECONDS": "4",
            "LFT_PROGRESS_INTERVAL_SECONDS": "1",
            "LFT_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "LFT_LIVENESS_PORT": str(liveness),
            "LFT_DEFAULT_IMAGE": "lorafinetune:test",
            "LFT_SECRET_PREFLIGHT": "true",  # tested here; the chart's RBAC (tests/integration/test_chart.py) omits it
            # kwok ignores grace periods; these make a pod Terminating 15 s after its deletion count as lost
            "LFT_TERMINATION_GRACE_SECONDS": "5",
            "LFT_LOST_POD_SECONDS": "10",
            "LFT_HUB_ENDPOINT": hub_endpoint(),
            **self.env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lorafinetune.operator"], cwd=self.repo, env={**env, "PYTHONPATH": str(self.repo)},
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.5)
        pytest.fail(f"the operator did not become live:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # a crash, not a graceful stop
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()


@pytest.fixture(scope="session")
def operator(kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    op = Operator(kubeconfig, tmp_path_factory.mktemp("operator") / "operator.log")
    op.start()
    try:
        yield op
    finally:
        op.stop()


class Cluster:
    """Thin helpers over the official client, bound to one test namespace."""

    def __init__(self, kubeconfig: Path, namespace: str):
        from kubernetes import client, config

        self.api = config.new_client_from_config(str(kubeconfig))
        self.core, self.batch = client.CoreV1Api(self.api), client.BatchV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self.ns = namespace

    def apply(self, manifest: dict[str, Any]) -> dict:
        return self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.ns, PLURAL, manifest, field_validation="Strict"
        )

    def get(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def patch_spec(self, name: str, spec: dict) -> dict:
        return self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name, {"spec": spec})

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.ns, PLURAL, name)

    def bind_claim(self, claim: str) -> None:
        """A PersistentVolumeClaim bound to a hostPath volume (kwok clusters have no provisioner, and pods that want
        an unbound claim stay Unschedulable)."""
        self.core.create_persistent_volume({
            "metadata": {"name": f"{self.ns}-{claim}"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                     "hostPath": {"path": f"/tmp/lft-{self.ns}-{claim}"},
                     "claimRef": {"namespace": self.ns, "name": claim}},
        })  # fmt: skip
        self.core.create_namespaced_persistent_volume_claim(self.ns, {
            "metadata": {"name": claim},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"{self.ns}-{claim}",
                     "resources": {"requests": {"storage": "1Gi"}}},
        })  # fmt: skip

    def jobs(self, name: str) -> list:
        return self.batch.list_namespaced_job(self.ns, label_selector=f"lorafinetune.io/name={name}").items

    def pods(self, name: str, attempt: int) -> list:
        selector = f"lorafinetune.io/name={name},lorafinetune.io/attempt={attempt}"
        return self.core.list_namespaced_pod(self.ns, label_selector=selector).items

    def events(self, name: str) -> list:
        return [e for e in self.core.list_namespaced_event(self.ns).items if e.involved_object.name == name]

    def finish_pods(self, name: str, attempt: int, outcome: str, only: int | None = None, **details: str) -> None:
        """Make kwok end the attempt's pods: outcome Succeeded or Failed (exit-code, reason, message)."""
        annotations = {"test.lorafinetune.io/outcome": outcome}
        annotations.update({f"test.lorafinetune.io/{k.replace('_', '-')}": v for k, v in details.items()})
        pods = sorted(self.pods(name, attempt), key=lambda p: p.metadata.name)
        for pod in pods if only is None else pods[only : only + 1]:
            self.core.patch_namespaced_pod(pod.metadata.name, self.ns, {"metadata": {"annotations": annotations}})


def phase(c: Cluster, name: str) -> str | None:
    return c.get(name).get("status", {}).get("phase")


def wait_phase(c: Cluster, name: str, expected: str, timeout: float = 60) -> dict:
    return wait_for(lambda: (s := c.get(name).get("status", {})).get("phase") == expected and s, timeout,
                    f"{name} to be {expected}")  # fmt: skip


def condition(status: dict, ctype: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == ctype)


@pytest.fixture
def cluster(kubeconfig: Path, operator: Operator) -> Iterator[Cluster]:
    from kubernetes import client

    ns = f"t-{uuid.uuid4().hex[:8]}"
    c = Cluster(kubeconfig, ns)
    c.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    c.bind_claim(SHARED_CLAIM)
    try:
        yield c
    finally:
        c.core.delete_namespace(ns)
        c.core.delete_persistent_volume(f"{ns}-{SHARED_CLAIM}")
