"""The operator's decisions, as a table: observed Job and pods + status + clock -> next status and actions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from lorafinetune.api import parse_manifest
from lorafinetune.api.status import AdapterRef, LoRAFineTuneStatus, Progress
from lorafinetune.contract import ExitCode, TerminationRecord
from lorafinetune.operator.progress import parse_metrics
from lorafinetune.operator.settings import OperatorSettings
from lorafinetune.operator.status import AttemptOutcome, kueue_recheck_after, observe_attempt, plan, plan_waiting
from tests.manifests import MINIMAL, manifest

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SETTINGS = OperatorSettings(backoff_base_seconds=10, backoff_cap_seconds=60)


def spec(**run_policy):
    return parse_manifest(manifest("demo", MINIMAL, runPolicy=run_policy)).spec


def job(parallelism=2, **conditions):
    conds = [{"type": t, "status": "True", "reason": r} for t, r in conditions.items()]
    return {"spec": {"parallelism": parallelism}, "status": {"conditions": conds}}


def pod(name, phase, **state):
    status = {"phase": phase}
    if state:
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    return {"metadata": {"name": name}, "status": status}


# ---------------------------------------------------------------- reading an attempt


def test_all_pods_running_is_running():
    assert observe_attempt(job(), [pod("a-0", "Running"), pod("a-1", "Running")]).state == "running"
    assert observe_attempt(job(), [pod("a-0", "Running"), pod("a-1", "Pending")]).state == "pending"


def test_unschedulable_pods_report_the_schedulers_reason():
    p = pod("a-0", "Pending")
    p["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
         "message": "0/2 nodes are available: 2 Insufficient nvidia.com/gpu."}
    ]  # fmt: skip
    out = observe_attempt(job(), [p])
    assert (out.state, out.reason) == ("pending", "Unschedulable") and "Insufficient nvidia.com/gpu" in out.message


def test_failed_pod_reason_comes_from_the_trainers_termination_message():
    message = json.dumps({"exitCode": 3, "reason": "DataError", "message": "train.jsonl:5: not valid JSON"})
    out = observe_attempt(job(), [pod("a-0", "Failed", terminated={"exitCode": 3, "reason": "Error",
                                                                   "message": message})])  # fmt: skip
    assert (out.state, out.reason, out.exit_code, out.permanent) == ("failed", "DataError", 3, True)
    assert out.message == "train.jsonl:5: not valid JSON"


def test_the_trainers_exit_code_wins_over_torchruns():
    # In a pod the container is torchrun, which exits 1 whatever its worker exited with.
    message = json.dumps({"exitCode": 3, "reason": "DataError", "message": "train.jsonl:5: not valid JSON"})
    out = observe_attempt(job(), [pod("a-0", "Failed", terminated={"exitCode": 1, "reason": "Error",
                                                                   "message": message})])  # fmt: skip
    assert (out.exit_code, out.permanent) == (3, True)
    retryable = json.dumps({"exitCode": 1, "reason": "RuntimeError", "message": "NCCL timeout"})
    out = observe_attempt(job(), [pod("a-0", "Failed", terminated={"exitCode": 1, "message": retryable})])
    assert (out.exit_code, out.permanent) == (1, False)


def test_oom_killed_is_retryable_and_explained():
    out = observe_attempt(job(), [pod("a-1", "Failed", terminated={"exitCode": 137, "reason": "OOMKilled"})])
    assert (out.reason, out.exit_code, out.permanent) == ("OOMKilled", 137, False)
    assert "out of memory" in out.message


def test_complete_job_is_success_and_carries_the_published_adapter(tmp_path, monkeypatch):
    # The termination message exactly as the trainer writes it
    from lorafinetune.trainer.__main__ import _write_termination

    monkeypatch.setenv("LFT_TERMINATION_LOG", str(tmp_path / "termination-log"))
    adapter = AdapterRef(uri="s3://b/run/adapter", size_bytes=123, sha256="f" * 64, merged_uri="s3://b/run/merged")
    _write_termination(ExitCode.OK, "Completed", "the adapter is published", adapter=adapter)
    message = (tmp_path / "termination-log").read_text()
    done = pod("a-0", "Succeeded", terminated={"exitCode": 0, "message": message})
    out = observe_attempt(job(Complete="Completed"), [done])
    assert out.state == "succeeded" and out.adapter == adapter
    p = plan(spec(), LoRAFineTuneStatus(phase="Running", attempt=1), out, NOW, SETTINGS, 1)
    assert p.status.adapter == adapter


def test_an_adapter_field_this_operator_does_not_know_does_not_lose_the_record():
    # A trainer image newer than the operator may describe the adapter with more fields
    record = TerminationRecord(exit_code=0, reason="Completed", message="", adapter=AdapterRef(
        uri="pvc://c/run/adapter", size_bytes=1, sha256="0" * 64)).dumps().replace('"sha256"', '"files":3,"sha256"')
    done = pod("a-0", "Succeeded", terminated={"exitCode": 0, "message": record})
    out = observe_attempt(job(Complete="Completed"), [done])
    assert out.adapter is not None and out.adapter.uri == "pvc://c/run/adapter"


def disrupted_pod(name, reason="PreemptionByScheduler"):
    p = pod(name, "Failed", terminated={"exitCode": 143, "reason": "Error"})
    p["status"]["conditions"] = [{"type": "DisruptionTarget", "status": "True", "reason": reason,
                                  "message": "Preempted by a higher-priority pod"}]  # fmt: skip
    return p


def test_a_disrupted_rank_makes_the_attempt_disrupted_not_failed():
    # rank 1 is preempted; rank 0 then fails with a collective error that says nothing of why
    peer = pod("a-0", "Failed", terminated={"exitCode": 1, "message": json.dumps({"exitCode": 1, "reason": "Error"})})
    out = observe_attempt(job(), [peer, disrupted_pod("a-1")])
    assert (out.state, out.disrupted, out.reason) == ("failed", True, "PreemptionByScheduler")
    assert "a-1" in out.message and "higher-priority" in out.message


def test_a_permanent_error_wins_over_a_disruption():
    bad = json.dumps({"exitCode": 3, "reason": "DataError", "message": "row 5"})
    out = observe_attempt(job(), [pod("a-0", "Failed", terminated={"exitCode": 1, "message": bad}),
                                  disrupted_pod("a-1")])  # fmt: skip
    assert (out.permanent, out.disrupted, out.reason) == (True, False, "DataError")


def test_the_jobs_pod_failure_policy_tells_a_disruption_when_the_pod_is_gone():
    j = job()
    j["status"]["conditions"] = [{"type": "Failed", "status": "True", "reason": "PodFailurePolicy",
                                  "message": "Pod ns/a-1 has condition DisruptionTarget matching FailJob rule at "
                                  "index 0"}]  # fmt: skip
    out = observe_attempt(j, [pod("a-0", "Running")])
    assert (out.state, out.disrupted, out.reason) == ("failed", True, "DisruptionTarget")
    plain = observe_attempt(job(Failed="BackoffLimitExceeded"), [])
    assert (plain.state, plain.disrupted) == ("failed", False)


def test_pods_refused_at_creation_say_why():
    quota = 'pods "a-0" is forbidden: exceeded quota: gpus, requested: nvidia.com/gpu=8'
    out = observe_attempt(job(), [], failed_create=quota)
    assert (out.state, out.reason, out.message) == ("pending", "FailedCreate", quota)
    assert observe_attempt(job(), [pod("a-0", "Running"), pod("a-1", "Running")], failed_create=quota).state == (
        "running"
    ), "an old refusal does not matter once every pod exists"


@pytest.mark.parametrize("reason", ["ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                                    "CreateContainerConfigError"])  # fmt: skip
def test_containers_that_cannot_start_are_named(reason):
    out = observe_attempt(job(), [pod("a-0", "Pending", waiting={"reason": reason, "message": "why"})])
    assert (out.state, out.reason, out.message) == ("pending", reason, "why")


def queued_job(**conditions):
    j = job(Suspended="JobSuspended", **conditions)
    j["spec"]["suspend"] = True
    j["metadata"] = {"name": "demo-a1", "labels": {"kueue.x-k8s.io/queue-name": "gpu"}}
    return j


def workload(**conditions):
    """Kueue's Workload with conditions given as type=(status, reason, message)."""
    return {"status": {"conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                      for t, (s, r, m) in conditions.items()]}}  # fmt: skip


def test_a_job_held_by_kueue_is_queued_with_kueues_reason():
    quota = "couldn't assign flavors to pod set main: insufficient unused quota for nvidia.com/gpu, 16 more needed"
    out = observe_attempt(queued_job(), [], workload=workload(QuotaReserved=("False", "Pending", quota)))
    assert (out.state, out.reason, out.evicted) == ("queued", "Queued", "")
    assert out.message == f"LocalQueue 'gpu': {quota}"


def test_pods_stopped_by_kueues_suspension_are_not_a_failure():
    # Preempted: Kueue suspended the Job; its pods end Failed (SIGTERM) while being deleted.
    stopped = pod("a-0", "Failed", terminated={"exitCode": 143, "reason": "Error"})
    stopped["metadata"]["deletionTimestamp"] = "2026-11-26T12:00:00Z"
    evicted = workload(QuotaReserved=("True", "QuotaReserved", "still held until the pods are gone"),
                       Evicted=("True", "Preempted", "Preempted to accommodate a workload (UID: x) due to "
                                "prioritization in the ClusterQueue"))  # fmt: skip
    out = observe_attempt(queued_job(), [stopped], workload=evicted)
    assert (out.state, out.evicted.split(":")[0]) == ("queued", "Preempted")
    # Admitted again, the Job runs new pods while the stopped one is still being removed.
    resumed = job()
    resumed["metadata"] = {"labels": {"kueue.x-k8s.io/queue-name": "gpu"}}
    assert observe_attempt(resumed, [stopped, pod("a-0x", "Running")]).state == "pending"
    # Without Kueue, a failed pod is a failure however it ended.
    assert observe_attempt(job(), [stopped]).state == "failed"


def test_a_suspended_job_without_a_workload_says_kueue_is_missing():
    out = observe_attempt(queued_job(), [], workload=None)
    assert (out.state, out.reason) == ("pending", "WaitingForKueue") and "is Kueue running" in out.message
    admitted = observe_attempt(queued_job(), [], workload=workload(QuotaReserved=("True", "QuotaReserved", "")))
    assert (admitted.state, admitted.reason) == ("pending", "PodsStarting")



def test_until_kueue_has_decided_the_job_is_looked_at_again_soon_then_rarely():
    # Kueue's answer changes nothing the operator watches: without a recheck the reason would wait for the refresh.
    created = queued_job()
    created["metadata"]["creationTimestamp"] = "2026-11-26T12:00:00Z"
    undecided = [None, workload()]  # no Workload yet; one Kueue has not tried to admit
    assert [kueue_recheck_after(created, w, NOW + timedelta(seconds=1), 60) for w in undecided] == [1.0, 1.0]
    assert kueue_recheck_after(created, workload(), NOW + timedelta(seconds=30), 60) == 15.0
    assert kueue_recheck_after(created, workload(), NOW + timedelta(hours=1), 60) == 60.0, "never tried: rarely"
    decided = [workload(QuotaReserved=("False", "Pending", "insufficient quota")),
               workload(QuotaReserved=("True", "QuotaReserved", "")), workload(Evicted=("True", "Preempted", ""))]
    assert [kueue_recheck_after(created, w, NOW + timedelta(seconds=1), 60) for w in decided] == [None] * 3


# ---------------------------------------------------------------- deciding


def test_time_in_the_queue_is_not_pending_time():
    s = spec(queueName="gpu", pendingTimeoutSeconds=60)
    status = LoRAFineTuneStatus(phase="Pending", attempt=1, start_time=NOW, pending_since=NOW)
    queued = AttemptOutcome("queued", "Queued", "LocalQueue 'gpu': insufficient quota")
    p = plan(s, status, queued, NOW + timedelta(hours=5), SETTINGS, 1)
    assert (p.status.phase, p.delete_job, p.status.pending_since) == ("Queued", None, None)
    ready = next(c for c in p.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason, ready.message) == ("False", "Queued", queued.message)
    assert [e[:2] for e in p.events] == [("Normal", "Queued")]
    again = plan(s, p.status, queued, NOW + timedelta(hours=6), SETTINGS, 1)
    assert (again.events, again.status.disruptions) == ([], 0), "queued for long: still one event, no disruption"


def test_nobody_admitting_a_queued_job_is_bounded_by_the_pending_timeout():
    s = spec(queueName="gpu", pendingTimeoutSeconds=60)
    status = LoRAFineTuneStatus(phase="Pending", attempt=1, start_time=NOW, pending_since=NOW)
    waiting = AttemptOutcome("pending", "WaitingForKueue", "no Workload")
    p = plan(s, status, waiting, NOW + timedelta(seconds=61), SETTINGS, 1)
    assert (p.status.phase, p.delete_job, p.status.last_failure.reason) == ("Retrying", 1, "PendingTimeout")


def test_kueue_preempting_a_running_attempt_is_a_disruption_once():
    s = spec(queueName="gpu", backoffLimit=0, disruptionLimit=1)
    running = LoRAFineTuneStatus(phase="Running", attempt=1, start_time=NOW)
    preempted = AttemptOutcome("queued", "Queued", "LocalQueue 'gpu': waiting", evicted="Preempted: by urgent")
    p = plan(s, running, preempted, NOW, SETTINGS, 1)
    assert (p.status.phase, p.status.disruptions, p.status.failed_attempts) == ("Queued", 1, 0)
    assert (p.delete_job, p.create_attempt) == (None, None), "the same Job resumes when Kueue admits it again"
    assert (p.status.last_disruption.reason, p.status.last_disruption.message) == ("Preempted", "by urgent")
    assert p.events[0][:2] == ("Warning", "Preempted")
    assert plan(s, p.status, preempted, NOW, SETTINGS, 1).status.disruptions == 1, "counted once"
    # Admitted and running again, then preempted a second time: over disruptionLimit 1.
    back = plan(s, p.status, AttemptOutcome("running"), NOW, SETTINGS, 1)
    final = plan(s, back.status, preempted, NOW, SETTINGS, 1)
    assert (final.status.phase, final.delete_job) == ("Failed", 1)
    failed = next(c for c in final.status.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "DisruptionLimitExceeded")


def test_a_new_resource_starts_attempt_one():
    p = plan(spec(), LoRAFineTuneStatus(), AttemptOutcome("none"), NOW, SETTINGS, generation=1)
    assert (p.create_attempt, p.status.attempt, p.status.phase, p.status.start_time) == (1, 1, "Pending", NOW)
    assert p.events[0][:2] == ("Normal", "AttemptCreated")


@pytest.mark.parametrize(
    "outcome, phase, condition",
    [
        (AttemptOutcome("running"), "Running", "Running"),
        (AttemptOutcome("succeeded"), "Succeeded", "Succeeded"),
        (AttemptOutcome("failed", "DataError", "bad row", 3, True), "Failed", "Failed"),
    ],
)
def test_phase_and_conditions_follow_the_attempt(outcome, phase, condition):
    p = plan(spec(), LoRAFineTuneStatus(phase="Pending", attempt=1, start_time=NOW), outcome, NOW, SETTINGS, 1)
    assert p.status.phase == phase
    conditions = {c.type: c.status for c in p.status.conditions}
    assert conditions[condition] == "True"
    expected = ["Ready", "Running"] if phase == "Running" else [condition]
    assert [t for t, s in conditions.items() if s == "True"] == expected, "only the current phase's conditions hold"


def test_failures_retry_with_exponential_backoff_then_fail():
    s = spec(backoffLimit=2)
    status = LoRAFineTuneStatus(phase="Running", attempt=1, start_time=NOW)
    crash = AttemptOutcome("failed", "Error", "NCCL timeout", 1, False)
    delays = []
    for attempt in (1, 2):
        p = plan(s, status, crash, NOW, SETTINGS, 1)
        assert p.status.phase == "Retrying" and p.create_attempt is None
        delays.append(p.requeue_after)
        # the same failed Job observed again must not count twice
        again = plan(s, p.status, crash, NOW, SETTINGS, 1)
        assert again.status.failed_attempts == attempt and again.create_attempt is None
        later = plan(s, p.status, crash, p.status.next_attempt_time, SETTINGS, 1)
        assert (later.create_attempt, later.status.phase) == (attempt + 1, "Pending")
        status = later.status
        status.phase = "Running"
    assert delays == [10, 20]
    final = plan(s, status, crash, NOW, SETTINGS, 1)
    assert final.status.phase == "Failed" and final.status.failed_attempts == 3
    assert final.status.conditions and "retries exhausted: backoffLimit 2" in final.events[-1][2]
    assert final.status.last_failure.reason == "Error" and final.status.completion_time == NOW


@pytest.mark.parametrize(
    ("phase", "run_policy"), [("Retrying", {}), ("Suspended", {"suspend": False})], ids=["retry", "resume"]
)
def test_a_new_attempt_waits_for_the_previous_attempts_pods_to_stop(phase, run_policy):
    s = spec(**run_policy)
    status = LoRAFineTuneStatus(phase=phase, attempt=1, start_time=NOW, next_attempt_time=NOW)
    gone = AttemptOutcome("failed", "Error", "", 1, False)
    waiting = plan(s, status, gone, NOW, SETTINGS, 1, active_pods=2)
    assert waiting.create_attempt is None and waiting.requeue_after
    assert waiting.status.phase == "Pending" and waiting.status.attempt == 1
    ready = next(c for c in waiting.status.conditions if c.type == "Ready")
    assert ready.reason == "PreviousAttemptStopping" and "waits for 2 pod(s)" in ready.message
    assert [e[1] for e in waiting.events] == ["PreviousAttemptStopping"]
    still = plan(s, waiting.status, gone, NOW, SETTINGS, 1, active_pods=1)
    assert still.create_attempt is None and still.events == [], "one event, not one per tick"
    started = plan(s, still.status, gone, NOW, SETTINGS, 1, active_pods=0)
    assert (started.create_attempt, started.status.attempt) == (2, 2)


def test_permanent_failures_are_not_retried():
    p = plan(spec(backoffLimit=5), LoRAFineTuneStatus(phase="Running", attempt=1),
             AttemptOutcome("failed", "ModelError", "offline", 4, True), NOW, SETTINGS, 1)  # fmt: skip
    assert p.status.phase == "Failed" and p.create_attempt is None and "not retried" in p.events[-1][2]


def test_backoff_is_capped():
    assert [SETTINGS.backoff_seconds(n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]


def test_suspend_stops_the_attempt_and_resume_starts_the_next_one():
    running = LoRAFineTuneStatus(phase="Running", attempt=2, start_time=NOW)
    p = plan(spec(suspend=True), running, AttemptOutcome("running"), NOW, SETTINGS, 2)
    assert (p.status.phase, p.delete_job) == ("Suspended", 2)
    resumed = plan(spec(suspend=False), p.status, AttemptOutcome("none"), NOW, SETTINGS, 3)
    assert (resumed.create_attempt, resumed.status.phase) == (3, "Pending")
    assert "resumes from the last complete checkpoint" in resumed.events[0][2]


@pytest.mark.parametrize("policy", [{"suspend": True}, {"activeDeadlineSeconds": 60}], ids=["suspend", "deadline"])
def test_a_queued_attempts_job_goes_too_so_that_kueue_cannot_admit_it_later(policy):
    # Left in place, Kueue could admit it after the run resumed with the next attempt: two attempts, one run folder.
    queued = LoRAFineTuneStatus(phase="Queued", attempt=1, start_time=NOW - timedelta(seconds=61))
    p = plan(spec(queueName="gpu", **policy), queued, AttemptOutcome("queued", "Queued", "waiting"), NOW, SETTINGS, 2)
    assert (p.status.phase, p.delete_job) == ("Suspended" if "suspend" in policy else "Failed", 1)

def test_deadline_fails_the_run_and_stops_its_pods():
    status = LoRAFineTuneStatus(phase="Running", attempt=1, start_time=NOW - timedelta(seconds=61))
    p = plan(spec(activeDeadlineSeconds=60), status, AttemptOutcome("running"), NOW, SETTINGS, 1)
    assert (p.status.phase, p.delete_job, p.status.last_failure.reason) == ("Failed", 1, "DeadlineExceeded")


def test_a_live_run_is_woken_by_the_clock_only_for_its_deadlines():
    running = LoRAFineTuneStatus(phase="Running", attempt=1, start_time=NOW - timedelta(seconds=20))
    assert plan(spec(), running, AttemptOutcome("running"), NOW, SETTINGS, 1).requeue_after is None, "events do it"
    p = plan(spec(activeDeadlineSeconds=60), running, AttemptOutcome("running"), NOW, SETTINGS, 1)
    assert p.requeue_after == pytest.approx(40, abs=0.1), "when the run's deadline passes"
    pending = LoRAFineTuneStatus(phase="Pending", attempt=1, start_time=NOW - timedelta(seconds=20),
                                 pending_since=NOW - timedelta(seconds=10))  # fmt: skip
    starting = AttemptOutcome("pending", "PodsStarting", "0/1 pods running")
    p = plan(spec(pendingTimeoutSeconds=60, activeDeadlineSeconds=600), pending, starting, NOW, SETTINGS, 1)
    assert p.requeue_after == pytest.approx(50, abs=0.1), "when the pending bound passes, the nearer one"
    late = plan(spec(pendingTimeoutSeconds=60), pending, starting, NOW + timedelta(seconds=p.requeue_after), SETTINGS,
                1)  # fmt: skip
    assert late.status.last_failure.reason == "PendingTimeout", "woken then, the bound has passed"
    created = plan(spec(pendingTimeoutSeconds=60), LoRAFineTuneStatus(), AttemptOutcome("none"), NOW, SETTINGS, 1)
    assert created.create_attempt == 1 and created.requeue_after == pytest.approx(60, abs=0.1)


def test_pods_not_running_yet_add_nothing_to_attempt_created_until_one_runs():
    created = plan(spec(), LoRAFineTuneStatus(), AttemptOutcome("none"), NOW, SETTINGS, 1).status
    none_yet = observe_attempt(job(), [pod("a-0", "Pending")])
    quiet = plan(spec(), created, none_yet, NOW + timedelta(seconds=1), SETTINGS, 1)
    assert quiet.status == created and not quiet.events, "no status write, no event: nothing new to say"
    one = plan(spec(), created, observe_attempt(job(), [pod("a-0", "Running"), pod("a-1", "Pending")]),
               NOW + timedelta(seconds=2), SETTINGS, 1)  # fmt: skip
    ready = next(c for c in one.status.conditions if c.type == "Ready")
    assert (ready.reason, ready.message) == ("PodsStarting", "1/2 pods running") and one.events
    stuck = AttemptOutcome("pending", "ImagePullBackOff", 'Back-off pulling image "nope:1"')
    assert plan(spec(), created, stuck, NOW, SETTINGS, 1).events[0][:2] == ("Warning", "ImagePullBackOff")


def test_planning_leaves_the_status_it_was_given_as_it_was():
    # The operator keeps the parsed status between reconciles: a plan must work on a copy of it.
    before = plan(spec(), LoRAFineTuneStatus(), AttemptOutcome("none"), NOW, SETTINGS, 1).status
    frozen = before.model_dump()
    after = plan(spec(), before, AttemptOutcome("running"), NOW + timedelta(seconds=5), SETTINGS, 2).status
    assert after.phase == "Running" and before.model_dump() == frozen
    waiting = plan_waiting(before, "NameInUse", "taken", NOW, 2).status
    assert waiting.conditions != before.conditions and before.model_dump() == frozen


def test_ttl_removes_children_of_finished_runs_when_due():
    done = LoRAFineTuneStatus(phase="Succeeded", attempt=1, completion_time=NOW)
    early = plan(spec(ttlSecondsAfterFinished=30), done, AttemptOutcome("succeeded"), NOW + timedelta(seconds=10),
                 SETTINGS, 1)  # fmt: skip
    assert not early.delete_children and early.requeue_after == 20
    due = plan(spec(ttlSecondsAfterFinished=30), done, AttemptOutcome("none"), NOW + timedelta(seconds=30), SETTINGS, 1)
    assert due.delete_children and due.status.phase == "Succeeded" and due.status.children_deleted_time
    again = plan(spec(ttlSecondsAfterFinished=30), due.status, AttemptOutcome("none"), NOW + timedelta(hours=1),
                 SETTINGS, 1)  # fmt: skip
    assert not again.delete_children and again.requeue_after is None, "deleted once, then nothing to do"


def test_ready_carries_the_reason_a_run_is_still_pending():
    why = AttemptOutcome("pending", "Unschedulable", "0/2 nodes are available: 2 Insufficient nvidia.com/gpu.")
    p = plan(spec(), LoRAFineTuneStatus(phase="Pending", attempt=1), why, NOW, SETTINGS, 1)
    ready = next(c for c in p.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason, ready.message) == ("False", "Unschedulable", why.message)
    assert ("Warning", "Unschedulable", why.message) in p.events


def test_transition_time_changes_only_when_a_condition_flips():
    first = plan(spec(), LoRAFineTuneStatus(phase="Pending", attempt=1), AttemptOutcome("running"), NOW, SETTINGS, 1)
    again = plan(spec(), first.status, AttemptOutcome("running"), NOW + timedelta(minutes=5), SETTINGS, 1)
    running = next(c for c in again.status.conditions if c.type == "Running")
    assert running.last_transition_time == NOW and not again.events


# ---------------------------------------------------------------- progress from rank 0's metrics


def test_progress_is_read_from_the_trainers_metrics():
    from prometheus_client import generate_latest

    from lorafinetune.trainer.metrics import TrainerMetrics

    m = TrainerMetrics()
    m.global_step.set(12), m.total_steps.set(100), m.train_loss.set(0.75), m.eval_loss.set(0.8)
    m.tokens_per_second.set(2500), m.eta_seconds.set(300)
    progress = parse_metrics(generate_latest(m.registry).decode(), Progress(step=10, best_eval_loss=0.7))
    assert (progress.step, progress.total_steps, progress.summary) == (12, 100, "12/100")
    assert (progress.train_loss, progress.eval_loss, progress.best_eval_loss) == (0.75, 0.8, 0.7)
    assert (progress.tokens_per_second, progress.eta_seconds) == (2500, 300)
    assert parse_metrics("# nothing yet\n") is None


def test_progress_is_fetched_over_http_from_a_live_trainer_endpoint():
    import socket

    from lorafinetune.operator.progress import fetch
    from lorafinetune.trainer.metrics import TrainerMetrics

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    m = TrainerMetrics()
    m.serve(port)
    m.global_step.set(3), m.total_steps.set(9), m.train_loss.set(1.5)
    progress = fetch("127.0.0.1", port, previous=None)
    assert (progress.step, progress.summary, progress.train_loss) == (3, "3/9", 1.5)
    assert fetch("127.0.0.1", 1, previous=None) is None, "an unreachable trainer means no progress, not an error"


def test_a_spec_the_operator_cannot_run_fails_at_once_saying_why_and_converges():
    from lorafinetune.operator.status import plan_invalid

    problems = ["spec.model.uri: unsupported scheme 'ftp://' in 'ftp://host/m'"]
    p = plan_invalid(LoRAFineTuneStatus(), problems, NOW, generation=1)
    s = p.status
    assert s.phase == "Failed" and s.last_failure.reason == "InvalidSpec" and s.last_failure.permanent
    assert "spec.model.uri: unsupported scheme 'ftp://'" in s.last_failure.message
    failed = next(c for c in s.conditions if c.type == "Failed")
    assert (failed.status, failed.reason) == ("True", "InvalidSpec")
    assert [(kind, reason) for kind, reason, _ in p.events] == [("Warning", "InvalidSpec")]
    again = plan_invalid(s, problems, NOW + timedelta(seconds=10), generation=1)
    assert again.status == s and again.events == [] and again.create_attempt is None


def test_disruptions_restart_without_spending_the_backoff_limit():
    # backoffLimit 1 and five preemptions: every one restarts, none is a failure
    s = spec(backoffLimit=1)
    status = LoRAFineTuneStatus(phase="Running", attempt=1, start_time=NOW)
    preempted = AttemptOutcome("failed", "PreemptionByScheduler", "pod a-1: preempted", disrupted=True)
    for n in range(1, 6):
        p = plan(s, status, preempted, NOW, SETTINGS, 1)
        assert (p.status.phase, p.status.disruptions, p.status.failed_attempts) == ("Retrying", n, 0)
        assert p.events[-1][:2] == ("Warning", "Disrupted") and "not counted as a failure" in p.events[-1][2]
        assert p.status.last_disruption.reason == "PreemptionByScheduler" and p.status.last_failure is None
        assert p.requeue_after == SETTINGS.backoff_seconds(1), "the shortest backoff, whatever came before"
        started = plan(s, p.status, preempted, p.status.next_attempt_time, SETTINGS, 1)
        assert started.create_attempt == n + 1
        status = started.status
        status.phase = "Running"
    done = plan(s, status, AttemptOutcome("succeeded"), NOW, SETTINGS, 1)
    assert (done.status.phase, done.status.failed_attempts, done.status.disruptions) == ("Succeeded", 0, 5)


def test_a_run_disrupted_past_its_limit_fails():
    status = LoRAFineTuneStatus(phase="Running", attempt=3, start_time=NOW, disruptions=2)
    p = plan(spec(disruptionLimit=2), status, AttemptOutcome("failed", "EvictionByEvictionAPI", disrupted=True), NOW,
             SETTINGS, 1)  # fmt: skip
    assert (p.status.phase, p.status.disruptions) == ("Failed", 3)
    assert p.events[-1][1] == "DisruptionLimitExceeded" and "disruptionLimit 2" in p.events[-1][2]


def test_an_attempt_pending_past_its_bound_fails_naming_the_cause_and_releases_its_pods():
    s = spec(pendingTimeoutSeconds=60, backoffLimit=1)
    created = plan(s, LoRAFineTuneStatus(), AttemptOutcome("none"), NOW, SETTINGS, 1).status
    assert created.pending_since == NOW
    pull = AttemptOutcome("pending", "ImagePullBackOff", 'Back-off pulling image "nope:1"')
    early = plan(s, created, pull, NOW + timedelta(seconds=59), SETTINGS, 1)
    assert (early.status.phase, early.delete_job) == ("Pending", None)
    late = plan(s, early.status, pull, NOW + timedelta(seconds=60), SETTINGS, 1)
    assert (late.status.phase, late.delete_job, late.status.failed_attempts) == ("Retrying", 1, 1)
    failure = late.status.last_failure
    assert failure.reason == "PendingTimeout" and "ImagePullBackOff" in failure.message and "nope:1" in failure.message
    assert "pendingTimeoutSeconds (60 s)" in failure.message and late.status.pending_since is None


def test_running_pods_end_the_pending_clock():
    s = spec(pendingTimeoutSeconds=60)
    status = LoRAFineTuneStatus(phase="Pending", attempt=1, start_time=NOW, pending_since=NOW)
    running = plan(s, status, AttemptOutcome("running"), NOW + timedelta(seconds=30), SETTINGS, 1)
    assert running.status.pending_since is None
    later = plan(s, running.status, AttemptOutcome("running"), NOW + timedelta(hours=5), SETTINGS, 1)
    assert later.status.phase == "Running" and later.delete_job is None


def test_a_capacity_warning_still_creates_the_attempt():
    # No node has 8 GPUs now: an autoscaler adds one only for pods that need it, so the Job is created anyway.
    warning = ("InsufficientGPUs", "resources.gpusPerNode is 8 but no node has more than 0 allocatable nvidia.com/gpu")
    p = plan(spec(), LoRAFineTuneStatus(), AttemptOutcome("none"), NOW, SETTINGS, 1, warning=warning)
    assert p.create_attempt == 1 and p.status.phase == "Pending"
    ready = next(c for c in p.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason, ready.message) == ("False", *warning)
    assert ("Warning", *warning) in p.events
