"""Which Job a refused or failed gang NetworkPolicy takes down (handlers._create_job_with_policy): the decisions alone,
with the API calls replaced by records. The refusal itself, from a real API server, is in
tests/integration/test_operator.py (quotas of no policies, and of exactly one)."""

from __future__ import annotations

import dataclasses

import pytest
from kubernetes.client.exceptions import ApiException

from lorafinetune.operator import builders, handlers, kube

OWNER = builders.Owner("ft", "ns", "uid-ft")
JOB = {"kind": "Job", "metadata": {"name": "ft-a1", "namespace": "ns", "uid": "uid-job",
                                   "ownerReferences": [{"controller": True, "uid": OWNER.uid}]}}  # fmt: skip


def refused(status: int) -> ApiException:
    return ApiException(status=status, reason="refused")


@pytest.fixture
def api(monkeypatch):
    """kube.create answers by kind from `answers` (an object, None for "ours already", or an exception to raise);
    kube.delete records what it was asked to delete."""
    answers: dict[str, object] = {}
    deleted: list[str] = []

    def create(obj):
        answer = answers[obj["kind"]]
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(kube, "create", create)
    monkeypatch.setattr(kube, "delete", lambda kind, namespace, name: deleted.append(f"{kind} {name}"))
    monkeypatch.setattr(handlers, "_POLICY_REFUSED", set())
    monkeypatch.setattr(handlers, "_ensure_namespace_policy", lambda namespace: None)  # stored already
    yield answers, deleted
    for informer in handlers.JOBS.parts:
        informer.forget(JOB)


def test_a_refused_policy_takes_the_job_created_beside_it_down_and_goes_first_from_then_on(api):
    answers, deleted = api
    answers.update(Job=JOB, NetworkPolicy=refused(403))
    with pytest.raises(ApiException):
        handlers._create_job_with_policy(OWNER, JOB, gang=True)
    assert deleted == ["Job ft-a1"] and OWNER.uid in handlers._POLICY_REFUSED

    answers["NetworkPolicy"] = refused(403)  # still refused: the Job is not even sent
    answers["Job"] = AssertionError("the Job was created before its policy")
    with pytest.raises(ApiException):
        handlers._create_job_with_policy(OWNER, JOB, gang=True)
    answers.update(NetworkPolicy={"kind": "NetworkPolicy"}, Job=JOB)
    assert handlers._create_job_with_policy(OWNER, JOB, gang=True) is JOB
    assert OWNER.uid not in handlers._POLICY_REFUSED


def test_a_policy_that_timed_out_leaves_a_job_that_was_there_before(api):
    """Ours from before a restart, maybe running: a timeout or a 5xx says nothing about the policy (it may be
    stored), so the Job stays, and the retry creates the policy first."""
    answers, deleted = api
    handlers.JOBS.put(JOB)  # ours, and known to be
    answers.update(Job=None, NetworkPolicy=TimeoutError("read timed out"))
    with pytest.raises(TimeoutError):
        handlers._create_job_with_policy(OWNER, JOB, gang=True)
    answers["NetworkPolicy"] = refused(503)
    handlers._POLICY_REFUSED.clear()
    with pytest.raises(ApiException):
        handlers._create_job_with_policy(OWNER, JOB, gang=True)
    assert deleted == []


def test_a_refused_policy_takes_down_a_job_of_ours_from_before_a_restart(api):
    """The operator died between creating a Job beside a refused policy and deleting it: the cache says it is ours."""
    answers, deleted = api
    handlers.JOBS.put(JOB)
    answers.update(Job=None, NetworkPolicy=refused(403))
    with pytest.raises(ApiException):
        handlers._create_job_with_policy(OWNER, JOB, gang=True)
    assert deleted == ["Job ft-a1"]


def test_a_job_of_somebody_elses_is_never_deleted(api):
    answers, deleted = api
    answers.update(Job=kube.OwnedByAnother("Job ft-a1 already exists and belongs to Job other"),
                   NetworkPolicy=refused(403))  # fmt: skip
    with pytest.raises(ApiException):
        handlers._create_job_with_policy(OWNER, JOB, gang=True)
    assert deleted == [], "not in the cache as ours: nothing to take down"


def test_without_network_policies_only_the_job_is_created(api, monkeypatch):
    answers, deleted = api
    monkeypatch.setattr(handlers, "SETTINGS", dataclasses.replace(handlers.SETTINGS, network_policy=False))
    answers.update(Job=JOB, NetworkPolicy=AssertionError("no policy wanted"))
    assert handlers._create_job_with_policy(OWNER, JOB, gang=True) is JOB and deleted == []


@pytest.fixture
def namespace_policy(monkeypatch):
    """kube.create and kube.replace_policy record what they were sent and answer with it as stored; the cache of the
    namespaces' policies starts empty and is emptied again after."""
    sent: list[tuple[str, dict]] = []

    def stored(verb, obj, version="7"):
        sent.append((verb, obj))
        if isinstance(answer := answers.get(obj["kind"]), Exception):
            raise answer
        return {**obj, "metadata": {**obj["metadata"], "resourceVersion": version}}

    answers: dict[str, object] = {}
    monkeypatch.setattr(kube, "create", lambda obj: stored("create", obj))
    monkeypatch.setattr(kube, "replace_policy", lambda obj, version: stored(f"replace {version}", obj, "8"))
    yield sent, answers
    for informer in handlers.NAMESPACE_POLICIES.parts:
        informer.forget({"metadata": {"name": builders.NAMESPACE_POLICY, "namespace": "ns", "resourceVersion": "0"}})


def test_a_one_pod_gangs_job_waits_for_the_namespaces_policy_which_is_written_once(namespace_policy):
    sent, answers = namespace_policy
    answers["NetworkPolicy"] = refused(403)
    with pytest.raises(ApiException):
        handlers._create_job_with_policy(OWNER, JOB, gang=False)
    assert [(verb, obj["kind"]) for verb, obj in sent] == [("create", "NetworkPolicy")], "no Job without it"
    sent.clear()
    answers["NetworkPolicy"] = None
    handlers._create_job_with_policy(OWNER, JOB, gang=False)
    handlers._create_job_with_policy(OWNER, JOB, gang=False)
    assert [(verb, obj["kind"]) for verb, obj in sent] == [("create", "NetworkPolicy"), ("create", "Job"),
                                                           ("create", "Job")], "the second Job: from the cache"


def test_a_namespace_policy_out_of_date_is_replaced_on_the_version_the_cache_holds(namespace_policy, monkeypatch):
    sent, _ = namespace_policy
    old = builders.build_namespace_policy("ns", dataclasses.replace(handlers.SETTINGS, metrics_namespaces=["old"]))
    handlers.NAMESPACE_POLICIES.put({**old, "metadata": {**old["metadata"], "resourceVersion": "5"}})
    handlers._ensure_namespace_policy("ns")
    [(verb, policy)] = sent
    assert verb == "replace 5" and policy == builders.build_namespace_policy("ns", handlers.SETTINGS)
    handlers._ensure_namespace_policy("ns")
    assert len(sent) == 1, "as wanted now: nothing more to send"
