"""A new attempt's status waits while other new fine-tunes wait for their Jobs (handlers._UNRECORDED): the decisions
alone, from the caches, with the API calls replaced by records. What a crash in between leaves (nothing lost, nothing
duplicated) is tests/integration/test_operator_crashes.py's, against a real API server."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from lorafinetune.operator import builders, handlers, kube
from lorafinetune.operator.metrics import OPERATOR_METRICS
from tests.manifests import CLUSTER_RUN, manifest

NAMESPACE = "ns"
_VERSIONS = itertools.count(100)
_NAMES = itertools.count()


class Recorder:
    """The queue and the event sender: what the handlers asked of them; `burst`: how many other new fine-tunes the
    queue says are waiting for their Jobs."""

    def __init__(self) -> None:
        self.burst = 0
        self.scheduled: list[float | None] = []
        self.events: list[str] = []

    def new_waiting(self, besides: str = "") -> int:
        return self.burst

    def add(self, key: str, source: str = "", new: bool = False) -> None:
        pass

    def schedule(self, key: str, after: float | None, source: str = "clock", new: bool = False) -> None:
        self.scheduled.append(after)

    def forget(self, key: str) -> None:
        pass

    def send(self, obj: dict, kind: str, reason: str, message: str) -> bool:
        self.events.append(reason)
        return True


@pytest.fixture
def api(monkeypatch):
    """kube.create stores what it is sent (a Job gets a UID, as the API server gives it; `exists` makes it answer
    "ours already"); kube.patch_status merges into the cached fine-tune and records the patch."""
    created: list[dict[str, Any]] = []
    patches: list[dict[str, Any]] = []
    exists: set[str] = set()
    recorder = Recorder()

    def create(obj: dict[str, Any]) -> dict[str, Any] | None:
        if obj["metadata"]["name"] in exists:
            return None
        stored = copy.deepcopy(obj)
        stored["metadata"].update(uid=f"uid-{obj['metadata']['name']}", resourceVersion=str(next(_VERSIONS)))
        created.append(stored)
        return stored

    def patch_status(namespace: str, name: str, resource_version: str, status: dict[str, Any]) -> dict | None:
        body = copy.deepcopy(handlers.FINE_TUNES.get(namespace, name))
        assert body["metadata"]["resourceVersion"] == resource_version
        patches.append(status)
        body["status"] = {**(body.get("status") or {}), **status}
        body["metadata"]["resourceVersion"] = str(next(_VERSIONS))
        return body

    monkeypatch.setattr(kube, "create", create)
    monkeypatch.setattr(kube, "patch_status", patch_status)
    monkeypatch.setattr(kube, "pvc_exists", lambda namespace, claim: True)
    monkeypatch.setattr(handlers, "_ensure_namespace_policy", lambda namespace: None)
    monkeypatch.setattr(handlers, "QUEUE", recorder)
    monkeypatch.setattr(handlers, "EVENTS", recorder)
    monkeypatch.setattr(handlers, "_UNRECORDED", {})
    yield created, patches, exists, recorder
    for obj in created:
        for cache in (handlers.JOBS, handlers.PODS):
            for part in cache.parts:
                part.forget(obj)


def _apply() -> tuple[str, dict[str, Any]]:
    name = f"later-{next(_NAMES)}"
    body = manifest(name, CLUSTER_RUN, resources={"nodes": 1, "gpusPerNode": 0})
    body["metadata"].update(namespace=NAMESPACE, uid=f"uid-{name}", generation=1, resourceVersion=str(next(_VERSIONS)))
    handlers.FINE_TUNES.put(body)
    return f"{NAMESPACE}/{name}", body


def _recorded() -> float:
    """How many attempts the operator's histogram saw written to their status so far."""
    return OPERATOR_METRICS.registry.get_sample_value("lorafinetune_operator_attempt_recorded_seconds_count") or 0


def _running_pod(job: dict[str, Any]) -> dict[str, Any]:
    labels = job["spec"]["template"]["metadata"]["labels"]
    return {"metadata": {"name": f"{job['metadata']['name']}-0", "namespace": NAMESPACE, "labels": labels,
                         "uid": f"uid-pod-{job['metadata']['name']}", "resourceVersion": str(next(_VERSIONS)),
                         "annotations": {builders.COMPLETION_INDEX: "0"},
                         "ownerReferences": [{"kind": "Job", "name": job["metadata"]["name"],
                                              "uid": job["metadata"]["uid"], "controller": True}]},
            "status": {"phase": "Running"}}  # fmt: skip


def test_out_of_a_burst_the_pass_that_creates_the_job_records_the_attempt(api):
    created, patches, _, recorder = api
    key, _ = _apply()
    handlers.reconcile(key, "change")
    assert [obj["kind"] for obj in created] == ["Job"]
    [patch] = patches
    ready = next(c for c in patch["conditions"] if c["type"] == "Ready")
    assert patch["attempt"] == 1 and patch["phase"] == "Pending" and ready["reason"] == "AttemptCreated"
    assert handlers._UNRECORDED == {} and recorder.events == ["AttemptCreated"]


def test_in_a_burst_the_status_waits_and_a_run_whose_pods_run_by_then_gets_one_patch(api):
    created, patches, _, recorder = api
    key, _ = _apply()
    recorder.burst = 3
    recorded = _recorded()
    handlers.reconcile(key, "change")
    assert [obj["kind"] for obj in created] == ["Job"] and patches == []
    assert len(handlers._UNRECORDED) == 1 and _recorded() == recorded  # what the statuses_held gauge reports
    assert recorder.scheduled[-1] == handlers.RECORD_RECHECK_SECONDS and recorder.events == ["AttemptCreated"]
    handlers.reconcile(key, "clock")  # still a burst: planned from what this process created, nothing written
    assert patches == [] and [obj["kind"] for obj in created] == ["Job"], "the Job is not created again"

    [job] = created
    handlers.PODS.put(_running_pod(job))
    handlers.reconcile(key, "pod-event")
    assert patches == [] and recorder.events == ["AttemptCreated", "AllPodsRunning"]
    recorder.burst = 0
    handlers.reconcile(key, "clock")
    [patch] = patches
    assert patch["attempt"] == 1 and patch["phase"] == "Running" and patch["startTime"]
    assert handlers._UNRECORDED == {} and _recorded() == recorded + 1
    handlers.reconcile(key, "pod-event")  # recorded: nothing more to write
    assert len(patches) == 1 and [obj["kind"] for obj in created] == ["Job"]


def test_a_status_waits_for_a_burst_no_longer_than_the_bound(api, monkeypatch):
    created, patches, _, recorder = api
    key, _ = _apply()
    recorder.burst = 3
    handlers.reconcile(key, "change")
    assert patches == []
    monkeypatch.setattr(handlers, "RECORD_WAIT_SECONDS", 0.0)  # as if it had waited that long
    handlers.reconcile(key, "clock")
    [patch] = patches
    assert patch["attempt"] == 1 and len(created) == 1


def test_a_new_process_records_an_attempt_the_old_one_created_but_never_wrote(api):
    """What the waiting status held dies with the process: the next finds the Job "ours already" and records it."""
    created, patches, exists, recorder = api
    key, _ = _apply()
    recorder.burst = 3
    handlers.reconcile(key, "change")
    [job] = created
    handlers._UNRECORDED.clear()  # a restart, or another replica taking over
    exists.add(job["metadata"]["name"])
    recorder.burst = 0
    handlers.reconcile(key, "clock")
    [patch] = patches
    assert patch["attempt"] == 1 and patch["phase"] == "Pending" and len(created) == 1
