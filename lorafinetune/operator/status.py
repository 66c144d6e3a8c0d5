"""Pure status logic: what the current attempt's Job and pods say, and what the operator should do about it.

`observe_attempt` reads one attempt's Job and pods into an `AttemptOutcome`; `plan` turns the spec, the current
status, that outcome and the clock into a `Plan` (the new status, the actions, the events). Neither calls the API,
so every transition is a table-driven unit test; the kopf handler only executes plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.api.status import AdapterRef, Condition, Failure, LoRAFineTuneStatus, Phase
from lorafinetune.contract import ExitCode, TerminationRecord
from lorafinetune.operator.builders import KUEUE_QUEUE_LABEL
from lorafinetune.operator.settings import OperatorSettings

# queued: Kueue holds the attempt's Job suspended until the whole gang fits its ClusterQueue (runPolicy.queueName)
State = Literal["none", "queued", "pending", "running", "succeeded", "failed"]
# An attempt whose Job is still there to stop (a queued one too: Kueue would admit it later, beside the next attempt)
LIVE = ("queued", "pending", "running")
# Ready: every pod of the current attempt is scheduled and running; while Pending it carries the reason why not
# (the scheduler's Unschedulable message, a missing PVC, an image pull error). The others mirror the phase.
CONDITION_TYPES = ("Ready", "Running", "Succeeded", "Failed", "Suspended")


@dataclass(frozen=True)
class AttemptOutcome:
    state: State
    reason: str = ""
    message: str = ""
    exit_code: int | None = None
    permanent: bool = False
    # Stopped from outside (preemption, eviction, drain, spot reclaim): restarted without counting as a failure.
    disrupted: bool = False
    adapter: AdapterRef | None = None  # from rank 0's termination message on success
    evicted: str = ""  # queued again after Kueue evicted the running attempt: "<reason>: <message>" of the Workload
    running: int = 0  # pods of the attempt running so far (a pending gang)


# The Job's pod failure policy fails the whole Job at a pod's first disruption (builders.build_job); the Job's
# Failed condition then names the policy, and the pod itself may already be gone (an evicted pod is deleted).
DISRUPTION_TARGET = "DisruptionTarget"
POD_FAILURE_POLICY = "PodFailurePolicy"
# Waiting reasons of a container that no amount of waiting fixes by itself.
STUCK_WAITING = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
                 "CreateContainerError")  # fmt: skip


def _condition(obj: dict, ctype: str) -> dict | None:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c.get("type") == ctype), None)


def _disruption_of(pod: dict) -> AttemptOutcome | None:
    """The control plane's DisruptionTarget condition: preemption, eviction, taint manager, drain, node shutdown."""
    if (c := _condition(pod, DISRUPTION_TARGET)) and c.get("status") == "True":
        message = f"pod {pod['metadata']['name']}: {c.get('message') or c.get('reason') or 'disrupted'}"
        return AttemptOutcome("failed", c.get("reason") or DISRUPTION_TARGET, message[:1000], disrupted=True)
    return None


def _failure_of(pod: dict) -> AttemptOutcome:
    """Reason for a failed pod: OOMKilled, the trainer's own reason from its termination message, or the exit code.

    The trainer's exit code is read from its termination message, not from the container: in a pod the container
    runs torchrun, which exits 1 whatever its workers exited with, so a permanent error (3: bad data) would otherwise
    look retryable and burn every retry."""
    for cs in pod.get("status", {}).get("containerStatuses") or []:
        term = (cs.get("state") or {}).get("terminated")
        if not term or term.get("exitCode", 0) == 0:
            continue
        code, reason, message = term.get("exitCode"), term.get("reason") or "Error", term.get("message") or ""
        if record := TerminationRecord.loads(message):  # else the kubelet's fallback: the log's tail
            reason, message = record.reason, record.message
            code = record.exit_code or code
        permanent = code in {c.value for c in ExitCode if c.permanent}
        if reason == "OOMKilled":
            message = message or "the container ran out of memory; lower microBatchSize or use a higher zeroStage"
        return AttemptOutcome("failed", reason, message[:1000], code, permanent)
    status = pod.get("status", {})
    return AttemptOutcome("failed", status.get("reason") or "PodFailed", status.get("message", "")[:1000])


def _adapter_of(pods: list[dict]) -> AdapterRef | None:
    """The published adapter, as rank 0's trainer reported it in its termination message."""
    for pod in pods:
        for cs in pod.get("status", {}).get("containerStatuses") or []:
            message = ((cs.get("state") or {}).get("terminated") or {}).get("message") or ""
            if (record := TerminationRecord.loads(message)) and record.adapter:
                return record.adapter
    return None


def _is_true(obj: dict, ctype: str) -> bool:
    return (c := _condition(obj, ctype)) is not None and c.get("status") == "True"


def _admission_of(job: dict, workload: dict | None) -> AttemptOutcome:
    """A Job held suspended by Kueue: the operator suspends a Job only for Kueue (runPolicy.queueName; the user's
    runPolicy.suspend deletes the Job instead), and Kueue unsuspends it once the whole gang fits the ClusterQueue's
    quota, or suspends it again to preempt it."""
    queue = job["metadata"].get("labels", {}).get(KUEUE_QUEUE_LABEL, "")
    if workload is None:  # Kueue makes one within a second of the Job's creation when it runs and manages Jobs
        return AttemptOutcome("pending", WAITING_FOR_KUEUE, f"Job {job['metadata']['name']} is suspended for "
                              f"LocalQueue {queue!r} but Kueue has no Workload for it: is Kueue running, and does it "
                              "manage batch/job? (runPolicy.pendingTimeoutSeconds bounds the wait)")  # fmt: skip
    # Evicted first: a preempted Workload still holds its quota until its pods are gone.
    evicted = _condition(workload, "Evicted") if _is_true(workload, "Evicted") else None
    if evicted is None and _is_true(workload, "QuotaReserved"):  # admitted: Kueue unsuspends the Job in a moment
        return AttemptOutcome("pending", PODS_STARTING, f"admitted by Kueue (LocalQueue {queue!r})")
    eviction = f"{evicted.get('reason') or 'Evicted'}: {evicted.get('message', '')}" if evicted else ""
    reserved = _condition(workload, "QuotaReserved") or {}
    why = (reserved.get("message") if reserved.get("status") == "False" else "") or eviction or "waiting for quota"
    return AttemptOutcome("queued", QUEUED, f"LocalQueue {queue!r}: {why}"[:1000], evicted=eviction[:1000])


def kueue_recheck_after(job: dict, workload: dict | None, now: datetime, longest: float) -> float | None:
    """Seconds until a Job held by Kueue should be looked at again while Kueue has not yet said anything about it
    (no Workload yet, or one it has not tried to admit): nothing the operator watches changes when Kueue does, so
    without this the reason would wait for the next refresh. Half the Job's age, between 1 s and `longest`: quick
    while Kueue normally answers (about a second), rare for a Workload it never tries (behind a StrictFIFO head).
    None once Kueue has decided."""
    if workload is not None and (_condition(workload, "QuotaReserved") or _is_true(workload, "Evicted")):
        return None
    created = job["metadata"].get("creationTimestamp")
    age = (now - datetime.fromisoformat(created)).total_seconds() if created else 0.0
    return min(longest, max(1.0, age / 2))


def observe_attempt(job: dict | None, pods: list[dict], failed_create: str = "",
                    workload: dict | None = None) -> AttemptOutcome:  # fmt: skip
    """`failed_create`: the message of the Job controller's latest FailedCreate event for this Job (a ResourceQuota or
    an admission webhook refused its pods), if it has fewer pods than it wants. `workload`: Kueue's Workload of a
    suspended Job (read only then)."""
    if job is None:
        return AttemptOutcome("none")
    finished = _is_true(job, "Failed") or _is_true(job, "Complete")
    if (job.get("spec") or {}).get("suspend") and not finished:
        return _admission_of(job, workload)
    failed_pods = sorted((p for p in pods if p.get("status", {}).get("phase") == "Failed"),
                         key=lambda p: p["metadata"]["name"])  # fmt: skip
    if KUEUE_QUEUE_LABEL in (job.get("metadata") or {}).get("labels", {}) and not finished:
        # Pods the Job controller deleted when Kueue suspended the Job end Failed (SIGTERM) and may linger a moment
        # after Kueue admits it again; they are not failures (the Job does not count them either).
        failed_pods = [p for p in failed_pods if not p["metadata"].get("deletionTimestamp") or _disruption_of(p)]
    if failed_pods:
        # A rank's own permanent error wins (retrying cannot help); then a disruption of any rank (its peers fail
        # too once it is gone, with errors that say nothing of why); then the first rank's failure.
        failures = [_failure_of(p) for p in failed_pods]
        disruptions = [d for p in failed_pods if (d := _disruption_of(p))]
        return next((f for f in failures if f.permanent), None) or (disruptions or failures)[0]
    if (c := _condition(job, "Failed")) and c.get("status") == "True":
        reason, message = c.get("reason") or "JobFailed", c.get("message", "")
        disrupted = reason == POD_FAILURE_POLICY and DISRUPTION_TARGET in message
        return AttemptOutcome("failed", DISRUPTION_TARGET if disrupted else reason, message, disrupted=disrupted)
    if (c := _condition(job, "Complete")) and c.get("status") == "True":
        return AttemptOutcome("succeeded", adapter=_adapter_of(pods))
    for pod in pods:
        sched = _condition(pod, "PodScheduled")
        if sched and sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
            return AttemptOutcome("pending", "Unschedulable", sched.get("message", ""))
    # Succeeded pods count as running until the Job controller marks the whole Job complete.
    running = [p for p in pods if p.get("status", {}).get("phase") in ("Running", "Succeeded")]
    nodes = job.get("spec", {}).get("parallelism", 1)
    if len(running) >= nodes:
        return AttemptOutcome("running")
    if failed_create and len(pods) < nodes:
        return AttemptOutcome("pending", "FailedCreate", failed_create[:1000])
    waiting = [
        (cs.get("state") or {}).get("waiting", {})
        for p in pods
        for cs in p.get("status", {}).get("containerStatuses") or []
    ]
    bad = [w for w in waiting if w.get("reason") in STUCK_WAITING]
    if bad:
        return AttemptOutcome("pending", bad[0]["reason"], bad[0].get("message", ""))
    return AttemptOutcome("pending", PODS_STARTING, f"{len(running)}/{nodes} pods running", running=len(running))


@dataclass
class Plan:
    status: LoRAFineTuneStatus
    create_attempt: int | None = None  # create this attempt's Job (and the Service and NetworkPolicy it needs)
    delete_job: int | None = None  # delete this attempt's Job (its pods get SIGTERM and checkpoint)
    delete_children: bool = False  # TTL: remove every child, keep the LoRAFineTune
    requeue_after: float | None = None
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (Normal|Warning, reason, message)


def _copy(status: LoRAFineTuneStatus) -> LoRAFineTuneStatus:
    """A copy the planner may change without touching `status` (the caller's, maybe cached): the planner assigns
    fields and changes conditions in place (set_condition), nothing else, so the conditions are copied one level and
    the rest shared. A deep copy was a tenth of the operator's CPU time with 1,000 runs live."""
    return status.model_copy(update={"conditions": [c.model_copy() for c in status.conditions]})


def set_condition(status: LoRAFineTuneStatus, ctype: str, true: bool, reason: str, message: str, now: datetime,
                  generation: int | None) -> None:  # fmt: skip
    """Set one condition; lastTransitionTime changes only when the status flips."""
    value: Literal["True", "False"] = "True" if true else "False"
    for c in status.conditions:
        if c.type == ctype:
            if c.status != value:
                c.last_transition_time = now
            c.status, c.reason, c.message, c.observed_generation = value, reason, message, generation
            return
    status.conditions.append(Condition(type=ctype, status=value, reason=reason, message=message,
                                       last_transition_time=now, observed_generation=generation))  # fmt: skip


def _phase(plan: Plan, phase: Phase, reason: str, message: str, now: datetime, gen: int | None) -> None:
    s = plan.status
    if s.phase != phase:
        kind = "Warning" if phase in ("Failed", "Retrying") else "Normal"
        plan.events.append((kind, reason, message or phase))
    s.phase = phase
    for ctype in CONDITION_TYPES:
        holds = phase == ("Running" if ctype == "Ready" else ctype)
        if holds or (ctype == "Ready" and phase in ("Pending", "Queued")):
            set_condition(s, ctype, holds, reason, message, now, gen)
        else:  # a condition that does not hold says which phase holds instead
            set_condition(s, ctype, False, phase, "", now, gen)


def plan(spec: LoRAFineTuneSpec, current: LoRAFineTuneStatus, outcome: AttemptOutcome, now: datetime,
         settings: OperatorSettings, generation: int | None = None, active_pods: int = 0,
         warning: tuple[str, str] | None = None) -> Plan:  # fmt: skip
    """Decide the next status and actions. Safe to call again with the same inputs (converges).

    `active_pods`: this fine-tune's pods still Pending or Running, of any attempt. A new attempt waits until there
    are none: pods of a failed or suspended attempt may still be writing a checkpoint in their termination grace,
    and two attempts must never write the same run folder at once.
    `warning`: (reason, message) of a preflight doubt that does not stop the attempt (no node has enough GPUs now:
    a cluster autoscaler adds one only when it sees pods that need it); said when the attempt is created.

    `requeue_after` says when the clock alone changes the decision (a backoff expiring, a deadline passing): a live
    run otherwise waits for an event of its Job or pods, not for a timer."""
    p = _decide(spec, current, outcome, now, settings, generation, active_pods, warning)
    s, rp = p.status, spec.run_policy
    if s.phase in FINISHED or s.phase == "Suspended":
        return p
    deadlines = [s.start_time + timedelta(seconds=rp.active_deadline_seconds)
                 if rp.active_deadline_seconds and s.start_time else None,
                 s.pending_since + timedelta(seconds=rp.pending_timeout_seconds)
                 if s.phase == "Pending" and s.pending_since else None]  # fmt: skip
    for due in filter(None, deadlines):
        # A moment past it, so that the reconcile then finds it passed (never a busy loop at 0 s)
        after = max((due - now).total_seconds(), 0.0) + DEADLINE_MARGIN_SECONDS
        p.requeue_after = after if p.requeue_after is None else min(p.requeue_after, after)
    return p


DEADLINE_MARGIN_SECONDS = 0.05


def _decide(spec: LoRAFineTuneSpec, current: LoRAFineTuneStatus, outcome: AttemptOutcome, now: datetime,
            settings: OperatorSettings, generation: int | None, active_pods: int,
            warning: tuple[str, str] | None) -> Plan:  # fmt: skip
    p = Plan(status=_copy(current))
    s, rp = p.status, spec.run_policy
    s.observed_generation = generation

    # 1. Finished runs only wait for their TTL, and delete their children once.
    if s.phase in FINISHED:
        due = ttl_due(rp.ttl_seconds_after_finished, s.completion_time, s.children_deleted_time is not None)
        if due is not None and now >= due:
            p.delete_children, s.children_deleted_time = True, now
        elif due is not None:
            p.requeue_after = (due - now).total_seconds()
        return p

    # 2. Deadline over the whole run, across attempts.
    if rp.active_deadline_seconds and s.start_time:
        if now - s.start_time >= timedelta(seconds=rp.active_deadline_seconds):
            p.delete_job = s.attempt if outcome.state in LIVE else None
            msg = f"the run exceeded runPolicy.activeDeadlineSeconds ({rp.active_deadline_seconds} s)"
            s.last_failure = Failure(attempt=s.attempt, reason="DeadlineExceeded", message=msg, permanent=True)
            s.completion_time = now
            _phase(p, "Failed", "DeadlineExceeded", msg, now, generation)
            return p

    # 3. Suspension: stop the running attempt (pods get SIGTERM and checkpoint); resume with a new attempt.
    if rp.suspend:
        if outcome.state in LIVE:
            p.delete_job = s.attempt
        s.next_attempt_time = None
        _phase(p, "Suspended", "Suspended", "runPolicy.suspend is true; the next attempt resumes from the last "
               "checkpoint", now, generation)  # fmt: skip
        return p

    # 4. Start an attempt: the first, the next one once the backoff expired, the one after a suspension, or the
    #    current one again if its Job vanished (deterministic names make "already exists" harmless).
    if s.phase == "Retrying" or (s.phase == "Pending" and _stopping(s)):
        if s.next_attempt_time and now < s.next_attempt_time:
            p.requeue_after = (s.next_attempt_time - now).total_seconds()
            return p
        return _start_attempt(p, s.attempt + 1, now, generation, active_pods)
    if s.phase == "Suspended":
        return _start_attempt(p, s.attempt + 1, now, generation, active_pods, warning)
    if outcome.state == "none":
        return _start_attempt(p, max(s.attempt, 1), now, generation, active_pods, warning)

    if outcome.state == "queued":
        return _queued(p, spec, outcome, now, generation)
    if outcome.state == "pending" and s.pending_since is None:
        s.pending_since = now  # an attempt created before this field existed: count from now
    if outcome.state == "pending" and _pending_too_long(s, rp.pending_timeout_seconds, now):
        # Give the pods back (GPUs held by the ranks that did start) and count a failed attempt naming the cause.
        p.delete_job = s.attempt
        cause = outcome.reason + (f": {outcome.message}" if outcome.message else "")
        waited = f"runPolicy.pendingTimeoutSeconds ({rp.pending_timeout_seconds} s)"
        outcome = AttemptOutcome("failed", "PendingTimeout", f"pods not all running after {waited}: {cause}")
    if outcome.state == "pending":
        before = next((c.reason for c in s.conditions if c.type == "Ready"), None)
        if before == ATTEMPT_CREATED and outcome.reason == PODS_STARTING and not outcome.running:
            # Nothing new to say yet: the attempt was created and none of its pods runs. Said once one does (or
            # something holds them back): in a burst of 500 new runs this patch and event were a third of the
            # writes to the fine-tunes, which every watcher of them must then be sent.
            return p
        reason = outcome.reason or "Pending"
        _phase(p, "Pending", reason, outcome.message, now, generation)
        p.events.clear()  # one event per new reason for waiting, not one per tick
        if reason != before:
            kind = "Normal" if reason == PODS_STARTING else "Warning"
            p.events.append((kind, reason, outcome.message or "waiting"))
        return p
    if outcome.state == "running":
        s.pending_since = None
        _phase(p, "Running", "AllPodsRunning", f"attempt {s.attempt}: all pods running", now, generation)
        return p
    if outcome.state == "succeeded":
        s.completion_time = s.completion_time or now
        if outcome.adapter:
            s.adapter = outcome.adapter
        _phase(p, "Succeeded", "TrainingComplete", "the adapter is published", now, generation)
        return p

    s.pending_since = None
    if outcome.disrupted:
        return _disrupted(p, spec, outcome, now, settings, generation)
    # 5. The attempt failed: retry the whole gang with backoff, unless retrying cannot help.
    s.failed_attempts += 1
    s.last_failure = Failure(attempt=s.attempt, reason=outcome.reason, message=outcome.message,
                             exit_code=outcome.exit_code, permanent=outcome.permanent)  # fmt: skip
    detail = f"attempt {s.attempt} failed: {outcome.reason}" + (f": {outcome.message}" if outcome.message else "")
    if outcome.permanent:
        s.completion_time = now
        _phase(p, "Failed", outcome.reason or "PermanentFailure", f"{detail} (not retried: fix the spec)", now,
               generation)  # fmt: skip
    elif s.failed_attempts > rp.backoff_limit:
        s.completion_time = now
        _phase(p, "Failed", "BackoffLimitExceeded", f"{detail} (retries exhausted: backoffLimit "
               f"{rp.backoff_limit})", now, generation)  # fmt: skip
    else:
        delay = settings.backoff_seconds(s.failed_attempts)
        s.next_attempt_time = now + timedelta(seconds=delay)
        p.requeue_after = delay
        _phase(p, "Retrying", outcome.reason or "AttemptFailed", f"{detail}; retrying in {delay:.0f} s", now,
               generation)  # fmt: skip
    return p


def plan_invalid(current: LoRAFineTuneStatus, problems: list[str], now: datetime,
                 generation: int | None = None) -> Plan:  # fmt: skip
    """A spec the operator cannot run although the API server stored it: Failed at once with reason InvalidSpec and
    every problem, written as `lorafinetune validate` writes them. Converges: a second call changes nothing."""
    p = Plan(status=_copy(current))
    s = p.status
    s.observed_generation = generation
    if s.phase == "Failed" and s.last_failure and s.last_failure.reason == INVALID_SPEC:
        return p
    message = "invalid spec: " + "; ".join(problems) + " (fix it in a new LoRAFineTune: the spec is immutable)"
    s.last_failure = Failure(attempt=s.attempt, reason=INVALID_SPEC, message=message, permanent=True)
    s.completion_time = now
    _phase(p, "Failed", INVALID_SPEC, message, now, generation)
    return p


FINISHED = ("Succeeded", "Failed")


def ttl_due(ttl: int | None, completion_time: datetime | None, children_deleted: bool) -> datetime | None:
    """When runPolicy.ttlSecondsAfterFinished deletes a finished run's children; None if never (again)."""
    if ttl is None or completion_time is None or children_deleted:
        return None
    return completion_time + timedelta(seconds=ttl)


def _disrupted(p: Plan, spec: LoRAFineTuneSpec, outcome: AttemptOutcome, now: datetime, settings: OperatorSettings,
               generation: int | None) -> Plan:  # fmt: skip
    """Preemption, eviction, drain: not the run's fault, so a new attempt without touching backoffLimit, after the
    shortest backoff; bounded by runPolicy.disruptionLimit so that a run evicted over and over still ends."""
    s, limit = p.status, spec.run_policy.disruption_limit
    s.disruptions += 1
    s.last_disruption = Failure(attempt=s.attempt, reason=outcome.reason, message=outcome.message)
    detail = f"attempt {s.attempt} was disrupted: {outcome.reason}"
    detail += f": {outcome.message}" if outcome.message else ""
    if s.disruptions > limit:
        s.completion_time = now
        _phase(p, "Failed", "DisruptionLimitExceeded", f"{detail} (disruptionLimit {limit} reached)", now, generation)
        return p
    delay = settings.backoff_seconds(1)
    s.next_attempt_time = now + timedelta(seconds=delay)
    p.requeue_after = delay
    _phase(p, "Retrying", "Disrupted", f"{detail}; not counted as a failure, new attempt in {delay:.0f} s", now,
           generation)  # fmt: skip
    return p


def _queued(p: Plan, spec: LoRAFineTuneSpec, outcome: AttemptOutcome, now: datetime,
            generation: int | None) -> Plan:  # fmt: skip
    """Kueue holds the attempt: no pods, no GPUs held, so the time in the queue is not pending time. A running attempt
    that Kueue suspends again was preempted (or evicted): its pods got SIGTERM and checkpointed, and the same Job
    resumes when Kueue admits it again; a disruption, not a failure."""
    s, limit = p.status, spec.run_policy.disruption_limit
    s.pending_since = None
    if s.phase == "Running":
        s.disruptions += 1
        cause = outcome.evicted or "Evicted: Kueue suspended the running Job"
        reason, _, message = cause.partition(": ")
        s.last_disruption = Failure(attempt=s.attempt, reason=reason, message=message)
        detail = f"attempt {s.attempt} was stopped by Kueue ({cause})"
        if s.disruptions > limit:
            p.delete_job, s.completion_time = s.attempt, now
            _phase(p, "Failed", "DisruptionLimitExceeded", f"{detail} (disruptionLimit {limit} reached)", now,
                   generation)  # fmt: skip
            return p
        _phase(p, "Queued", QUEUED, outcome.message, now, generation)
        p.events = [("Warning", reason, f"{detail}; not counted as a failure, it resumes from its last checkpoint "
                     "when Kueue admits it again")]  # fmt: skip
        return p
    _phase(p, "Queued", QUEUED, outcome.message, now, generation)
    return p


def _pending_too_long(s: LoRAFineTuneStatus, timeout: int, now: datetime) -> bool:
    return s.pending_since is not None and now - s.pending_since >= timedelta(seconds=timeout)


def plan_waiting(current: LoRAFineTuneStatus, reason: str, message: str, now: datetime,
                 generation: int | None = None) -> Plan:  # fmt: skip
    """Nothing can be done until something outside changes: the phase and attempt stay, the Ready condition says why,
    and the event is posted once per reason, not once per tick."""
    p = Plan(status=_copy(current))
    p.status.observed_generation = generation
    ready = next((c for c in p.status.conditions if c.type == "Ready"), None)
    if ready is None or ready.reason != reason:
        p.events.append(("Warning", reason, message))
    set_condition(p.status, "Ready", False, reason, message, now, generation)
    p.status.phase = p.status.phase or "Pending"
    return p


INVALID_SPEC = "InvalidSpec"
ATTEMPT_CREATED = "AttemptCreated"
PODS_STARTING = "PodsStarting"
QUEUED = "Queued"
WAITING_FOR_KUEUE = "WaitingForKueue"
NAME_IN_USE = "NameInUse"
STOPPING = "PreviousAttemptStopping"


def _stopping(s: LoRAFineTuneStatus) -> bool:
    return any(c.type == "Ready" and c.reason == STOPPING for c in s.conditions)


def _start_attempt(p: Plan, attempt: int, now: datetime, generation: int | None, active_pods: int = 0,
                   warning: tuple[str, str] | None = None) -> Plan:  # fmt: skip
    s = p.status
    if active_pods:
        waiting_already = _stopping(s)
        msg = (f"attempt {attempt} waits for {active_pods} pod(s) of the previous attempt to stop "
               "(they may be writing a checkpoint)")  # fmt: skip
        _phase(p, "Pending", STOPPING, msg, now, generation)
        p.events = [] if waiting_already else [("Normal", STOPPING, msg)]
        p.requeue_after = 2.0
        return p
    s.attempt, s.start_time, s.next_attempt_time, s.pending_since = attempt, s.start_time or now, None, now
    p.create_attempt = attempt
    why = "resumes from the last complete checkpoint" if attempt > 1 else "first attempt"
    _phase(p, "Pending", ATTEMPT_CREATED, f"attempt {attempt} created ({why})", now, generation)
    if warning:
        reason, message = warning
        set_condition(s, "Ready", False, reason, message, now, generation)
        p.events.append(("Warning", reason, message))
    return p


def as_patch(status: LoRAFineTuneStatus) -> dict[str, Any]:
    """The status as the API server stores it (camelCase, no unset fields)."""
    return status.model_dump(by_alias=True, mode="json", exclude_none=True)
