"""Operator latency and memory on the local control plane: apply N LoRAFineTunes at once, measure how long until
each has its Job and until its status says Running, and the operator's peak RSS.

    $(scripts/env.sh)/bin/python benchmarks/operator_latency.py --counts 1 100 500

Uses the same real control plane as the integration tests (hack/cluster/up.sh, kwok playing the kubelet of
20 CPU nodes), the operator as its own process, and CPU-only fine-tunes (1 pod each) so that every pod can be
placed. Job creation is on the create event; the Running phase is noticed by the reconcile timer (`--interval`,
default 10 s as in the chart) in the baseline arm, and also by watching the operator's Jobs in the candidate arm.
Writes benchmarks/results/operator_latency.json with the machine. The API server's own `create` latency is
reported too, as the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.conftest import GROUP, PLURAL, VERSION, Cluster, Operator  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def add_cpu_nodes(c: Cluster, count: int) -> None:
    for i in range(count):
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"cpu-node-{i}", "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"type": "kwok"}},
            "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110"},
                       "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110"}},
        }  # fmt: skip
        try:
            c.core.create_node(node)
        except Exception:  # noqa: BLE001 - already there from an earlier round
            pass


def run_round(c: Cluster, count: int, op: Operator) -> dict:
    names = [f"b{count}-{i}" for i in range(count)]
    body = lambda n: {  # noqa: E731
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAFineTune", "metadata": {"name": n},
        "spec": {"model": {"uri": "hf://org/model"}, "dataset": {"train": "file:///d/train.jsonl"},
                 "training": {"maxSteps": 10}, "resources": {"nodes": 1, "gpusPerNode": 0},
                 "output": {"uri": "file:///out"}},
    }  # fmt: skip
    applied, create_secs = {}, []
    peak = [rss_mib(op.proc.pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(rss_mib(op.proc.pid))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()

    def create(n: str) -> None:
        t0 = time.time()
        c.apply(body(n))
        applied[n] = t0
        create_secs.append(time.time() - t0)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, names))
    job_at, running_at = {}, {}
    deadline = time.time() + 900
    while (len(job_at) < count or len(running_at) < count) and time.time() < deadline:
        for job in c.batch.list_namespaced_job(c.ns).items:
            n = job.metadata.labels["lorafinetune.io/name"]
            job_at.setdefault(n, job.metadata.creation_timestamp.timestamp())
        for item in c.custom.list_namespaced_custom_object(GROUP, VERSION, c.ns, PLURAL)["items"]:
            if item.get("status", {}).get("phase") == "Running":
                running_at.setdefault(item["metadata"]["name"], time.time())
        time.sleep(0.5)
    stop.set()
    to_job = [job_at[n] - applied[n] for n in names if n in job_at]
    to_running = [running_at[n] - applied[n] for n in names if n in running_at]
    return {
        "resources": count,
        "jobsCreated": len(to_job),
        "running": len(to_running),
        "applyToJobSeconds": {"p50": round(statistics.median(to_job), 2), "p95": round(percentile(to_job, 0.95), 2)},
        "applyToRunningSeconds": {"p50": round(statistics.median(to_running), 2),
                                  "p95": round(percentile(to_running, 0.95), 2)},  # fmt: skip
        "baselineApiCreateSeconds": {"p50": round(statistics.median(create_secs), 3),
                                     "p95": round(percentile(create_secs, 0.95), 3)},  # fmt: skip
        "operatorPeakRssMiB": round(max(peak), 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 100, 500])
    ap.add_argument("--interval", type=float, default=10.0, help="reconcile timer in seconds (the default is 10)")
    args = ap.parse_args()
    name = f"lft-bench-{uuid.uuid4().hex[:4]}"
    work = Path(f"/tmp/{name}")
    env = {**os.environ, "LFT_CLUSTER_WORK": str(work)}
    up = subprocess.run([REPO / "hack/cluster/up.sh", name], env=env, capture_output=True, text=True, check=True)
    kubeconfig = Path(up.stdout.strip().splitlines()[-1])
    os.environ["LFT_BENCH"] = "1"
    from kubernetes import client

    # Baseline arm: the timer alone notices that pods run. Candidate: the operator also watches its Jobs.
    arms = {"timer only": "false", "timer + Job watch": "true"}
    results = []
    try:
        add_cpu_nodes(Cluster(kubeconfig, "default"), 20)
        for arm, watch in arms.items():
            op = Operator(kubeconfig, work / f"operator-{watch}.log", LFT_WATCH_JOBS=watch,
                          LFT_RECONCILE_INTERVAL_SECONDS=str(args.interval))  # fmt: skip
            op.start()
            namespaces = []
            try:
                for count in args.counts:
                    c = Cluster(kubeconfig, f"bench-{watch}-{count}")
                    c.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=c.ns)))
                    namespaces.append(c)
                    results.append({"arm": arm, **run_round(c, count, op)})
                    print(json.dumps(results[-1]), flush=True)
            finally:
                op.stop()
            if arm == list(arms)[-1]:
                break
            # The next arm starts on an empty cluster: an operator that starts with this arm's fine-tunes would
            # spend its first seconds resuming them.
            for c in namespaces:
                c.core.delete_namespace(c.ns)
            deadline = time.time() + 300
            while time.time() < deadline and any(
                n.metadata.name in {c.ns for c in namespaces} for n in c.core.list_namespace().items
            ):
                time.sleep(1)
    finally:
        subprocess.run([REPO / "hack/cluster/down.sh", name], env=env, capture_output=True)
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}; control plane and "
        "operator on the same machine",
        "reconcileIntervalSeconds": args.interval,
        "results": results,
    }
    path = REPO / "benchmarks/results/operator_latency.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
