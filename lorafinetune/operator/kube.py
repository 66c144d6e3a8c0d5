"""The few Kubernetes API calls the operator makes, each idempotent: create-or-accept, delete-or-accept, read."""

from __future__ import annotations

from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from lorafinetune.api.manifest import GROUP, PLURAL, VERSION
from lorafinetune.operator.builders import LABEL_NAME


def load_config() -> None:
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def resource_served() -> bool:
    """Whether the API server serves LoRAFineTunes (a discovery read, which RBAC allows every client)."""
    found = _ignore(404, client.CustomObjectsApi().get_api_resources, GROUP, VERSION)
    return found is not None and any(r.name == PLURAL for r in found.resources)


def _ignore(status: int, call, *args, **kwargs) -> Any:
    try:
        return call(*args, **kwargs)
    except ApiException as err:
        if err.status != status:
            raise
        return None


def create(obj: dict[str, Any]) -> bool:
    """Create a namespaced object; an existing one with that name counts as success. True if newly created."""
    ns, kind = obj["metadata"]["namespace"], obj["kind"]
    call = {
        "ConfigMap": client.CoreV1Api().create_namespaced_config_map,
        "Service": client.CoreV1Api().create_namespaced_service,
        "NetworkPolicy": client.NetworkingV1Api().create_namespaced_network_policy,
        "Job": client.BatchV1Api().create_namespaced_job,
    }[kind]
    return _ignore(409, call, ns, obj) is not None


def delete(kind: str, namespace: str, name: str) -> None:
    """Delete if present; pods of a Job go with it (background propagation, SIGTERM first)."""
    body = client.V1DeleteOptions(propagation_policy="Background")
    call = {
        "ConfigMap": client.CoreV1Api().delete_namespaced_config_map,
        "Service": client.CoreV1Api().delete_namespaced_service,
        "NetworkPolicy": client.NetworkingV1Api().delete_namespaced_network_policy,
        "Job": client.BatchV1Api().delete_namespaced_job,
    }[kind]
    _ignore(404, call, name, namespace, body=body)


def read_job(namespace: str, name: str) -> dict[str, Any] | None:
    job = _ignore(404, client.BatchV1Api().read_namespaced_job, name, namespace)
    return client.ApiClient().sanitize_for_serialization(job) if job is not None else None


def list_pods(namespace: str, name: str) -> list[dict[str, Any]]:
    """Every pod of the fine-tune, of all attempts (each carries its attempt label)."""
    pods = client.CoreV1Api().list_namespaced_pod(namespace, label_selector=f"{LABEL_NAME}={name}")
    return client.ApiClient().sanitize_for_serialization(pods)["items"]


def pvc_exists(namespace: str, claim: str) -> bool:
    return _ignore(404, client.CoreV1Api().read_namespaced_persistent_volume_claim, claim, namespace) is not None


def secret_exists(namespace: str, name: str) -> bool:
    # Only existence is used, but `get` returns the values: hence settings.secret_preflight (off in the chart).
    return _ignore(404, client.CoreV1Api().read_namespaced_secret, name, namespace) is not None


def max_node_gpus() -> int:
    nodes = client.CoreV1Api().list_node().items
    return max((int((n.status.allocatable or {}).get("nvidia.com/gpu", "0")) for n in nodes), default=0)


def read_fine_tune(namespace: str, name: str) -> dict[str, Any] | None:
    """The LoRAFineTune as stored now (not as a possibly stale watch event delivered it)."""
    return _ignore(404, client.CustomObjectsApi().get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name)


def patch_status(namespace: str, name: str, resource_version: str, status: dict[str, Any]) -> bool:
    """Merge-patch status if nobody changed the object since we read it (409 -> False: reconcile again)."""
    body = {"metadata": {"resourceVersion": resource_version}, "status": status}
    try:
        client.CustomObjectsApi().patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, body)
        return True
    except ApiException as err:
        if err.status in (404, 409):
            return False
        raise
