"""The pass that creates an attempt's Job leaves its status to the fine-tune's next pass (handlers._UNRECORDED): the
decisions alone, from the caches, with the API calls replaced by records. What a crash in between leaves (nothing
lost, nothing duplicated) is tests/integration/test_operator_crashes.py's, against a real API server."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest

from lorafinetune.operator import builders, handlers, kube
from tests.manifests import CLUSTER_RUN, manifest

NAMESPACE = "ns"
_VERSIONS = itertools.count(100)
_NAMES = itertools.count()


class Recorder:
    """The queue and the event sender: what the handlers asked of them."""

    def __init__(self) -> None:
        self.added: list[tuple[str, str]] = []
        self.events: list[str] = []

    def add(self, key: str, source: str = "", new: bool = False) -> None:
        self.added.append((key, source))

    def schedule(self, key: str, after: float | None, source: str = "clock", new: bool = False) -> None:
        pass

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


def _running_pod(job: dict[str, Any]) -> dict[str, Any]:
    labels = job["spec"]["template"]["metadata"]["labels"]
    return {"metadata": {"name": f"{job['metadata']['name']}-0", "namespace": NAMESPACE, "labels": labels,
                         "uid": f"uid-pod-{job['metadata']['name']}", "resourceVersion": str(next(_VERSIONS)),
                         "annotations": {builders.COMPLETION_INDEX: "0"},
                         "ownerReferences": [{"kind": "Job", "name": job["metadata"]["name"],
                                              "uid": job["metadata"]["uid"], "controller": True}]},
            "status": {"phase": "Running"}}  # fmt: skip


def test_the_pass_that_creates_the_job_writes_no_status_and_the_next_records_the_attempt(api):
    created, patches, _, recorder = api
    key, _ = _apply()
    handlers.reconcile(key, "change")
    assert [obj["kind"] for obj in created] == ["Job"] and patches == []
    assert (key, "record") in recorder.added and recorder.events == ["AttemptCreated"]

    handlers.reconcile(key, "record")  # its pods not created yet: the attempt, as the creating pass planned it
    [patch] = patches
    ready = next(c for c in patch["conditions"] if c["type"] == "Ready")
    assert patch["attempt"] == 1 and patch["phase"] == "Pending" and ready["reason"] == "AttemptCreated"
    assert handlers._UNRECORDED == {}
    assert [obj["kind"] for obj in created] == ["Job"], "the next pass created nothing again"


def test_a_run_whose_pods_run_before_its_next_pass_gets_one_status_patch(api):
    """In a burst the record waits in the other lane while the new fine-tunes' Jobs are created; by then kwok's or a
    quick node's pods may run, and the attempt and Running go in one patch, not two."""
    created, patches, _, recorder = api
    key, _ = _apply()
    handlers.reconcile(key, "change")
    [job] = created
    handlers.PODS.put(_running_pod(job))
    handlers.reconcile(key, "record")
    [patch] = patches
    assert patch["attempt"] == 1 and patch["phase"] == "Running" and patch["startTime"]
    assert recorder.events == ["AttemptCreated", "AllPodsRunning"]

    handlers.reconcile(key, "pod-event")  # recorded: nothing more to write
    assert len(patches) == 1 and [obj["kind"] for obj in created] == ["Job"]


def test_a_new_process_records_an_attempt_the_old_one_created_but_never_wrote(api):
    """What the pass had planned dies with the process: the next finds the Job "ours already" and records it then."""
    created, patches, exists, _ = api
    key, _ = _apply()
    handlers.reconcile(key, "change")
    [job] = created
    handlers._UNRECORDED.clear()  # a restart, or another replica taking over
    exists.add(job["metadata"]["name"])
    handlers.reconcile(key, "clock")
    assert patches == [] and len(created) == 1
    handlers.reconcile(key, "record")
    [patch] = patches
    assert patch["attempt"] == 1 and patch["phase"] == "Pending"
