"""The operator's decisions, as a table: observed Job and pods + status + clock -> next status and actions."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from lorafinetune.api import parse_manifest
from lorafinetune.api.status import LoRAFineTuneStatus, Progress
from lorafinetune.operator.progress import parse_metrics
from lorafinetune.operator.settings import OperatorSettings
from lorafinetune.operator.status import AttemptOutcome, observe_attempt, plan
from tests.conftest import deep_merge
from tests.unit.test_api import BASE

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
SETTINGS = OperatorSettings(backoff_base_seconds=10, backoff_cap_seconds=60)


def spec(**run_policy):
    return parse_manifest(deep_merge(BASE, {"spec": {"runPolicy": run_policy}})).spec


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


def test_complete_job_is_success_and_carries_the_published_adapter():
    adapter = {"uri": "s3://b/run/adapter", "sizeBytes": 123, "sha256": "f" * 64}
    message = json.dumps({"exitCode": 0, "reason": "Completed", "adapter": adapter})
    out = observe_attempt(job(Complete="Completed"), [pod("a-0", "Succeeded", terminated={"exitCode": 0,
                                                                                      "message": message})])  # fmt: skip
    assert (out.state, out.adapter) == ("succeeded", adapter)
    p = plan(spec(), LoRAFineTuneStatus(phase="Running", attempt=1), out, NOW, SETTINGS, 1)
    assert p.status.adapter.uri == "s3://b/run/adapter" and p.status.adapter.size_bytes == 123


# ---------------------------------------------------------------- deciding


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


def test_deadline_fails_the_run_and_stops_its_pods():
    status = LoRAFineTuneStatus(phase="Running", attempt=1, start_time=NOW - timedelta(seconds=61))
    p = plan(spec(activeDeadlineSeconds=60), status, AttemptOutcome("running"), NOW, SETTINGS, 1)
    assert (p.status.phase, p.delete_job, p.status.last_failure.reason) == ("Failed", 1, "DeadlineExceeded")


def test_ttl_removes_children_of_finished_runs_when_due():
    done = LoRAFineTuneStatus(phase="Succeeded", attempt=1, completion_time=NOW)
    early = plan(spec(ttlSecondsAfterFinished=30), done, AttemptOutcome("succeeded"), NOW + timedelta(seconds=10),
                 SETTINGS, 1)  # fmt: skip
    assert not early.delete_children and early.requeue_after == 20
    due = plan(spec(ttlSecondsAfterFinished=30), done, AttemptOutcome("none"), NOW + timedelta(seconds=30), SETTINGS, 1)
    assert due.delete_children and due.status.phase == "Succeeded"


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
