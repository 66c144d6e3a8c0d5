"""kopf handlers: thin. Each reads what exists, asks the pure planner what to do, does it, and writes status.

    python -m lorafinetune.operator          # or: kopf run -m lorafinetune.operator.handlers --all-namespaces

Every path is safe to run again: child names are deterministic, "already exists" is success, status is recomputed
from what is observed. So an operator restart at any point neither duplicates nor loses children.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
from pydantic import ValidationError

from lorafinetune.api.base import CLUSTER
from lorafinetune.api.manifest import GROUP, PLURAL, VERSION, describe_errors
from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.api.status import LoRAFineTuneStatus
from lorafinetune.operator import builders, kube
from lorafinetune.operator import progress as progress_reader
from lorafinetune.operator.clock import Clock
from lorafinetune.operator.metrics import OPERATOR_METRICS
from lorafinetune.operator.settings import OperatorSettings
from lorafinetune.operator.status import (
    FINISHED,
    NAME_IN_USE,
    AttemptOutcome,
    Plan,
    as_patch,
    observe_attempt,
    plan,
    plan_invalid,
    plan_waiting,
    ttl_due,
)

SETTINGS = OperatorSettings.from_env()
CLOCK = Clock()
log = logging.getLogger("lorafinetune.operator")
CRD_WAIT_SECONDS = 60  # a chart installs the CRD and the operator together; the CRD may take a moment to be served
_last_progress_poll: dict[str, float] = {}
_locks: dict[str, threading.Lock] = {}
_queued: set[str] = set()  # fine-tunes with a Job-event reconcile waiting for their lock
_queued_guard = threading.Lock()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Keep kopf's bookkeeping in annotations: our status schema is structural and owned by us.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="lorafinetune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="lorafinetune.io")
    # Only our own events (kopf.event) and warnings reach Kubernetes: "timer succeeded" every few seconds would
    # bury the transitions users look for in `kubectl describe`.
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 60
    # No runtime watch on every CRD and namespace of the cluster: we serve one resource, known at start, and the
    # chart's RBAC grants no access to CRDs. In exchange the CRD must exist before we start, checked here.
    settings.scanning.disabled = True
    # Watch only our Jobs (a server-side label selector), not every Job in the cluster.
    settings.watching.label_selectors["batch", "jobs"] = builders.LABEL_NAME
    kube.load_config()
    deadline = time.monotonic() + CRD_WAIT_SECONDS
    while not kube.resource_served():
        if time.monotonic() > deadline:
            raise kopf.PermanentError(
                f"the API server does not serve {PLURAL}.{GROUP}/{VERSION} after {CRD_WAIT_SECONDS} s: install the "
                "CRD (helm chart with crds.install=true, or kubectl apply -f crds/) and restart the operator"
            )
        time.sleep(2)
    OPERATOR_METRICS.serve(SETTINGS.metrics_port)
    CLOCK.start(lambda key: reconcile(*key.split("/", 1), "timer"))


@kopf.on.cleanup()
def stop_clock(**_: Any) -> None:
    CLOCK.stop()


def _preflight(owner: builders.Owner, spec: LoRAFineTuneSpec) -> tuple[str, str] | None:
    """Checks the CRD schema cannot express. Returns (reason, message) of the first problem, or None. A problem
    holds the run back (no pods) until it is fixed: the timer checks again."""
    for claim in builders.pvc_claims(spec):
        if not kube.pvc_exists(owner.namespace, claim):
            return "PVCNotFound", f"PersistentVolumeClaim {claim!r} does not exist in namespace {owner.namespace}"
    secrets = {"spec.s3.credentialsSecret": spec.s3.credentials_secret if spec.s3 else None,
               "spec.model.tokenSecret": spec.model.token_secret}  # fmt: skip
    for field, secret in secrets.items() if SETTINGS.secret_preflight else ():
        if secret and not kube.secret_exists(owner.namespace, secret):
            return "SecretNotFound", f"Secret {secret!r} ({field}) does not exist"
    return None


def _capacity_warning(spec: LoRAFineTuneSpec) -> tuple[str, str] | None:
    """No node has the GPUs a pod asks for right now. Only a warning: the Job is still created, because a cluster
    autoscaler adds a GPU node only for pods that need one; runPolicy.pendingTimeoutSeconds bounds the wait."""
    gpus = spec.resources.gpus_per_node
    if gpus and gpus > (most := kube.max_node_gpus()):
        return "InsufficientGPUs", (
            f"resources.gpusPerNode is {gpus} but no node has more than {most} allocatable nvidia.com/gpu now; "
            f"the pods wait for one (a cluster autoscaler may add it) for up to runPolicy.pendingTimeoutSeconds "
            f"({spec.run_policy.pending_timeout_seconds} s)"
        )
    return None


def _execute(owner: builders.Owner, spec: LoRAFineTuneSpec, p: Plan) -> None:
    if p.delete_job is not None:
        kube.delete("Job", owner.namespace, builders.job_name(owner.name, p.delete_job))
    if p.delete_children:
        children = [("ConfigMap", builders.config_map_name(owner.name)), ("Service", owner.name)]
        for kind, name in children + ([("NetworkPolicy", owner.name)] if SETTINGS.network_policy else []):
            kube.delete(kind, owner.namespace, name)
        for attempt in range(1, p.status.attempt + 1):
            kube.delete("Job", owner.namespace, builders.job_name(owner.name, attempt))
    if p.create_attempt is not None:
        kube.create(builders.build_config_map(owner, spec), refresh_data=True)  # mutable fields reach this attempt
        kube.create(builders.build_service(owner, SETTINGS))
        if SETTINGS.network_policy:  # before the pods: no moment without it
            kube.create(builders.build_network_policy(owner, SETTINGS))
        if kube.create(builders.build_job(owner, spec, p.create_attempt, SETTINGS)):
            OPERATOR_METRICS.attempts.inc()


def _poll_progress(owner: builders.Owner, status: LoRAFineTuneStatus) -> None:
    key = f"{owner.namespace}/{owner.name}"
    now = time.monotonic()
    if now - _last_progress_poll.get(key, 0.0) < SETTINGS.progress_interval_seconds:
        return
    _last_progress_poll[key] = now
    address = builders.master_address(owner, status.attempt)
    fresh = progress_reader.fetch(address, SETTINGS.trainer_metrics_port, status.progress)
    if fresh is not None:
        status.progress = fresh


def _plan_and_act(owner: builders.Owner, spec: LoRAFineTuneSpec, current: LoRAFineTuneStatus, now: datetime,
                  generation: int | None) -> Plan:  # fmt: skip
    namespace, name = owner.namespace, owner.name
    if current.phase in FINISHED:  # only the TTL is left to decide: nothing to read
        p = plan(spec, current, AttemptOutcome("none"), now, SETTINGS, generation)
        _execute(owner, spec, p)
        return p
    first = current.attempt == 0 and not spec.run_policy.suspend
    problem = _preflight(owner, spec) if first else None
    if problem is not None:  # no pods until it is fixed; the timer checks again
        return plan(spec, current, AttemptOutcome("pending", *problem), now, SETTINGS, generation)
    job = kube.read_job(namespace, builders.job_name(name, current.attempt)) if current.attempt else None
    # Listed before the first attempt too: pods of a deleted fine-tune of the same name may still be writing the
    # same output in their termination grace, and the first attempt waits for them as for a previous attempt's.
    every_pod = kube.list_pods(namespace, name)
    pods = [pod for pod in every_pod if _attempt_of(pod) == current.attempt] if job else []
    active = sum(_may_still_write(pod, now) for pod in every_pod)
    # Fewer pods than the Job wants: ask the Job's events why (only then: it costs a list call)
    missing = (
        job is not None
        and len(pods) < job["spec"].get("parallelism", 1)
        and not (job.get("status") or {}).get("conditions")
    )
    queued = job is not None and bool(job["spec"].get("suspend"))  # held by Kueue: its Workload says why
    outcome = observe_attempt(job, pods, failed_create=kube.failed_create_message(job) if missing else "",
                              workload=kube.read_workload(job) if queued else None)  # fmt: skip
    warning = _capacity_warning(spec) if first else None
    p = plan(spec, current, outcome, now, SETTINGS, generation, active_pods=active, warning=warning)
    try:
        _execute(owner, spec, p)
    except kube.OwnedByAnother as conflict:  # wait for garbage collection (or a person) to free the name
        return plan_waiting(current, NAME_IN_USE, f"{conflict}; waiting for it to be deleted", now, generation)
    if p.status.phase == "Running":
        _poll_progress(owner, p.status)
    return p


def _may_still_write(pod: dict[str, Any], now: datetime) -> bool:
    """Whether a pod may still be writing the run folder: Pending or Running, unless it is Terminating long past its
    grace period, which no live kubelet allows: its node is lost (NotReady, partitioned, gone)."""
    if pod.get("status", {}).get("phase") not in ("Pending", "Running"):
        return False
    deleted = pod["metadata"].get("deletionTimestamp")  # when deleted, plus the grace period
    return not deleted or now - datetime.fromisoformat(deleted) < timedelta(seconds=SETTINGS.lost_pod_seconds)


def _attempt_of(pod: dict[str, Any]) -> int:
    return int(pod["metadata"].get("labels", {}).get(builders.LABEL_ATTEMPT, "0"))


def reconcile(namespace: str, name: str, handler: str) -> None:
    """Converge one fine-tune. Serialised per object and run on a fresh read, because change events and the
    clock fire independently and a stale copy would plan the same transition twice."""
    key = f"{namespace}/{name}"
    with _locks.setdefault(key, threading.Lock()), OPERATOR_METRICS.observe(handler):
        with _queued_guard:
            _queued.discard(key)  # from here on, a new Job event needs a new reconcile: this one may read too early
        CLOCK.schedule(key, SETTINGS.reconcile_interval_seconds)  # until this one says otherwise (also if it raises)
        body = kube.read_fine_tune(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            CLOCK.schedule(key, None)
            return
        meta = body["metadata"]
        owner = builders.Owner(meta["name"], meta["namespace"], meta["uid"])
        current = LoRAFineTuneStatus.model_validate(body.get("status") or {})
        now, generation = datetime.now(UTC), meta.get("generation")
        ttl = None
        try:
            spec = LoRAFineTuneSpec.model_validate(body["spec"], context={CLUSTER: True})
        except ValidationError as err:  # what the CRD let through but the models refuse: say so, never hang
            p = plan_invalid(current, [f"spec.{line}" for line in describe_errors(err)], now, generation)
        else:
            p, ttl = _plan_and_act(owner, spec, current, now, generation), spec.run_policy.ttl_seconds_after_finished
        new = as_patch(p.status)
        old = body.get("status") or {}
        if new != old:
            patch = {key: new.get(key) for key in set(old) | set(new) if old.get(key) != new.get(key)}
            if not kube.patch_status(namespace, name, meta["resourceVersion"], patch):
                CLOCK.schedule(key, 1.0)  # changed meanwhile: reconcile again from the new state
                return
        CLOCK.schedule(key, _next_tick(p, ttl, now))
        for kind, reason, message in p.events:
            kube.post_event(body, kind, reason, message[:1000])
            log.log(logging.WARNING if kind == "Warning" else logging.INFO, "%s: %s: %s", key, reason, message,
                    extra={"namespace": namespace, "finetune": name, "reason": reason})  # fmt: skip
        OPERATOR_METRICS.set_phase(f"{namespace}/{name}", p.status.phase)


def _next_tick(p: Plan, ttl: int | None, now: datetime) -> float | None:
    """Live runs: every reconcile interval, sooner if the plan asks. Finished runs: only when the TTL is due."""
    s = p.status
    if s.phase in FINISHED:
        due = ttl_due(ttl, s.completion_time, s.children_deleted_time is not None)
        return None if due is None else (due - now).total_seconds()
    if p.requeue_after is not None:
        return min(p.requeue_after, SETTINGS.reconcile_interval_seconds)
    return SETTINGS.reconcile_interval_seconds


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def on_change(namespace: str, name: str, **_: Any) -> None:
    reconcile(namespace, name, "change")


def on_job_event(namespace: str, labels: dict[str, str], **_: Any) -> None:
    """One of our Jobs changed: reconcile its fine-tune now rather than at the next tick. A burst of events (every
    pod of a gang starting) coalesces into one waiting reconcile, which reads the newest state when it runs."""
    key = f"{namespace}/{labels[builders.LABEL_NAME]}"
    with _queued_guard:
        if key in _queued:
            return
        _queued.add(key)
    reconcile(namespace, labels[builders.LABEL_NAME], "job-event")


if SETTINGS.watch_jobs:
    kopf.on.event("batch", "v1", "jobs", labels={builders.LABEL_NAME: kopf.PRESENT})(on_job_event)


@kopf.on.event(GROUP, VERSION, PLURAL)
def on_deleted(event: kopf.RawEvent, meta: kopf.Meta, **_: Any) -> None:
    """The watch's DELETED event. Not kopf.on.delete: without a finalizer kopf never sees the object while it is
    being deleted, so that handler would never run. Children go by owner references (garbage collection); only our
    in-memory bookkeeping needs forgetting."""
    if event.get("type") != "DELETED":
        return
    key = f"{meta['namespace']}/{meta['name']}"
    _last_progress_poll.pop(key, None)
    _locks.pop(key, None)
    CLOCK.schedule(key, None)
    OPERATOR_METRICS.set_phase(key, None)
