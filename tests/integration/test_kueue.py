"""Gang admission by a real Kueue (built from Go modules, hack/kueue/) on the test cluster's two 8-GPU kwok nodes:
runPolicy.queueName makes each attempt a Workload that Kueue admits whole or not at all, and a Kueue preemption is a
disruption of the run, not a failure."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from tests.conftest import REPO, wait_for
from tests.integration.conftest import Cluster, condition, phase, wait_phase
from tests.manifests import CLUSTER_RUN, manifest

KUEUE = ("kueue.x-k8s.io", "v1beta2")


@pytest.fixture(scope="module")
def kueue(kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Kueue for this module only: while it runs, its webhooks see every Job created in the cluster."""
    tools = subprocess.run([REPO / "hack/cluster/build.sh"], capture_output=True, text=True, check=True)
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LFT_KUEUE_WORK": str(tmp_path_factory.mktemp("kueue")),
           "PYTHON": sys.executable, "PATH": f"{tools.stdout.strip()}:{os.environ['PATH']}"}  # fmt: skip
    up = subprocess.run([REPO / "hack/kueue/up.sh"], env=env, capture_output=True, text=True, timeout=1800)
    try:
        if up.returncode != 0:
            pytest.fail(f"Kueue did not start:\n{up.stderr[-4000:]}")
        yield
    finally:
        subprocess.run([REPO / "hack/kueue/down.sh"], env=env, capture_output=True, timeout=120)


def _queues(c: Cluster, gpus: int) -> str:
    """A ResourceFlavor, a ClusterQueue of `gpus` GPUs that preempts lower priorities, this namespace's LocalQueue
    `gpu`, and the priorities `routine` and `urgent`. Returns the ClusterQueue's name."""
    api = client.CustomObjectsApi(c.api)
    group, version = KUEUE
    cq = f"gpus-{c.ns}"
    cluster_scoped = [
        ("resourceflavors", {"metadata": {"name": cq}, "spec": {"nodeLabels": {"nvidia.com/gpu.product": "H100-SXM"}}}),
        ("clusterqueues", {"metadata": {"name": cq}, "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": c.ns}},
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [{"coveredResources": ["nvidia.com/gpu"], "flavors": [
                {"name": cq, "resources": [{"name": "nvidia.com/gpu", "nominalQuota": str(gpus)}]}]}]}}),
        ("workloadpriorityclasses", {"metadata": {"name": f"routine-{c.ns}"}, "value": 100}),
        ("workloadpriorityclasses", {"metadata": {"name": f"urgent-{c.ns}"}, "value": 1000}),
    ]  # fmt: skip
    kinds = {"resourceflavors": "ResourceFlavor", "clusterqueues": "ClusterQueue",
             "workloadpriorityclasses": "WorkloadPriorityClass"}  # fmt: skip
    for plural, body in cluster_scoped:
        api.create_cluster_custom_object(group, version, plural,
                                         {"apiVersion": f"{group}/{version}", "kind": kinds[plural], **body})
    api.create_namespaced_custom_object(group, version, c.ns, "localqueues", {
        "apiVersion": f"{group}/{version}", "kind": "LocalQueue", "metadata": {"name": "gpu"},
        "spec": {"clusterQueue": cq}})  # fmt: skip
    wait_for(lambda: condition(api.get_cluster_custom_object(group, version, "clusterqueues", cq)["status"],
                               "Active")["status"] == "True", 60, "the ClusterQueue to be Active")  # fmt: skip
    return cq


def queued(name: str, priority: str, ns: str) -> dict:
    run_policy = {"queueName": "gpu", "queuePriorityClass": f"{priority}-{ns}", "backoffLimit": 0}
    return manifest(name, CLUSTER_RUN, runPolicy=run_policy)


def test_kueue_admits_one_gang_at_a_time_and_its_preemption_is_a_disruption(cluster: Cluster, kueue):
    c = cluster
    _queues(c, gpus=16)  # room for one 2 x 8-GPU gang
    c.apply(queued("first", "routine", c.ns))
    wait_phase(c, "first", "Running")
    c.apply(queued("second", "routine", c.ns))
    wait_phase(c, "second", "Queued")
    # Kueue says why once it has tried to admit the Workload (about a second); until then the operator can only say
    # it waits for quota, and looks again soon (its 60 s refresh alone once lost this race in CI).
    ready = wait_for(lambda: (r := condition(c.get("second")["status"], "Ready")) and "insufficient unused quota for "
                     "nvidia.com/gpu" in r["message"] and r, 20, "Kueue's reason in Ready")  # fmt: skip
    assert (ready["status"], ready["reason"]) == ("False", "Queued")
    (job,) = c.jobs("second")
    assert job.spec.suspend and not c.pods("second", 1), "queued: a suspended Job and no pods, so no GPUs held"

    # An urgent run preempts the running one: its pods are stopped, its Job suspended and queued again.
    c.apply(queued("urgent", "urgent", c.ns))
    first = wait_for(lambda: (s := c.get("first")["status"]).get("disruptions") == 1 and s, 60, "first preempted")
    assert first["phase"] == "Queued" and first["failedAttempts"] == 0, first
    assert first["lastDisruption"]["reason"] == "Preempted", first["lastDisruption"]
    wait_for(lambda: any(e.reason == "Preempted" and e.type == "Warning" for e in c.events("first")), 30,
             "a Preempted warning")  # events are posted after the status patch that the line above saw
    wait_phase(c, "urgent", "Running")

    # Finish whatever runs; Kueue admits the others one gang at a time, and never two at once.
    done: set[str] = set()
    while len(done) < 3:
        running = wait_for(lambda: [n for n in ("first", "second", "urgent") if n not in done and
                                    phase(c, n) == "Running"], 90, "a run admitted")  # fmt: skip
        assert len(running) == 1, f"two gangs admitted on 16 GPUs at once: {running}"
        (name,) = running
        c.finish_pods(name, 1, "Succeeded")
        wait_phase(c, name, "Succeeded")
        done.add(name)
    for name in ("first", "second", "urgent"):
        status = c.get(name)["status"]
        assert (status["attempt"], status["failedAttempts"]) == (1, 0), (name, status)
        assert len(c.jobs(name)) == 1, "a preempted attempt resumes in its own Job, admitted again"
    assert c.get("first")["status"]["disruptions"] == 1 and c.get("second")["status"].get("disruptions", 0) == 0
