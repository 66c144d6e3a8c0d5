"""The Kubernetes API calls the operator makes, each idempotent (create-or-accept, delete-or-accept), and the list
calls its informers follow. Every request is counted (lorafinetune_operator_api_requests_total{verb,resource}), and
the reconciles' are timed (lorafinetune_operator_api_request_duration_seconds{verb,resource})."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from lorafinetune.api.manifest import GROUP, KIND, PLURAL, VERSION
from lorafinetune.operator.metrics import OPERATOR_METRICS

RESOURCES = {"Service": "services", "NetworkPolicy": "networkpolicies", "Job": "jobs"}


# Seconds to connect and to answer, for every request a reconcile sends: a half-open connection (an API server
# restarted, a node's network gone) fails the reconcile, which is retried with backoff, instead of holding one of the
# workers until the kernel gives up on it. A create that timed out but was stored is "already exists" on the retry.
REQUEST_TIMEOUT = (5, 30)
# Connections kept open to the API server for the reconciles' requests: the workers (two requests each at most) and
# the event thread at once (urllib3 opens more when all are busy, and closes those after use). size_pool() sets it.
POOL_CONNECTIONS = 65
_SHARED: client.ApiClient | None = None
_SHARED_GUARD = threading.Lock()


def size_pool(workers: int) -> None:
    """Keep a connection open for every worker, the request each may send alongside (a NetworkPolicy beside its
    Job), and the event thread (before the first request)."""
    global POOL_CONNECTIONS
    POOL_CONNECTIONS = 2 * workers + 1


def api() -> client.ApiClient:
    """The one client that reconciles and the event thread send their requests with. A `client.CoreV1Api()`
    made without one builds its own ApiClient, whose fresh connection pool pays a TCP and TLS handshake (and loads
    the certificates again) for every request: CPU on both sides that a burst of new fine-tunes waits for. Informers
    keep their own (a watch holds its connection for a minute). Made on first use, after load_config."""
    global _SHARED
    with _SHARED_GUARD:
        if _SHARED is None:
            configuration = client.Configuration.get_default_copy()
            configuration.connection_pool_maxsize = POOL_CONNECTIONS
            _SHARED = client.ApiClient(configuration)
        return _SHARED


def count(verb: str, resource: str) -> None:
    OPERATOR_METRICS.api_requests.labels(verb=verb, resource=resource).inc()


@contextlib.contextmanager
def request(verb: str, resource: str) -> Iterator[None]:
    """Count one request and time it to its answer, whatever the answer (a 409 or a 404 is an answer too)."""
    count(verb, resource)
    started = time.perf_counter()
    try:
        yield
    finally:
        OPERATOR_METRICS.api_request_duration.labels(verb=verb, resource=resource).observe(
            time.perf_counter() - started)


def job_lister(namespace: str | None) -> Callable[..., Any]:
    """The list call of an Informer: one namespace, or (None) the whole cluster."""
    if namespace is None:
        return lambda **kwargs: client.BatchV1Api().list_job_for_all_namespaces(**kwargs)
    return lambda **kwargs: client.BatchV1Api().list_namespaced_job(namespace, **kwargs)


def pod_lister(namespace: str | None) -> Callable[..., Any]:
    if namespace is None:
        return lambda **kwargs: client.CoreV1Api().list_pod_for_all_namespaces(**kwargs)
    return lambda **kwargs: client.CoreV1Api().list_namespaced_pod(namespace, **kwargs)


def pvc_lister(namespace: str | None) -> Callable[..., Any]:
    if namespace is None:
        return lambda **kwargs: client.CoreV1Api().list_persistent_volume_claim_for_all_namespaces(**kwargs)
    return lambda **kwargs: client.CoreV1Api().list_namespaced_persistent_volume_claim(namespace, **kwargs)


def node_lister() -> Callable[..., Any]:
    return lambda **kwargs: client.CoreV1Api().list_node(**kwargs)


def policy_lister(namespace: str | None) -> Callable[..., Any]:
    if namespace is None:
        return lambda **kwargs: client.NetworkingV1Api().list_network_policy_for_all_namespaces(**kwargs)
    return lambda **kwargs: client.NetworkingV1Api().list_namespaced_network_policy(namespace, **kwargs)


def replace_policy(policy: dict[str, Any], resource_version: str) -> dict[str, Any]:
    """Replace a NetworkPolicy of ours with `policy`, only if it is still at `resource_version` (a conflict raises,
    and the retry plans from the newer one)."""
    meta = policy["metadata"]
    body = {**policy, "metadata": {**meta, "resourceVersion": resource_version}}
    with request("update", "networkpolicies"):
        answer = client.NetworkingV1Api(api()).replace_namespaced_network_policy(
            meta["name"], meta["namespace"], body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT).data
    return json.loads(answer)


def fine_tune_lister(namespace: str | None) -> Callable[..., Any]:
    if namespace is None:
        return lambda **kwargs: client.CustomObjectsApi().list_cluster_custom_object(GROUP, VERSION, PLURAL, **kwargs)
    return lambda **kwargs: client.CustomObjectsApi().list_namespaced_custom_object(GROUP, VERSION, namespace,
                                                                                    PLURAL, **kwargs)  # fmt: skip


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def resource_served() -> bool:
    """Whether the API server serves LoRAFineTunes (a discovery read, which RBAC allows every client)."""
    with request("get", "discovery"):
        found = _ignore(404, client.CustomObjectsApi(api()).get_api_resources, GROUP, VERSION,
                        _request_timeout=REQUEST_TIMEOUT)  # fmt: skip
    return found is not None and any(r.name == PLURAL for r in found.resources)


def _ignore(status: int, call, *args, **kwargs) -> Any:
    try:
        return call(*args, **kwargs)
    except ApiException as err:
        if err.status != status:
            raise
        return None


class OwnedByAnother(Exception):
    """A child's name is taken by an object this fine-tune does not control: the child of a deleted fine-tune of the
    same name that garbage collection has not removed yet, or somebody else's object."""


def controller_uid(obj: dict[str, Any]) -> str | None:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((ref.get("uid") for ref in refs if ref.get("controller")), None)


def create(obj: dict[str, Any]) -> dict[str, Any] | None:
    """Create a namespaced child; one of that name that this owner controls counts as success (deterministic names
    make a repeated create harmless). Returns the new object as the API server stored it, or None if it existed.
    Raises OwnedByAnother for a foreign one."""
    ns, kind, name = obj["metadata"]["namespace"], obj["kind"], obj["metadata"]["name"]
    core, batch, net = client.CoreV1Api(api()), client.BatchV1Api(api()), client.NetworkingV1Api(api())
    create_call, read_call = {
        "Service": (core.create_namespaced_service, core.read_namespaced_service),
        "NetworkPolicy": (net.create_namespaced_network_policy, net.read_namespaced_network_policy),
        "Job": (batch.create_namespaced_job, batch.read_namespaced_job),
    }[kind]
    try:  # raw JSON back: the client's model classes cost more CPU than the rest of a reconcile
        with request("create", RESOURCES[kind]):
            answer = create_call(ns, obj, _preload_content=False, _request_timeout=REQUEST_TIMEOUT).data
        return json.loads(answer)
    except ApiException as err:
        if err.status == 403 and "NamespaceTerminating" in (err.body or ""):
            return None  # the namespace is being deleted, and the fine-tune with it
        # 403 too: quota admission comes before the name check, so in a namespace whose quota for this kind is
        # exactly used up, creating one that exists already is refused rather than answered 409
        if err.status not in (403, 409):
            raise
        refusal = err
    with request("get", RESOURCES[kind]):
        existing = _ignore(404, read_call, name, ns, _preload_content=False, _request_timeout=REQUEST_TIMEOUT)
    if existing is None:  # a 403 for a new object: a real refusal
        raise refusal
    existing = json.loads(existing.data)
    if controller_uid(existing) != controller_uid(obj):
        refs = existing["metadata"].get("ownerReferences") or [{"kind": "nobody"}]
        holder = f"{refs[0].get('kind')} {refs[0].get('name', '')} (uid {refs[0].get('uid', '-')})".strip()
        raise OwnedByAnother(f"{kind} {name} already exists and belongs to {holder}")
    return None


def delete(kind: str, namespace: str, name: str) -> None:
    """Delete if present; pods of a Job go with it (background propagation, SIGTERM first)."""
    body = client.V1DeleteOptions(propagation_policy="Background")
    call = {
        "Service": client.CoreV1Api(api()).delete_namespaced_service,
        "NetworkPolicy": client.NetworkingV1Api(api()).delete_namespaced_network_policy,
        "Job": client.BatchV1Api(api()).delete_namespaced_job,
    }[kind]
    with request("delete", RESOURCES[kind]):
        response = _ignore(404, call, name, namespace, body=body, _preload_content=False,
                           _request_timeout=REQUEST_TIMEOUT)  # fmt: skip
    _release(response)


def _release(response: Any) -> None:
    """Read a raw response to its end, which gives its connection back to the shared pool (unread, the pool would
    drop it and the next request would pay a new handshake)."""
    if response is not None:
        response.read()
        response.release_conn()


# The Job controller's FailedCreate events (a Job's pods refused by a ResourceQuota, a LimitRange or an admission
# webhook): events carry no labels of ours, so the field selector narrows them to these, of every Job.
FAILED_CREATE_EVENTS = "reason=FailedCreate,involvedObject.kind=Job"


def event_lister(namespace: str | None) -> Callable[..., Any]:
    if namespace is None:
        return lambda **kwargs: client.CoreV1Api().list_event_for_all_namespaces(**kwargs)
    return lambda **kwargs: client.CoreV1Api().list_namespaced_event(namespace, **kwargs)


def newest_message(events: list[dict[str, Any]]) -> str:
    """The message of the newest event (by when it last happened), else ""."""
    def when(event: dict[str, Any]) -> str:
        return event.get("lastTimestamp") or event.get("eventTime") or event["metadata"].get("creationTimestamp", "")

    return (max(events, key=when).get("message") or "") if events else ""


KUEUE_GROUP, KUEUE_VERSION = "kueue.x-k8s.io", "v1beta2"


def read_workload(job: dict[str, Any]) -> dict[str, Any] | None:
    """Kueue's Workload for this Job (its admission state: quota reserved or why not, evicted, preempted), found by
    the Job UID label Kueue puts on it. None if there is none yet, or Kueue is not installed (no such resource)."""
    meta = job["metadata"]
    try:
        with request("list", "workloads"):
            found = client.CustomObjectsApi(api()).list_namespaced_custom_object(
                KUEUE_GROUP, KUEUE_VERSION, meta["namespace"], "workloads",
                label_selector=f"kueue.x-k8s.io/job-uid={meta['uid']}", _request_timeout=REQUEST_TIMEOUT,
            )  # fmt: skip
    except ApiException as err:
        if err.status in (403, 404):  # Kueue absent, or the chart installed without its Workload read permission
            return None
        raise
    return next(iter(found.get("items") or []), None)


EVENT_TIMEOUT = (5, 15)  # seconds to connect, to answer: the one event thread must not hang on a half-open connection


def post_event(obj: dict[str, Any], kind: str, reason: str, message: str, when: datetime | None = None) -> None:
    """A core/v1 Event about `obj` (what `kubectl describe` lists), that happened `when` (default: now). Posted here
    rather than with kopf.event, which works only inside kopf's handler contexts, not from the operator's threads."""
    meta = obj["metadata"]
    now = (when or datetime.now(UTC)).isoformat(timespec="seconds").replace("+00:00", "Z")
    event = {
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {"apiVersion": obj.get("apiVersion", f"{GROUP}/{VERSION}"), "kind": obj.get("kind", KIND),
                           "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
        "type": kind, "reason": reason, "message": message, "count": 1, "firstTimestamp": now, "lastTimestamp": now,
        "source": {"component": "lorafinetune-operator"}, "reportingComponent": "lorafinetune-operator",
    }  # fmt: skip
    try:
        with request("create", "events"):
            response = client.CoreV1Api(api()).create_namespaced_event(meta["namespace"], event,
                                                                       _preload_content=False,
                                                                       _request_timeout=EVENT_TIMEOUT)  # fmt: skip
        _release(response)
    except ApiException as err:  # an event is best effort: the status already says it
        if err.status not in (403, 404, 409):
            raise


def pvc_exists(namespace: str, claim: str) -> bool:
    """Asked only when the operator's PVC cache has no such claim: it may have been created a moment ago."""
    with request("get", "persistentvolumeclaims"):
        return _ignore(404, client.CoreV1Api(api()).read_namespaced_persistent_volume_claim, claim, namespace,
                       _request_timeout=REQUEST_TIMEOUT) is not None  # fmt: skip


def secret_exists(namespace: str, name: str) -> bool:
    # Only existence is used, but `get` returns the values: hence settings.secret_preflight (off in the chart).
    with request("get", "secrets"):
        return _ignore(404, client.CoreV1Api(api()).read_namespaced_secret, name, namespace,
                       _request_timeout=REQUEST_TIMEOUT) is not None  # fmt: skip


def patch_status(namespace: str, name: str, resource_version: str, status: dict[str, Any]) -> dict[str, Any] | None:
    """Merge-patch status if nobody changed the object since we read it. Returns the object as stored now, or None
    (409: changed meanwhile, reconcile again; 404: gone)."""
    body = {"metadata": {"resourceVersion": resource_version}, "status": status}
    try:
        with request("patch", f"{PLURAL}/status"):
            answer = client.CustomObjectsApi(api()).patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, name, body, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            ).data
    except ApiException as err:
        if err.status in (404, 409):
            return None
        raise
    return json.loads(answer)
