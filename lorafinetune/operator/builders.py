"""Pure builders: a LoRAFineTune spec -> the Kubernetes objects of one attempt (no API calls, unit-tested as data).

Per attempt:    Indexed Job <name>-a<attempt>, one pod per node, carrying the rendered trainer config in its pod
                template (an annotation the pods read as a file through the downward API: each attempt runs with the
                spec as it was when the attempt started, and `kubectl get job -o yaml` shows which). The Job never
                retries pods (backoffLimit 0): a failed pod fails the gang, and the operator retries the whole gang as
                a new attempt that resumes from the last complete checkpoint on the output volume.
Multi-node:     a headless Service <name> (stable DNS): pod i runs torchrun with node rank i (the completion index)
                and rendezvous at <name>-a<attempt>-0.<name>.<namespace>.svc.cluster.local. A one-pod gang
                rendezvous inside its pod and needs no Service.
With operator.networkPolicy: one NetworkPolicy per namespace, lorafinetune.trainers, selecting every fine-tune's pods
and admitting only the metrics readers; and for a gang of several pods a NetworkPolicy <name> admitting the gang.
(Policies add up: a pod is reachable by what any policy selecting it admits, and by nothing else.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from lorafinetune.api.manifest import API_VERSION, KIND
from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.contract import (
    CONFIG_FILE,
    ENV_ATTEMPT,
    ENV_CACHE_DIR,
    ENV_CONFIG,
    ENV_METRICS_PORT,
    ENV_PVC_ROOT,
    ENV_RUN_DIR,
    ENV_TERMINATION_LOG,
)
from lorafinetune.operator.settings import OperatorSettings
from lorafinetune.storage import POD_PVC_ROOT

LABEL_NAME = "lorafinetune.io/name"
LABEL_POLICY = "lorafinetune.io/policy"
# A dot: no fine-tune can take this name for its own policy (in a cluster its name is a DNS-1035 label)
NAMESPACE_POLICY = "lorafinetune.trainers"
LABEL_ATTEMPT = "lorafinetune.io/attempt"
# Kueue's labels on a Job it should admit (https://kueue.sigs.k8s.io/docs/tasks/run/jobs/)
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
CONFIG_MOUNT = "/etc/lorafinetune"
COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"  # the Job controller's annotation: the pod's node rank
CONFIG_ANNOTATION = "lorafinetune.io/config"
# The API server refuses an object whose annotations exceed 256 KiB in all; the rest is Kubernetes' own.
CONFIG_MAX_BYTES = 200 * 1024
CACHE_MOUNT = "/var/cache/lorafinetune"
TERMINATION_LOG = "/dev/termination-log"
RUN_AS_USER = 1000


@dataclass(frozen=True)
class Owner:
    """The LoRAFineTune that owns the children (garbage collection deletes them with it)."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, **labels: str) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": {LABEL_NAME: self.name, "app.kubernetes.io/managed-by": "lorafinetune", **labels},
            "ownerReferences": [self.reference()],
        }


def job_name(name: str, attempt: int) -> str:
    return f"{name}-a{attempt}"


def needs_service(spec: LoRAFineTuneSpec) -> bool:
    """Only a gang of several pods rendezvous over the network (through the headless Service's DNS)."""
    return spec.resources.nodes > 1


def master_address(owner: Owner, attempt: int, spec: LoRAFineTuneSpec) -> str:
    if not needs_service(spec):
        return "127.0.0.1"  # torchrun's store is served by this very pod
    # Fully qualified: a short name fails from pods whose DNS search path differs (a classic peer complaint).
    return f"{job_name(owner.name, attempt)}-0.{owner.name}.{owner.namespace}.svc.cluster.local"


def render_config(owner: Owner, spec: LoRAFineTuneSpec) -> str:
    """The trainer's config file (secrets appear only by name: spec.s3, spec.model.tokenSecret)."""
    return json.dumps({"name": owner.name, "spec": spec.to_manifest()}, indent=2, sort_keys=True)


def config_too_large(owner: Owner, spec: LoRAFineTuneSpec) -> str | None:
    """Why the rendered config cannot travel in the pod template, or None."""
    size = len(render_config(owner, spec).encode())
    if size <= CONFIG_MAX_BYTES:
        return None
    return (f"the rendered spec is {size / 1024:.0f} KiB, more than the {CONFIG_MAX_BYTES // 1024} KiB a pod "
            "template annotation can carry; shorten the longest fields (e.g. inline prompts or templates)")


def build_service(owner: Owner, settings: OperatorSettings) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(owner.name),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # rank 0 must resolve before any pod is Ready
            "selector": {LABEL_NAME: owner.name},
            "ports": [
                {"name": "rendezvous", "port": settings.master_port},
                {"name": "metrics", "port": settings.trainer_metrics_port},
            ],
        },
    }


def build_namespace_policy(namespace: str, settings: OperatorSettings) -> dict[str, Any]:
    """Ingress to every fine-tune's pods in the namespace: the metrics port from the operator's namespace (progress)
    and the metrics namespaces (Prometheus), nothing from anywhere else (the ranks speak unauthenticated protocols).
    One for all the namespace's fine-tunes, kept when they go: a one-pod gang needs nothing more, so in a burst of
    new fine-tunes the API server stores a Job per fine-tune and no policy (each cost a create as costly as a Job's)."""
    readers = [ns for ns in [settings.operator_namespace, *settings.metrics_namespaces] if ns]
    ingress: list[dict[str, Any]] = []
    if readers:
        ingress.append({
            "from": [{"namespaceSelector": {"matchExpressions": [
                {"key": "kubernetes.io/metadata.name", "operator": "In", "values": sorted(set(readers))}]}}],
            "ports": [{"protocol": "TCP", "port": settings.trainer_metrics_port}],
        })  # fmt: skip
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": NAMESPACE_POLICY, "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": "lorafinetune", LABEL_POLICY: "namespace"}},
        "spec": {"podSelector": {"matchExpressions": [{"key": LABEL_NAME, "operator": "Exists"}]},
                 "policyTypes": ["Ingress"], "ingress": ingress},
    }  # fmt: skip


def build_gang_policy(owner: Owner) -> dict[str, Any]:
    """Ingress to a gang of several pods from its own pods, every port (the rendezvous port, and gloo/NCCL on ports
    chosen at run time); the namespace's policy admits the metrics readers."""
    gang = {"podSelector": {"matchLabels": {LABEL_NAME: owner.name}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": owner.metadata(owner.name),
        "spec": {"podSelector": gang["podSelector"], "policyTypes": ["Ingress"], "ingress": [{"from": [gang]}]},
    }


def pvc_claims(spec: LoRAFineTuneSpec) -> dict[str, bool]:
    """PVC claims the pods mount -> whether writable (only the output's claim is)."""
    claims: dict[str, bool] = {}
    for uri, writable in (
        (spec.model.uri, False),
        (spec.dataset.train, False),
        (spec.dataset.validation, False),
        (spec.output.uri, True),
    ):
        if uri is not None and uri.scheme == "pvc":
            claims[uri.location] = claims.get(uri.location, False) or writable
    return claims


def run_dir(spec: LoRAFineTuneSpec) -> str:
    out = spec.output.uri
    if out.scheme == "pvc":
        return f"{POD_PVC_ROOT}/{out.location}/{out.path}".rstrip("/")
    return out.path if out.scheme == "file" else f"{CACHE_MOUNT}/run"


def _volumes(spec: LoRAFineTuneSpec) -> tuple[list[dict], list[dict]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "downwardAPI": {"items": [
            {"path": CONFIG_FILE, "fieldRef": {"fieldPath": f"metadata.annotations['{CONFIG_ANNOTATION}']"}}]}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL and dataloaders need more than 64 MiB of shm
        {"name": "cache", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "cache", "mountPath": CACHE_MOUNT},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    for i, (claim, writable) in enumerate(sorted(pvc_claims(spec).items())):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {"claimName": claim, "readOnly": not writable}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{POD_PVC_ROOT}/{claim}", "readOnly": not writable})
    return volumes, mounts


def _env(owner: Owner, spec: LoRAFineTuneSpec, attempt: int, settings: OperatorSettings) -> list[dict]:
    res = spec.resources
    env: list[dict[str, Any]] = [
        # torchrun reads its arguments from PET_* variables; the node rank is the Job's completion index.
        {"name": "PET_NNODES", "value": str(res.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(res.procs_per_node)},
        {
            "name": "PET_NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX}']"}
            },
        },
        {"name": "PET_MASTER_ADDR", "value": master_address(owner, attempt, spec)},
        {"name": "PET_MASTER_PORT", "value": str(settings.master_port)},
        {"name": ENV_CONFIG, "value": f"{CONFIG_MOUNT}/{CONFIG_FILE}"},
        {"name": ENV_RUN_DIR, "value": run_dir(spec)},
        {"name": ENV_PVC_ROOT, "value": POD_PVC_ROOT},
        {"name": ENV_CACHE_DIR, "value": CACHE_MOUNT},
        {"name": ENV_METRICS_PORT, "value": str(settings.trainer_metrics_port)},
        # After SIGTERM the ranks get the pod's grace period (less a margin) to checkpoint, not torchrun's 30 s.
        {"name": "PET_SHUTDOWN_TIMEOUT", "value": str(settings.shutdown_timeout_seconds)},
        {"name": ENV_TERMINATION_LOG, "value": TERMINATION_LOG},
        {"name": "HF_HOME", "value": f"{CACHE_MOUNT}/huggingface"},
        {"name": ENV_ATTEMPT, "value": f"{owner.uid}/{attempt}"},  # fencing: unique across re-created fine-tunes
    ]
    if res.gpus_per_node == 0:
        env.append({"name": "DS_ACCELERATOR", "value": "cpu"})
    if spec.model.token_secret:  # by reference only, like the S3 keys below; huggingface_hub reads HF_TOKEN
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": spec.model.token_secret,
                                                                        "key": "HF_TOKEN"}}})  # fmt: skip
    if spec.s3 and spec.s3.credentials_secret:  # by reference only: the values never enter our objects
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": spec.s3.credentials_secret, "key": key}}})
    return env


def build_job(owner: Owner, spec: LoRAFineTuneSpec, attempt: int, settings: OperatorSettings) -> dict[str, Any]:
    res = spec.resources
    volumes, mounts = _volumes(spec)
    resources = json.loads(json.dumps(res.resources or {}))  # a copy: never mutate the spec
    if res.gpus_per_node:
        for part in ("requests", "limits"):
            resources.setdefault(part, {})["nvidia.com/gpu"] = str(res.gpus_per_node)
    container = {
        "name": "trainer",
        "image": res.image or settings.default_image,
        "command": ["torchrun", "-m", "lorafinetune.trainer"],
        "env": _env(owner, spec, attempt, settings),
        "ports": [
            {"name": "rendezvous", "containerPort": settings.master_port},
            {"name": "metrics", "containerPort": settings.trainer_metrics_port},
        ],
        "resources": resources,
        "volumeMounts": mounts,
        "terminationMessagePath": TERMINATION_LOG,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": settings.termination_grace_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": volumes,
    }
    optional = {
        "nodeSelector": res.node_selector,
        "tolerations": res.tolerations,
        "affinity": res.affinity,
        "priorityClassName": res.priority_class_name,
        "serviceAccountName": res.service_account_name,
    }
    pod_spec.update({k: v for k, v in optional.items() if v})
    if needs_service(spec):
        pod_spec["subdomain"] = owner.name  # with the headless Service: <pod hostname>.<name>.<ns>.svc resolves
    if not res.service_account_name:
        pod_spec["automountServiceAccountToken"] = False  # the trainer never talks to the API server
    labels = {LABEL_ATTEMPT: str(attempt)}
    rp = spec.run_policy
    wanted = {KUEUE_QUEUE_LABEL: rp.queue_name, KUEUE_PRIORITY_LABEL: rp.queue_priority_class}
    queue_labels = {k: v for k, v in wanted.items() if v}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": owner.metadata(job_name(owner.name, attempt), **labels, **queue_labels),
        "spec": {
            # Queued: created suspended, and Kueue alone unsuspends it once the whole gang fits its quota (Kueue's
            # webhook would suspend it too, but only if it is up; unsuspended, the pods would start unadmitted).
            **({"suspend": True} if rp.queue_name else {}),
            "completionMode": "Indexed",
            "completions": res.nodes,
            "parallelism": res.nodes,
            "backoffLimit": 0,  # retries are the operator's, of the whole gang
            # A disrupted pod (preemption, eviction, drain) fails the Job with a condition that says so, even when
            # the pod itself is gone by the time the operator looks: the operator then retries without counting a
            # failure. The Job controller applies the policy only once the pod is terminal, so the gang still gets
            # its grace period to checkpoint.
            "podFailurePolicy": {
                "rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
            },
            "template": {
                "metadata": {"labels": {LABEL_NAME: owner.name, **labels},
                             "annotations": {CONFIG_ANNOTATION: render_config(owner, spec)}},
                "spec": pod_spec,
            },
        },
    }
