"""The operator's handlers: thin. Each reconcile reads what exists, asks the pure planner what to do, does it, and
writes status (a new attempt's waits while a burst of new fine-tunes waits for Jobs: see _UNRECORDED).

    python -m lorafinetune.operator          # or: kopf run -m lorafinetune.operator.handlers --all-namespaces

kopf runs the process: its start (caches filled before any reconcile), its liveness probe and its clean stop. The
operator's own informers (informer.py) watch the LoRAFineTunes, its Jobs and pods (by label), the PVCs and the nodes:
kopf's watch delivered a new fine-tune through its asyncio loop, which in a burst waited for the GIL behind the
workers and informer threads (see benchmarks/README). Every change, and the clock, puts the fine-tune's key on one
work queue (workqueue.py), whose workers reconcile it from those caches: a reconcile makes no read request, only the
writes its plan needs.

Every path is safe to run again: child names are deterministic, "already exists" is success, status is recomputed
from what is observed and patched only if this reconcile saw its newest version (resourceVersion). So an operator
restart at any point neither duplicates nor loses children.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
from pydantic import ValidationError

from lorafinetune.api.base import CLUSTER
from lorafinetune.api.manifest import GROUP, PLURAL, VERSION, describe_errors
from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.api.status import LoRAFineTuneStatus
from lorafinetune.operator import builders, fit, kube
from lorafinetune.operator import progress as progress_reader
from lorafinetune.operator.events import EVENT_BURST, EventSender, TokenBucket
from lorafinetune.operator.informer import Informer, PerNamespace, by_label, wait_synced
from lorafinetune.operator.metrics import OPERATOR_METRICS
from lorafinetune.operator.settings import OperatorSettings
from lorafinetune.operator.status import (
    FINISHED,
    NAME_IN_USE,
    AttemptOutcome,
    Plan,
    as_patch,
    kueue_recheck_after,
    observe_attempt,
    plan,
    plan_invalid,
    plan_waiting,
    ttl_due,
)
from lorafinetune.operator.workqueue import WorkQueue

SETTINGS = OperatorSettings.from_env()
QUEUE = WorkQueue(on_wait=OPERATOR_METRICS.waited)
EVENTS = EventSender(kube.post_event, on_drop=OPERATOR_METRICS.events_dropped.inc,
                     pace=TokenBucket(SETTINGS.events_per_second, EVENT_BURST))
log = logging.getLogger("lorafinetune.operator")
CRD_WAIT_SECONDS = 60  # a chart installs the CRD and the operator together; the CRD may take a moment to be served
SYNC_WAIT_SECONDS = 120  # the informers' first lists; no reconcile before (a half-filled cache would mislead it)
PROGRESS_THREADS = 4  # reads of trainers' metrics at once (each bounded by its timeout)
EXISTING_JOB_RECHECK_SECONDS = 1.0  # an attempt's Job found already created: how soon to read its pods' state
QUEUED_REFRESH_SECONDS = 60.0  # a run Kueue holds: admission comes as a Job event; this only refreshes the reason
# Fine-tunes seen without an attempt, by UID: when their first watch event came (monotonic), for the first-Job
# latency metric. Dropped when the Job is created, or when the first reconcile creates none (a preflight problem,
# suspended, an invalid spec: waiting for the user, not for the operator).
_FIRST_SEEN: dict[str, float] = {}
# A reconcile's second request in flight (the NetworkPolicy beside the Job): one thread per worker at most.
_ALONGSIDE = ThreadPoolExecutor(SETTINGS.workers, thread_name_prefix="lft-alongside")
_POLICY_GUARD = threading.Lock()  # held while a namespace's policy is written
_POLICY_REFUSED: set[str] = set()  # UIDs whose NetworkPolicy was refused: theirs is created before the Job
# Attempts this process created whose status is not written yet, by UID: the status last planned for them and when
# the attempt was created (monotonic). While other new fine-tunes wait for their Jobs (a burst of applies), a new
# attempt's status waits, up to RECORD_WAIT_SECONDS: every status patch is an event on every watch of the
# fine-tunes, the operator's own included, and in a burst of 500 those events queued ahead of the new fine-tunes'
# (a watch's p50 delivery of them was 0.5-0.9 s, against 0.1-0.2 s without; see benchmarks/README). Planned from
# memory meanwhile; lost with the process, which is safe: a restarted or new leader finds the Job "already ours" and
# records it then.
_UNRECORDED: dict[str, tuple[LoRAFineTuneStatus, float]] = {}
RECORD_WAIT_SECONDS = 10.0
RECORD_RECHECK_SECONDS = 0.5  # how soon a waiting status looks again whether the burst is over


def _enqueue_owner(source: str) -> Callable[[dict], None]:
    """An informer callback: a Job or pod of ours changed, so reconcile its fine-tune (named by our label)."""

    def enqueue(obj: dict) -> None:
        meta = obj.get("metadata") or {}
        if name := (meta.get("labels") or {}).get(builders.LABEL_NAME):
            QUEUE.add(f"{meta.get('namespace')}/{name}", source)

    return enqueue


def _on_fine_tune(body: dict[str, Any]) -> None:
    """A LoRAFineTune added or changed (the first list included): queue a reconcile. Not the echo of a status patch,
    which the reconcile that wrote it stored from the API server's answer, having planned from exactly this object and
    scheduled its next look: reconciling again would change nothing (in a burst these echoes were a quarter of all
    reconciles). The informer calls this only for versions it did not hold yet."""
    meta = body["metadata"]
    # A fine-tune without an attempt yet is waiting for its Job: first in line (see workqueue.py).
    new = not (body.get("status") or {}).get("attempt")
    if new:
        _FIRST_SEEN.setdefault(meta["uid"], time.monotonic())
    QUEUE.add(f"{meta['namespace']}/{meta['name']}", "change", new=new)


def _on_fine_tune_deleted(body: dict[str, Any]) -> None:
    """Children go by owner references (the LoRAFineTune has no finalizer, so its deletion never waits for the
    operator); only the in-memory bookkeeping needs forgetting."""
    key = f"{body['metadata']['namespace']}/{body['metadata']['name']}"
    _forget_uid(body["metadata"].get("uid", ""))
    QUEUE.forget(key)
    with _WAITING_GUARD:
        for waiting in _WAITING_FOR_PVC.values():
            waiting.discard(key)
    PROGRESS.drop(key)
    OPERATOR_METRICS.set_phase(key, None)


# The caches, filled by the operator's own informers (kopf runs the process, not the watches): the LoRAFineTunes, and
# its Jobs and pods by the operator's label (server-side: not every pod of the cluster).
FINE_TUNES = PerNamespace(lambda ns: Informer(f"lorafinetunes in {ns or 'all namespaces'}", kube.fine_tune_lister(ns),
                                              on_change=_on_fine_tune, on_delete=_on_fine_tune_deleted,
                                              count=lambda verb: kube.count(verb, PLURAL)),
                          SETTINGS.namespaces)  # fmt: skip
JOBS = PerNamespace(lambda ns: Informer(f"jobs in {ns or 'all namespaces'}", kube.job_lister(ns),
                                        label_selector=builders.LABEL_NAME, index_by=by_label(builders.LABEL_NAME),
                                        on_change=_enqueue_owner("job-event"),
                                        count=lambda verb: kube.count(verb, "jobs")), SETTINGS.namespaces)  # fmt: skip
PODS = PerNamespace(lambda ns: Informer(f"pods in {ns or 'all namespaces'}", kube.pod_lister(ns),
                                        label_selector=builders.LABEL_NAME, index_by=by_label(builders.LABEL_NAME),
                                        on_change=_enqueue_owner("pod-event"),
                                        count=lambda verb: kube.count(verb, "pods")), SETTINGS.namespaces)  # fmt: skip
NODES = Informer("nodes", kube.node_lister(), count=lambda verb: kube.count(verb, "nodes"))
# Every PVC of the namespaces served (they are few beside pods): the preflight reads them here, and a run held back
# for a claim that does not exist yet is woken when it appears, not by the next tick.
_WAITING_FOR_PVC: dict[tuple[str, str], set[str]] = {}  # (namespace, claim) -> keys of the fine-tunes waiting
_WAITING_GUARD = threading.Lock()


def _wake_waiting_for(pvc: dict) -> None:
    meta = pvc.get("metadata") or {}
    with _WAITING_GUARD:
        keys = _WAITING_FOR_PVC.pop((meta.get("namespace", ""), meta.get("name", "")), set())
    for key in keys:
        QUEUE.add(key, "pvc-event")


PVCS = PerNamespace(lambda ns: Informer(f"persistentvolumeclaims in {ns or 'all namespaces'}", kube.pvc_lister(ns),
                                        on_change=_wake_waiting_for,
                                        count=lambda verb: kube.count(verb, "persistentvolumeclaims")),
                    SETTINGS.namespaces)  # fmt: skip


def _enqueue_job_owner(event: dict) -> None:
    """A FailedCreate event: reconcile the fine-tune of that Job, if it is one of ours."""
    involved = event.get("involvedObject") or {}
    job = JOBS.get(involved.get("namespace", ""), involved.get("name", ""))  # the cache holds only our Jobs
    if job is not None and job["metadata"].get("uid") == involved.get("uid"):
        _enqueue_owner("failed-create-event")(job)


# Why a Job has fewer pods than it wants, by Job UID (a Job of the same name deleted earlier has its own events).
FAILED_CREATES = PerNamespace(lambda ns: Informer(f"FailedCreate events in {ns or 'all namespaces'}",
                                                  kube.event_lister(ns), field_selector=kube.FAILED_CREATE_EVENTS,
                                                  index_by=lambda event: event["involvedObject"].get("uid"),
                                                  on_change=_enqueue_job_owner,
                                                  count=lambda verb: kube.count(verb, "events")),
                              SETTINGS.namespaces)  # fmt: skip
# The namespaces' lorafinetune.trainers policies (one each, so a tiny cache): a new attempt creates one only where it is
# missing or out of date, not one per fine-tune.
NAMESPACE_POLICIES = PerNamespace(lambda ns: Informer(f"networkpolicies in {ns or 'all namespaces'}",
                                                      kube.policy_lister(ns),
                                                      label_selector=f"{builders.LABEL_POLICY}=namespace",
                                                      count=lambda verb: kube.count(verb, "networkpolicies")),
                                  SETTINGS.namespaces)  # fmt: skip
# The fine-tunes last: none is reconciled before the others hold their first complete list (the queue starts then).
INFORMERS = [*JOBS.parts, *PODS.parts, *PVCS.parts, *FAILED_CREATES.parts, NODES,
             *(NAMESPACE_POLICIES.parts if SETTINGS.network_policy else []), *FINE_TUNES.parts]
PROGRESS = progress_reader.Poller(PROGRESS_THREADS, SETTINGS.progress_interval_seconds, SETTINGS.trainer_metrics_port,
                                  on_fresh=lambda key: QUEUE.add(key, "progress"))  # fmt: skip


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Only our own events and warnings reach Kubernetes: kopf's own would bury the transitions users look for.
    settings.posting.level = logging.WARNING
    # No runtime watch on every CRD and namespace of the cluster: we serve one resource, known at start, and the
    # chart's RBAC grants no access to CRDs. In exchange the CRD must exist before we start, checked here.
    settings.scanning.disabled = True
    kube.size_pool(SETTINGS.workers)
    kube.load_config()
    deadline = time.monotonic() + CRD_WAIT_SECONDS
    while not kube.resource_served():
        if time.monotonic() > deadline:
            raise kopf.PermanentError(
                f"the API server does not serve {PLURAL}.{GROUP}/{VERSION} after {CRD_WAIT_SECONDS} s: install the "
                "CRD (helm chart with crds.install=true, or kubectl apply -f crds/) and restart the operator"
            )
        time.sleep(2)
    OPERATOR_METRICS.serve(SETTINGS.metrics_port, QUEUE.depth, EVENTS.pending, lambda: len(_UNRECORDED))
    for informer in INFORMERS:
        informer.start()
    # No reconcile before every cache holds its first list: planned from half-filled caches, a running attempt would
    # look as if its Job were gone.
    if not wait_synced(INFORMERS, SYNC_WAIT_SECONDS):
        raise kopf.PermanentError(f"the Job, pod and node caches were not filled in {SYNC_WAIT_SECONDS} s")
    EVENTS.start()
    QUEUE.start(SETTINGS.workers, reconcile)


@kopf.on.cleanup()
def stop_workers(**_: Any) -> None:
    QUEUE.stop()
    EVENTS.stop()
    for informer in INFORMERS:
        informer.stop()


def _preflight(owner: builders.Owner, spec: LoRAFineTuneSpec) -> tuple[str, str] | None:
    """Checks the CRD schema cannot express. Returns (reason, message) of the first problem, or None. A problem
    holds the run back (no pods) until it is fixed: the timer checks again."""
    if (too_large := builders.config_too_large(owner, spec)) is not None:
        return "SpecTooLarge", too_large
    for claim in builders.pvc_claims(spec):
        # A claim the cache lacks is asked for once: it may be newer than the watch's last event.
        if PVCS.get(owner.namespace, claim) is None and not kube.pvc_exists(owner.namespace, claim):
            with _WAITING_GUARD:  # woken by the claim's watch event; the clock checks again anyway
                _WAITING_FOR_PVC.setdefault((owner.namespace, claim), set()).add(f"{owner.namespace}/{owner.name}")
            return "PVCNotFound", f"PersistentVolumeClaim {claim!r} does not exist in namespace {owner.namespace}"
    secrets = {"spec.s3.credentialsSecret": spec.s3.credentials_secret if spec.s3 else None,
               "spec.model.tokenSecret": spec.model.token_secret}  # fmt: skip
    for field, secret in secrets.items() if SETTINGS.secret_preflight else ():
        if secret and not kube.secret_exists(owner.namespace, secret):
            return "SecretNotFound", f"Secret {secret!r} ({field}) does not exist"
    return fit.wont_fit(spec, NODES.all(), SETTINGS.hub_endpoint)


def _capacity_warning(spec: LoRAFineTuneSpec) -> tuple[str, str] | None:
    """No node has the GPUs a pod asks for right now. Only a warning: the Job is still created, because a cluster
    autoscaler adds a GPU node only for pods that need one; runPolicy.pendingTimeoutSeconds bounds the wait."""
    gpus = spec.resources.gpus_per_node
    if gpus and gpus > (most := _max_node_gpus()):
        return "InsufficientGPUs", (
            f"resources.gpusPerNode is {gpus} but no node has more than {most} allocatable nvidia.com/gpu now; "
            f"the pods wait for one (a cluster autoscaler may add it) for up to runPolicy.pendingTimeoutSeconds "
            f"({spec.run_policy.pending_timeout_seconds} s)"
        )
    return None


def _max_node_gpus() -> int:
    return max((int((n.get("status", {}).get("allocatable") or {}).get("nvidia.com/gpu", "0")) for n in NODES.all()),
               default=0)  # fmt: skip


def _execute(owner: builders.Owner, spec: LoRAFineTuneSpec, p: Plan) -> None:
    if p.delete_job is not None:
        kube.delete("Job", owner.namespace, builders.job_name(owner.name, p.delete_job))
    if p.delete_children:
        # The Service whatever the gang's size: an earlier release made one for every fine-tune.
        for kind in ["Service"] + ["NetworkPolicy"] * SETTINGS.network_policy:
            kube.delete(kind, owner.namespace, owner.name)
        for attempt in range(1, p.status.attempt + 1):
            kube.delete("Job", owner.namespace, builders.job_name(owner.name, attempt))
    if p.create_attempt is not None:  # the Job carries the config: mutable fields as they are now reach this attempt
        gang = builders.needs_service(spec)  # several pods: a Service to rendezvous at, a policy of their own
        if gang:
            kube.create(builders.build_service(owner, SETTINGS))
        job = _create_job_with_policy(owner, builders.build_job(owner, spec, p.create_attempt, SETTINGS), gang)
        seen = _FIRST_SEEN.pop(owner.uid, None)  # kept while the creates fail: their retries count too
        if job is not None:
            JOBS.put(job)  # the next reconcile may run before the watch brings it
            OPERATOR_METRICS.attempts.inc()
            if seen is not None:
                OPERATOR_METRICS.first_job.observe(time.monotonic() - seen)
        else:  # ours already (created before a restart): no event will come for it, so look at its pods soon
            _soon(p, EXISTING_JOB_RECHECK_SECONDS)


def _create_job_with_policy(owner: builders.Owner, job: dict[str, Any], gang: bool) -> dict[str, Any] | None:
    """Create the attempt's Job once the namespace's policy is stored (from the cache: no request once it is), and a
    gang's own NetworkPolicy in the same moment as the Job: two requests in flight at once, not one answer waited for
    before the other is sent (in a burst of 500 new fine-tunes each answer took 0.2-0.3 s, and a worker held for both
    is a worker the next fine-tune waits for). The trade: the gang's pods could start before their policy is stored,
    unable to reach each other but reachable by nothing the namespace's policy does not admit. A gang policy the API
    server refuses takes a Job that has no policy down again (its pods, if any, get SIGTERM), and from then on that
    fine-tune's policy is created before its Job. The refusal is raised: the retry creates both."""
    if not SETTINGS.network_policy:
        return kube.create(job)
    _ensure_namespace_policy(owner.namespace)
    if not gang:
        return kube.create(job)
    policy, name = builders.build_gang_policy(owner), job["metadata"]["name"]
    if owner.uid in _POLICY_REFUSED:
        try:
            kube.create(policy)
        except Exception as err:
            if _refusal(err):  # a Job stored by a create whose answer never came, or whose delete failed
                _delete_if_ours(owner, name)
            raise
        _POLICY_REFUSED.discard(owner.uid)
        return kube.create(job)
    alongside = _ALONGSIDE.submit(kube.create, policy)
    created = None
    try:
        created = kube.create(job)
    finally:
        try:
            alongside.result()
        except Exception as err:
            _POLICY_REFUSED.add(owner.uid)
            if created is not None:
                kube.delete("Job", owner.namespace, name)
            elif _refusal(err):  # ours from before a restart, which died before it could delete it
                _delete_if_ours(owner, name)
            raise
    return created


def _ensure_namespace_policy(namespace: str) -> None:
    """The namespace's lorafinetune.trainers policy as the settings want it, before a Job whose pods it isolates:
    created where missing (deleted by someone, a new namespace), replaced where the metrics readers changed."""
    want = builders.build_namespace_policy(namespace, SETTINGS)
    if _policy_as_wanted(namespace, want):
        return
    with _POLICY_GUARD:  # a burst in a new namespace: one worker writes it, the others find it stored
        if _policy_as_wanted(namespace, want):
            return
        have = NAMESPACE_POLICIES.get(namespace, builders.NAMESPACE_POLICY)
        stored = kube.create(want) if have is None else kube.replace_policy(want, have["metadata"]["resourceVersion"])
        if stored is not None:
            NAMESPACE_POLICIES.put(stored)


def _policy_as_wanted(namespace: str, want: dict[str, Any]) -> bool:
    have = NAMESPACE_POLICIES.get(namespace, builders.NAMESPACE_POLICY)
    return have is not None and have.get("spec") == want["spec"]


def _refusal(err: Exception) -> bool:
    """The API server said no (a quota, an admission webhook, RBAC, an invalid object): not a timeout or a 5xx,
    after which the policy may well have been stored."""
    return isinstance(err, kube.ApiException) and 400 <= (err.status or 0) < 500 and err.status not in (409, 429)


def _delete_if_ours(owner: builders.Owner, name: str) -> None:
    """Delete the Job of that name if the cache says this fine-tune controls it (never somebody else's)."""
    job = JOBS.get(owner.namespace, name)
    if job is not None and kube.controller_uid(job) == owner.uid:
        kube.delete("Job", owner.namespace, name)


def _poll_progress(owner: builders.Owner, status: LoRAFineTuneStatus, pods: list[dict[str, Any]]) -> None:
    """Record the progress read since the last reconcile, and have rank 0's metrics read while it runs, at its pod's
    IP from the cache (no DNS lookup; a one-pod gang has no Service)."""
    key = f"{owner.namespace}/{owner.name}"
    if (fresh := PROGRESS.take(key)) is not None:
        status.progress = fresh
    if address := next((pod.get("status", {}).get("podIP") for pod in pods if _completion_index(pod) == "0"), None):
        PROGRESS.follow(key, address, status.progress)


def _plan_and_act(owner: builders.Owner, spec: LoRAFineTuneSpec, current: LoRAFineTuneStatus, now: datetime,
                  generation: int | None) -> Plan:  # fmt: skip
    namespace, name = owner.namespace, owner.name
    if current.phase in FINISHED:  # only the TTL is left to decide: nothing to read
        p = plan(spec, current, AttemptOutcome("none"), now, SETTINGS, generation)
        _execute(owner, spec, p)
        return p
    first = current.attempt == 0 and not spec.run_policy.suspend
    problem = _preflight(owner, spec) if first else None
    if problem is not None:  # no pods until it is fixed; the clock checks again (a Secret, a node's GPUs)
        p = plan(spec, current, AttemptOutcome("pending", *problem), now, SETTINGS, generation)
        return _soon(p, SETTINGS.reconcile_interval_seconds)
    job = JOBS.get(namespace, builders.job_name(name, current.attempt)) if current.attempt else None
    # Read before the first attempt too: pods of a deleted fine-tune of the same name may still be writing the
    # same output in their termination grace, and the first attempt waits for them as for a previous attempt's.
    every_pod = PODS.indexed(namespace, name)
    # This Job's own pods: by its UID, not only the attempt label (a Job of the same name deleted before, e.g. when
    # its NetworkPolicy was refused, may have left pods of that attempt terminating)
    pods = [pod for pod in every_pod if _job_uid(pod) == job["metadata"]["uid"]] if job else []
    active = sum(_may_still_write(pod, now) and not _of_unrecorded_attempt(pod, owner, current.attempt)
                 for pod in every_pod)  # fmt: skip
    # Fewer pods than the Job wants: the Job controller's FailedCreate events (from the cache) say why, if any.
    missing = (
        job is not None
        and len(pods) < job["spec"].get("parallelism", 1)
        and not (job.get("status") or {}).get("conditions")
    )
    queued = job is not None and bool(job["spec"].get("suspend"))  # held by Kueue: its Workload says why
    refusals = FAILED_CREATES.indexed(namespace, job["metadata"]["uid"]) if job is not None and missing else []
    failed_create = kube.newest_message(refusals)
    workload = kube.read_workload(job) if job is not None and queued else None
    outcome = observe_attempt(job, pods, failed_create=failed_create, workload=workload)
    warning = _capacity_warning(spec) if first else None
    p = plan(spec, current, outcome, now, SETTINGS, generation, active_pods=active, warning=warning)
    if job is not None and queued and (recheck := kueue_recheck_after(job, workload, now, QUEUED_REFRESH_SECONDS)):
        _soon(p, recheck)
    try:
        _execute(owner, spec, p)
    except kube.OwnedByAnother as conflict:  # wait for garbage collection (or a person) to free the name
        waiting = plan_waiting(current, NAME_IN_USE, f"{conflict}; waiting for it to be deleted", now, generation)
        return _soon(waiting, SETTINGS.reconcile_interval_seconds)  # a Service or policy: not watched
    if p.status.phase == "Running":
        _poll_progress(owner, p.status, pods)
    else:
        PROGRESS.drop(f"{namespace}/{name}")
    return p


def _soon(p: Plan, seconds: float) -> Plan:
    p.requeue_after = seconds if p.requeue_after is None else min(p.requeue_after, seconds)
    return p


def _may_still_write(pod: dict[str, Any], now: datetime) -> bool:
    """Whether a pod may still be writing the run folder: Pending or Running, unless it is Terminating long past its
    grace period, which no live kubelet allows: its node is lost (NotReady, partitioned, gone)."""
    if pod.get("status", {}).get("phase") not in ("Pending", "Running"):
        return False
    deleted = pod["metadata"].get("deletionTimestamp")  # when deleted, plus the grace period
    return not deleted or now - datetime.fromisoformat(deleted) < timedelta(seconds=SETTINGS.lost_pod_seconds)


def _of_unrecorded_attempt(pod: dict[str, Any], owner: builders.Owner, recorded: int) -> bool:
    """A pod of an attempt this fine-tune created after the attempt in its status: the operator stopped between
    creating that Job and recording it. That attempt is the one about to start, so these are its own pods, not a
    previous attempt's to wait for (which would wait forever). Only if its Job is controlled by this fine-tune's UID:
    a deleted fine-tune of the same name had Jobs of the same names."""
    if _attempt_of(pod) <= recorded:
        return False
    job_ref = next((r for r in pod["metadata"].get("ownerReferences") or [] if r.get("kind") == "Job"), None)
    job = JOBS.get(owner.namespace, job_ref["name"]) if job_ref else None
    # That very Job (by UID: one of the same name may have been deleted and created again), and ours
    return job is not None and job["metadata"].get("uid") == _job_uid(pod) and kube.controller_uid(job) == owner.uid


def _job_uid(pod: dict[str, Any]) -> str | None:
    """The UID of the Job that created the pod."""
    return next((r.get("uid") for r in pod["metadata"].get("ownerReferences") or [] if r.get("kind") == "Job"), None)


def _completion_index(pod: dict[str, Any]) -> str | None:
    return (pod["metadata"].get("annotations") or {}).get(builders.COMPLETION_INDEX)


def _attempt_of(pod: dict[str, Any]) -> int:
    return int(pod["metadata"].get("labels", {}).get(builders.LABEL_ATTEMPT, "0"))


def reconcile(key: str, source: str = "") -> None:
    """Converge one fine-tune from the caches. The work queue runs one reconcile per key at a time."""
    namespace, name = key.split("/", 1)
    with OPERATOR_METRICS.observe(source or "other"):
        body = FINE_TUNES.get(namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            QUEUE.forget(key)
            if body is not None:
                _forget_uid(body["metadata"]["uid"])
            return
        meta = body["metadata"]
        owner = builders.Owner(meta["name"], meta["namespace"], meta["uid"])
        spec, current = _parsed(body)
        current = _with_unrecorded_attempt(owner.uid, current)
        now, generation = datetime.now(UTC), meta.get("generation")
        ttl = None
        if isinstance(spec, ValidationError):  # what the CRD let through but the models refuse: say so, never hang
            p = plan_invalid(current, [f"spec.{line}" for line in describe_errors(spec)], now, generation)
        else:
            p, ttl = _plan_and_act(owner, spec, current, now, generation), spec.run_policy.ttl_seconds_after_finished
        if p.create_attempt is None and current.attempt == 0:
            _FIRST_SEEN.pop(owner.uid, None)
        new = as_patch(p.status)
        old = body.get("status") or {}
        tick = _next_tick(p, ttl, now)
        if p.create_attempt is not None:
            _UNRECORDED[owner.uid] = (p.status, time.monotonic())
        if new != old and _status_waits(owner.uid, key, p):
            tick = RECORD_RECHECK_SECONDS if tick is None else min(tick, RECORD_RECHECK_SECONDS)
        elif new != old:
            patch = {key: new.get(key) for key in set(old) | set(new) if old.get(key) != new.get(key)}
            patched = kube.patch_status(namespace, name, meta["resourceVersion"], patch)
            if patched is None:  # changed since the cached copy: again once the watch brings the new one
                QUEUE.schedule(key, 1.0)
                return
            FINE_TUNES.put(patched)
            if (held := _UNRECORDED.pop(owner.uid, None)) is not None:
                OPERATOR_METRICS.attempt_recorded.observe(time.monotonic() - held[1])
        if p.status.phase in FINISHED:  # rarely looked at again: two models per finished run kept for nothing
            _PARSED.pop(owner.uid, None)
        OPERATOR_METRICS.set_phase(key, p.status.phase)
        QUEUE.schedule(key, tick)
        for kind, reason, message in p.events:
            EVENTS.send(body, kind, reason, message[:1000])
            log.log(logging.WARNING if kind == "Warning" else logging.INFO, "%s: %s: %s", key, reason, message,
                    extra={"namespace": namespace, "finetune": name, "reason": reason})  # fmt: skip


# Each fine-tune's spec and status as models, by UID, with the generation and resourceVersion they were parsed from:
# most reconciles (its pods' and Job's events) see the same fine-tune again, and parsing it every time was an eighth
# of the operator's CPU time with 1,000 runs live. The planner copies the status before it changes anything.
_PARSED: dict[str, tuple[Any, LoRAFineTuneSpec | ValidationError, str, LoRAFineTuneStatus]] = {}


def _parsed(body: dict[str, Any]) -> tuple[LoRAFineTuneSpec | ValidationError, LoRAFineTuneStatus]:
    meta = body["metadata"]
    generation, version = meta.get("generation"), meta.get("resourceVersion", "")
    cached = _PARSED.get(meta["uid"])
    if cached is not None and cached[0] == generation and cached[0] is not None:
        spec = cached[1]
    else:
        try:
            spec = LoRAFineTuneSpec.model_validate(body["spec"], context={CLUSTER: True})
        except ValidationError as err:
            spec = err
    if cached is not None and cached[2] == version and version:
        status = cached[3]
    else:
        status = LoRAFineTuneStatus.model_validate(body.get("status") or {})
    _PARSED[meta["uid"]] = (generation, spec, version, status)
    return spec, status


def _with_unrecorded_attempt(uid: str, current: LoRAFineTuneStatus) -> LoRAFineTuneStatus:
    """The status as this process last planned it where that names an attempt the stored one does not yet."""
    held = _UNRECORDED.get(uid)
    if held is None:
        return current
    if held[0].attempt > current.attempt:
        return held[0]
    _UNRECORDED.pop(uid, None)  # stored since (a patch whose answer was lost, another replica before a handover)
    return current


def _status_waits(uid: str, key: str, p: Plan) -> bool:
    """Whether the status of an attempt this process created and has not recorded yet waits for a later pass: while
    other new fine-tunes wait for their Jobs, for up to RECORD_WAIT_SECONDS after its creation."""
    held = _UNRECORDED.get(uid)
    if held is None or time.monotonic() - held[1] >= RECORD_WAIT_SECONDS or not QUEUE.new_waiting(besides=key):
        return False
    _UNRECORDED[uid] = (p.status, held[1])
    return True


def _next_tick(p: Plan, ttl: int | None, now: datetime) -> float | None:
    """When to look again without an event. Live runs: when the plan says the clock changes something (a backoff or
    a deadline expiring, a preflight problem to check again), else after the resync period, a safety net under the
    watches: with 1,000 runs live a 10 s timer for each was 100 reconciles a second that found nothing new. A
    suspended run waits for its spec to change and a queued one for Kueue (refreshing the reason now and then).
    Finished runs: only when the TTL is due, then never again."""
    s = p.status
    if s.phase in FINISHED:
        due = ttl_due(ttl, s.completion_time, s.children_deleted_time is not None)
        return None if due is None else (due - now).total_seconds()
    if s.phase == "Suspended":
        return None
    longest = min(QUEUED_REFRESH_SECONDS, SETTINGS.resync_seconds) if s.phase == "Queued" else SETTINGS.resync_seconds
    return longest if p.requeue_after is None else min(p.requeue_after, longest)


def _forget_uid(uid: str) -> None:
    _FIRST_SEEN.pop(uid, None)
    _POLICY_REFUSED.discard(uid)
    _PARSED.pop(uid, None)
    _UNRECORDED.pop(uid, None)
