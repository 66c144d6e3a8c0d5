"""The operator at scale on the local control plane: apply N LoRAFineTunes at once and measure how long until each
has its Job and until its status says Running, what the operator spends (CPU seconds, peak RSS, API requests), and
what N finished fine-tunes cost at rest.

    $(scripts/env.sh)/bin/python benchmarks/operator_latency.py --counts 1 100 500 1000 --baseline-ref cfa050e

Two arms in one run, each on a fresh cluster (hack/cluster/up.sh: real etcd, API server, controller-manager and
scheduler, kwok playing the kubelet of 20 CPU nodes): the operator of `--baseline-ref` (checked out into a temporary
git worktree; default: the commit before the operator read from caches; or `floor`: benchmarks/floor_controller.py,
the least any controller must do, in the operator's place) and the operator of this checkout, baseline first, or in
the `--order` given (`abba`: each twice, neither always first, for changes smaller than one run's noise). CPU-only
fine-tunes (1 pod each), so every pod can be placed. Apply -> Job is timed by a watch on Jobs, apply -> Running by a
watch on the fine-tunes, each in a process of its own (local clock). After the last round all pods are finished
(Succeeded) and the operator's API requests are counted for `--rest-seconds` with every fine-tune finished. Writes
benchmarks/results/operator_latency.json with the machine. Everything shares the machine's cores: say so with the
numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.conftest import GROUP, PLURAL, SHARED_CLAIM, VERSION, Cluster, Operator  # noqa: E402

BASELINE_REF = "cfa050e"  # reconciles with reads per reconcile, kopf change handlers, a per-resource timer
NAMESPACE = "bench"
FLOOR = "floor"  # --baseline-ref floor: benchmarks/floor_controller.py in the operator's place
FLOOR_KOPF = "floor-kopf"  # the same, receiving the fine-tunes from kopf as the operator does


class FloorController(Operator):
    """benchmarks/floor_controller.py, started and read like the operator: the least any controller must do."""

    def start(self) -> None:
        workers = self.env.get("LFT_WORKERS", "32")
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "benchmarks/floor_controller.py"), "--namespace", NAMESPACE,
             "--metrics-port", str(self.metrics_port), "--workers", workers,
             *(["--via-kopf"] if self.env.get("VIA_KOPF") else [])],
            env={**os.environ, "KUBECONFIG": str(self.kubeconfig), "LFT_DEFAULT_IMAGE": "lorafinetune:test",
                 "PYTHONPATH": str(REPO)},
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.time() + 60
        while time.time() < deadline and self.proc.poll() is None:
            try:
                self.metrics()
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the floor controller did not start:\n{self.log.read_text()[-3000:]}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(statistics.median(values), 2), "p95": round(percentile(values, 0.95), 2)} if values else {}


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_by_process(cluster: str, operator_pid: int) -> dict[str, float]:
    """CPU seconds so far of each process sharing the machine in this benchmark: the cluster's (etcd, API server,
    controller-manager, scheduler, kwok: their command lines name the cluster), the operator, and this client."""
    seconds = {"operator": cpu_seconds(operator_pid), "benchmark client": cpu_seconds(os.getpid())}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and cluster in (proc / "cmdline").read_text():
                name = (proc / "comm").read_text().strip()
                seconds[name] = seconds.get(name, 0.0) + cpu_seconds(int(proc.name))
        except OSError:  # a process that ended meanwhile
            continue
    return seconds


def api_requests(op: Operator) -> dict[str, float]:
    """The operator's own request counter by verb (what kopf itself sends is not in it)."""
    counts: dict[str, float] = {}
    for line in op.metrics().splitlines():
        if line.startswith("lorafinetune_operator_api_requests_total{"):
            verb = line.split('verb="', 1)[1].split('"', 1)[0]
            counts[verb] = counts.get(verb, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def terminated_watchers(c: Cluster) -> dict[str, float]:
    """The API server's count of watchers it closed because they did not take events fast enough, by resource
    (`apiserver_terminated_watchers_total`): its watch cache waits for such a watcher, up to a budget, before
    dispatching the next event to any watcher of that resource."""
    body = c.api.call_api("/metrics", "GET", _preload_content=False, auth_settings=["BearerToken"]).data.decode()
    counts: dict[str, float] = {}
    for line in body.splitlines():
        if line.startswith("apiserver_terminated_watchers_total{"):
            resource = line.split('resource="', 1)[1].split('"', 1)[0]
            counts[resource] = counts.get(resource, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def gauge(op: Operator, name: str) -> float:
    """A gauge of the operator's without labels; 0 if it has none of that name."""
    return next((float(line.rsplit(" ", 1)[1]) for line in op.metrics().splitlines()
                 if line.startswith(f"{name} ")), 0.0)  # fmt: skip


def histogram(op: Operator, name: str, *labels: str) -> dict[float, float]:
    """Cumulative bucket counts {upper bound: count} of one of the operator's histograms, summed over the series
    that have all of `labels` (e.g. 'handler="change"'; none: every series), and their sum of observations under the
    key -1."""
    buckets: dict[float, float] = {}
    for line in op.metrics().splitlines():
        if not all(label in line for label in labels):
            continue
        if line.startswith(f"{name}_bucket{{"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            key = float("inf") if bound == "+Inf" else float(bound)
        elif line.startswith(f"{name}_sum"):
            key = -1.0
        else:
            continue
        buckets[key] = buckets.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict[str, float | str]:
    """The mean, p50 and p95 of what a histogram observed between two readings; the quantiles as the upper bound of
    the bucket that holds them (so "<= 0.25"): a bucketed histogram knows no more."""
    counts = {b: n - before.get(b, 0) for b, n in sorted(after.items())}
    total, observed = counts.pop(float("inf"), 0), counts.pop(-1.0, 0.0)
    if not total:
        return {}
    def at(q: float) -> float | str:
        return next((b for b, n in counts.items() if n >= q * total), "> " + str(max(counts)))
    return {"count": int(total), "mean": round(observed / total, 3), "p50AtMost": at(0.5), "p95AtMost": at(0.95)}


# The operator's histograms a round reads, by the name in the results: where apply -> Job goes.
TIMINGS = {
    # from the operator's first watch event of a fine-tune to its Job created; apply -> Job less this is the API
    # server's delivery of the fine-tune to the operator and of the Job to this client's watch
    "operatorFirstJobSeconds": ("lorafinetune_operator_first_job_seconds",),
    # from an attempt's Job created to the attempt written in its status (held while a burst of new ones waits)
    "operatorAttemptRecordedSeconds": ("lorafinetune_operator_attempt_recorded_seconds",),
    "operatorQueueWaitNewSeconds": ("lorafinetune_operator_queue_wait_seconds", 'lane="new"'),
    "operatorQueueWaitOtherSeconds": ("lorafinetune_operator_queue_wait_seconds", 'lane="other"'),
    "operatorChangeReconcileSeconds": ("lorafinetune_operator_reconcile_duration_seconds", 'handler="change"'),
    "apiCreateNetworkPolicySeconds": ("lorafinetune_operator_api_request_duration_seconds", 'verb="create"',
                                      'resource="networkpolicies"'),
    "apiCreateJobSeconds": ("lorafinetune_operator_api_request_duration_seconds", 'verb="create"',
                            'resource="jobs"'),
    "apiPatchStatusSeconds": ("lorafinetune_operator_api_request_duration_seconds", 'verb="patch"'),
    "apiCreateEventSeconds": ("lorafinetune_operator_api_request_duration_seconds", 'verb="create"',
                              'resource="events"'),
}


def add_cpu_nodes(c: Cluster, count: int) -> None:
    for i in range(count):
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": f"cpu-node-{i}", "annotations": {"kwok.x-k8s.io/node": "fake"},
                         "labels": {"type": "kwok"}},
            "status": {"allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110"},
                       "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110"}},
        }  # fmt: skip
        c.core.create_node(node)


def _watch(kind: str, kubeconfig: str, namespace: str, seen: Queue) -> None:
    """A watch in a process of its own, reporting (what, fine-tune, local time) as events arrive: in the benchmark's
    process its thread shared the GIL with the 16 threads applying, and an event that waited for it counted as the
    operator's time (one round saw the fine-tunes' own events 3 s after their apply, later than their Jobs)."""
    from kubernetes import client, config, watch

    api = config.new_client_from_config(kubeconfig)
    while True:
        # No timeout_seconds: the client then resumes each watch from the last version it saw, where a new watch
        # would begin with a list (a Job created meanwhile came late, counted as the operator's time)
        try:
            if kind == "jobs":
                # Plain JSON: the client's V1Job models cost milliseconds per event
                stream = watch.Watch().stream(client.BatchV1Api(api).list_namespaced_job, namespace,
                                              deserialize=False)  # fmt: skip
            else:
                stream = watch.Watch().stream(client.CustomObjectsApi(api).list_namespaced_custom_object, GROUP,
                                              VERSION, namespace, PLURAL)  # fmt: skip
            for event in stream:
                meta, now = event["object"]["metadata"], time.time()
                if kind == "jobs":
                    seen.put(("job", meta["labels"].get("lorafinetune.io/name"), now))
                    continue
                seen.put(("seen", meta["name"], now))
                if (phase := (event["object"].get("status") or {}).get("phase")) in ("Running", "Succeeded"):
                    seen.put((phase, meta["name"], now))
        except Exception:  # noqa: BLE001 - a watch cut short: again
            time.sleep(1)


class Watcher:
    """When each fine-tune's Job appeared, when the fine-tune was first seen and first Running, by the local clock,
    from two watches in processes of their own."""

    def __init__(self, c: Cluster, kubeconfig: Path) -> None:
        self.seen_at: dict[str, float] = {}
        self.job_at: dict[str, float] = {}
        self.running_at: dict[str, float] = {}
        self.succeeded: set[str] = set()
        spawn = multiprocessing.get_context("spawn")
        self._seen: Queue = spawn.Queue()
        self._procs = [spawn.Process(target=_watch, args=(kind, str(kubeconfig), c.ns, self._seen), daemon=True)
                       for kind in ("jobs", "lorafinetunes")]  # fmt: skip
        for proc in self._procs:
            proc.start()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        while (item := self._seen.get()) is not None:
            what, name, at = item
            if what == "Succeeded":
                self.succeeded.add(name)
            else:
                {"job": self.job_at, "seen": self.seen_at, "Running": self.running_at}[what].setdefault(name, at)

    def stop(self) -> None:
        for proc in self._procs:
            proc.terminate()
        self._seen.put(None)


def run_round(c: Cluster, count: int, op: Operator, watcher: Watcher, cluster: str) -> dict:
    names = [f"b{count}-{i}" for i in range(count)]
    while any(n in watcher.job_at for n in names[:1]):  # the same count again (--counts 500 500): new names
        names = [f"{n}x" for n in names]
    body = lambda n: {  # noqa: E731
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAFineTune", "metadata": {"name": n},
        "spec": {"model": {"uri": "hf://org/model"}, "dataset": {"train": f"pvc://{SHARED_CLAIM}/d/train.jsonl"},
                 "training": {"maxSteps": 10}, "resources": {"nodes": 1, "gpusPerNode": 0},
                 "output": {"uri": f"pvc://{SHARED_CLAIM}/out/{n}"}},
    }  # fmt: skip
    applied, create_secs = {}, []
    peak, stop = [rss_mib(op.proc.pid)], threading.Event()
    cpu_at: list[tuple[float, float]] = []  # (time, the operator's CPU seconds so far)

    def sample() -> None:
        while not stop.is_set() and op.proc.poll() is None:
            peak.append(rss_mib(op.proc.pid))
            cpu_at.append((time.time(), cpu_seconds(op.proc.pid)))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    cpu0, requests0 = cpu_seconds(op.proc.pid), api_requests(op)
    shares0, terminated0 = cpu_by_process(cluster, op.proc.pid), terminated_watchers(c)
    timings0 = {field: histogram(op, *metric) for field, metric in TIMINGS.items()}

    def create(n: str) -> None:
        t0 = time.time()
        c.apply(body(n))
        applied[n] = t0
        create_secs.append(time.time() - t0)

    started = time.time()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, names))
    deadline = time.time() + 1200
    while time.time() < deadline and not all(n in watcher.running_at for n in names):
        time.sleep(0.5)
    elapsed = time.time() - started
    stop.set()
    requests1 = api_requests(op)
    shares1, terminated1 = cpu_by_process(cluster, op.proc.pid), terminated_watchers(c)
    to_job = [watcher.job_at[n] - applied[n] for n in names if n in watcher.job_at]
    to_seen = [watcher.seen_at[n] - applied[n] for n in names if n in watcher.seen_at]
    last_job = max((watcher.job_at[n] for n in names if n in watcher.job_at), default=started)
    in_burst = [(t, cpu) for t, cpu in cpu_at if started <= t <= last_job]
    to_running = [watcher.running_at[n] - applied[n] for n in names if n in watcher.running_at]
    return {
        "resources": count,
        "jobsCreated": len(to_job),
        "running": len(to_running),
        "applyToJobSeconds": summary(to_job),
        # the API server's delivery of a new fine-tune to a watch (this client's, which does nothing else)
        "applyToWatchSeconds": summary(to_seen),
        "applyToRunningSeconds": summary(to_running),
        "apiCreateSeconds": summary(create_secs),
        "operatorCpuSeconds": round(cpu_seconds(op.proc.pid) - cpu0, 1),
        # the operator's share of one core from the first apply to the last Job: near 1, its own CPU (one GIL) is
        # what the burst waits for
        "operatorCpuShareToLastJob": round((in_burst[-1][1] - in_burst[0][1]) / (in_burst[-1][0] - in_burst[0][0]), 2)
        if len(in_burst) > 1 else None,
        "operatorPeakRssMiB": round(max(peak), 1),
        "operatorApiRequests": {v: int(n - requests0.get(v, 0)) for v, n in sorted(requests1.items())
                                if n - requests0.get(v, 0)},  # fmt: skip
        # Where apply -> Job goes inside the operator (an operator without a histogram, the floor: {}).
        **{field: bucket_quantiles(timings0[field], histogram(op, *metric)) for field, metric in TIMINGS.items()},
        "roundSeconds": round(elapsed, 1),
        # Watchers the API server closed for reading too slowly (each held up the others first)
        "terminatedWatchers": {r: int(n - terminated0.get(r, 0)) for r, n in terminated1.items()
                               if n - terminated0.get(r, 0)},  # fmt: skip
        # Who used the machine's CPUs during the round: is the operator the bottleneck, or the control plane?
        "cpuSecondsByProcess": {name: round(shares1[name] - shares0.get(name, 0.0), 1)
                                for name in sorted(shares1, key=lambda n: shares0.get(n, 0.0) - shares1[n])},
    }


def at_rest(c: Cluster, op: Operator, watcher: Watcher, total: int, seconds: float) -> dict:
    """Finish every pod, wait until every fine-tune is Succeeded, then count the operator's requests at rest."""
    pods = c.core.list_namespaced_pod(c.ns).items
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda pod: c.core.patch_namespaced_pod(pod.metadata.name, c.ns, {"metadata": {"annotations": {
            "test.lorafinetune.io/outcome": "Succeeded"}}}), pods))  # fmt: skip
    deadline = time.time() + 900
    while time.time() < deadline and len(watcher.succeeded) < total:
        time.sleep(1)
    time.sleep(15)  # the last status patches settle
    # and the events still queued behind the pace are posted (an operator without the gauge: none are)
    while time.time() < deadline and gauge(op, "lorafinetune_operator_events_pending") > 0:
        time.sleep(1)
    before, cpu0 = api_requests(op), cpu_seconds(op.proc.pid)
    time.sleep(seconds)
    after = api_requests(op)
    return {
        "finished": len(watcher.succeeded),
        "seconds": seconds,
        "apiRequestsPerSecond": round((sum(after.values()) - sum(before.values())) / seconds, 2),
        "byVerb": {v: int(n - before.get(v, 0)) for v, n in sorted(after.items()) if n - before.get(v, 0)},
        "operatorCpuSecondsPerMinute": round((cpu_seconds(op.proc.pid) - cpu0) * 60 / seconds, 2),
        "operatorRssMiB": round(rss_mib(op.proc.pid), 1),
    }


# The chart's: the tests' operator reads progress every second, which with 1,500 kwok pods running is the
# benchmark measuring 1,500 failed connections a second
PROGRESS_INTERVAL = 15.0

def run_arm(arm: str, repo: Path, counts: list[int], interval: float, rest_seconds: float,
            operator_env: dict[str, str]) -> dict:  # fmt: skip
    from kubernetes import client

    name = f"lft-bench-{uuid.uuid4().hex[:4]}"
    work = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    env = {**os.environ, "LFT_CLUSTER_WORK": str(work)}
    up = subprocess.run([REPO / "hack/cluster/up.sh", name], env=env, capture_output=True, text=True, check=True)
    kubeconfig = Path(up.stdout.strip().splitlines()[-1])
    rounds: list[dict] = []
    try:
        add_cpu_nodes(Cluster(kubeconfig, "default"), 20)
        c = Cluster(kubeconfig, NAMESPACE)
        c.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=c.ns)))
        c.bind_claim(SHARED_CLAIM)
        watcher = Watcher(c, kubeconfig)
        kind = FloorController if arm in (FLOOR, FLOOR_KOPF) else Operator
        operator_env = {**operator_env, "VIA_KOPF": "1"} if arm == FLOOR_KOPF else operator_env
        op = kind(kubeconfig, work / "operator.log", repo=repo,
                  **{"LFT_RECONCILE_INTERVAL_SECONDS": str(interval),
                     "LFT_PROGRESS_INTERVAL_SECONDS": str(PROGRESS_INTERVAL), **operator_env})  # fmt: skip
        op.start()
        try:
            for count in counts:
                rounds.append({"arm": arm, **run_round(c, count, op, watcher, name)})
                print(json.dumps(rounds[-1]), flush=True)
            rest = at_rest(c, op, watcher, sum(counts), rest_seconds) if rest_seconds > 0 else None
            print(json.dumps({"arm": arm, "atRest": rest}), flush=True)
        finally:
            watcher.stop()
            op.stop()
    finally:
        subprocess.run([REPO / "hack/cluster/down.sh", name], env=env, capture_output=True)
    return {"arm": arm, "operatorEnv": operator_env, "rounds": rounds, "atRest": rest}


ORDERS = {"ab", "ba", "abba", "baab"}


@contextlib.contextmanager
def baseline_checkout(ref: str, needed: bool) -> Iterator[Path]:
    """The baseline operator's code: a temporary worktree of `ref` (the floor runs from this checkout)."""
    if not needed or ref in (FLOOR, FLOOR_KOPF):
        yield REPO
        return
    baseline = Path(tempfile.mkdtemp(prefix="lft-baseline-"))
    subprocess.run(["git", "worktree", "add", "--detach", str(baseline), ref], cwd=REPO, check=True,
                   capture_output=True)  # fmt: skip
    try:
        yield baseline
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(baseline)], cwd=REPO, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 100, 500, 1000])
    ap.add_argument("--interval", type=float, default=10.0, help="reconcile interval in seconds (the chart's: 10)")
    ap.add_argument("--baseline-ref", default=BASELINE_REF,
                    help=f"git commit of the baseline operator, or {FLOOR!r}: benchmarks/floor_controller.py (the "
                    "least any controller must do: the Job, and two status patches) on the same control plane, or "
                    f"{FLOOR_KOPF!r}: the same receiving the fine-tunes from kopf")
    ap.add_argument("--rest-seconds", type=float, default=60.0,
                    help="how long to count requests at rest; 0: no rest phase (finishing every run and posting the "
                    "events still paced takes minutes), for runs that compare bursts only")
    ap.add_argument("--no-baseline", action="store_true",
                    help="this checkout only: to re-measure it against the baseline numbers of an earlier run")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/operator_latency.json")
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="operator settings for this checkout's arm, e.g. LFT_WORKERS=32")
    ap.add_argument("--baseline-env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="operator settings for the baseline arm (with --baseline-ref HEAD: a setting side by side)")
    ap.add_argument("--order", default="ab", choices=sorted(ORDERS),
                    help="the arms' order, a the baseline and b this checkout: abba runs each twice, so that neither "
                    "always goes first (the same code's two arms of one run differed by up to 0.7 s at p95)")
    args = ap.parse_args()
    for flag, pairs in (("--env", args.env), ("--baseline-env", args.baseline_env)):
        if any("=" not in p for p in pairs):
            ap.error(f"{flag} takes KEY=VALUE pairs, got {pairs}")
    this_env, baseline_env = (dict(p.split("=", 1) for p in pairs) for pairs in (args.env, args.baseline_env))
    os.environ["LFT_BENCH"] = "1"
    order = "b" if args.no_baseline else args.order
    floor = args.baseline_ref in (FLOOR, FLOOR_KOPF)
    baseline_label = args.baseline_ref if floor else f"baseline {args.baseline_ref}"
    arms = []
    with baseline_checkout(args.baseline_ref, needed="a" in order) as baseline:
        for position, which in enumerate(order, 1):
            if which == "a":
                arm = run_arm(baseline_label, baseline, args.counts, args.interval, args.rest_seconds, baseline_env)
            else:
                arm = run_arm("this checkout", REPO, args.counts, args.interval, args.rest_seconds, this_env)
            arms.append({**arm, "position": position})
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    out = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; etcd, the API "
        "server, controller-manager, scheduler, kwok, the operator and this client share those CPUs",
        "commit": head.stdout.strip(),
        "reconcileIntervalSeconds": args.interval,
        "progressIntervalSeconds": PROGRESS_INTERVAL,
        "arms": arms,
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
