"""Operator settings, read from the environment (the Helm chart sets them) with defaults that work out of the box."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lorafinetune.operator.logs import LogFormat, parse_format


def _env_list(name: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, "").split(",") if v.strip()]


def _env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None:
        return default
    if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value.lower() in ("true", "1")


@dataclass(frozen=True)
class OperatorSettings:
    """Every field can be set by the environment variable named in its comment."""

    namespaces: list[str] = field(default_factory=list)
    """LFT_NAMESPACES: comma-separated namespaces to watch; empty watches the whole cluster."""

    default_image: str = "ghcr.io/lorafinetune/lorafinetune:0.1.0"
    """LFT_DEFAULT_IMAGE: trainer image when a spec sets none (one image serves operator and trainer)."""

    backoff_base_seconds: float = 10.0
    """LFT_BACKOFF_BASE_SECONDS: wait before the 2nd attempt; doubles per attempt (exponential backoff)."""

    backoff_cap_seconds: float = 600.0
    """LFT_BACKOFF_CAP_SECONDS: longest wait between attempts, so a late retry does not wait hours."""

    reconcile_interval_seconds: float = 10.0
    """LFT_RECONCILE_INTERVAL_SECONDS: how often a fine-tune held back by something no watch reports is checked
    again: a Secret it names (not watched: the operator may not list Secrets), the nodes' GPU memory, a child name
    taken by another owner. Live runs move on their Jobs' and pods' events and on their own deadlines instead."""

    resync_seconds: float = 300.0
    """LFT_RESYNC_SECONDS: the longest a live fine-tune goes without a reconcile when nothing it watches changes (a
    safety net under the watches; backoffs, deadlines and progress reads have timers of their own). From the caches,
    so without API requests; finished ones never come back."""

    metrics_port: int = 8080
    """LFT_OPERATOR_METRICS_PORT: the operator's own Prometheus metrics; 0 disables."""

    liveness_port: int = 8081
    """LFT_LIVENESS_PORT: kopf's liveness endpoint (/healthz) for the Deployment's probe."""

    progress_interval_seconds: float = 15.0
    """LFT_PROGRESS_INTERVAL_SECONDS: how often a running fine-tune's progress is read from rank 0 (bounded rate)."""

    master_port: int = 29500
    """LFT_MASTER_PORT: torchrun rendezvous port on pod 0 (the PyTorch default)."""

    trainer_metrics_port: int = 9400
    """LFT_TRAINER_METRICS_PORT: rank 0's Prometheus port, scraped by the PodMonitor and read for progress."""

    termination_grace_seconds: int = 300
    """LFT_TERMINATION_GRACE_SECONDS: time pods get after SIGTERM to write a checkpoint before SIGKILL."""

    lost_pod_seconds: int = 120
    """LFT_LOST_POD_SECONDS: a pod still Terminating this long after its grace period ended is on a lost node (no
    kubelet finishes it) and no longer holds back the next attempt."""

    leader_election: bool = False
    """LFT_LEADER_ELECTION: run only while holding the Lease LFT_LEADER_LEASE in LFT_OPERATOR_NAMESPACE (several
    replicas: one acts, the others wait to take over). The chart turns it on."""

    leader_lease: str = "lorafinetune-operator"
    """LFT_LEADER_LEASE: name of that Lease."""

    lease_seconds: float = 15.0
    """LFT_LEASE_SECONDS: a standby takes over after the Lease went unrenewed this long; the leader renews every
    third of it and exits if it cannot renew in time."""

    workers: int = 32
    """LFT_WORKERS: reconciles run at once (threads taking fine-tunes off the work queue; one per fine-tune at a
    time). They mostly wait for the API server's answers to writes: with 500 applied at once, 32 gave each its Job
    sooner than 8 (p95 3.0 s against 4.3 s; benchmarks/README.md)."""

    events_per_second: float = 10.0
    """LFT_EVENTS_PER_SECOND: the most Kubernetes Events the operator posts a second, after a burst of up to
    25. Events are best-effort notes (the status says the same): paced, they leave the API server to the
    Jobs in a burst of applies; each keeps the time it was sent, and the buffer holds thousands."""

    secret_preflight: bool = False
    """LFT_SECRET_PREFLIGHT: check that spec.s3.credentialsSecret exists before the first attempt. Off by default
    because RBAC cannot grant `get` on a Secret without its values; a missing Secret then shows as the pods'
    CreateContainerConfigError (Pending, with the kubelet's message) instead."""

    network_policy: bool = True
    """LFT_NETWORK_POLICY: isolate fine-tunes' pods with NetworkPolicies: they accept only the metrics port from the
    operator's namespace and LFT_METRICS_NAMESPACES (one policy per namespace, lorafinetune.trainers), and a gang of
    several pods any port from its own pods (rendezvous, gloo/NCCL; a policy per gang). Enforced where the cluster's
    network plugin implements NetworkPolicy."""

    metrics_namespaces: list[str] = field(default_factory=lambda: ["monitoring"])
    """LFT_METRICS_NAMESPACES: comma-separated namespaces whose pods may scrape trainer metrics (Prometheus's)."""

    operator_namespace: str = ""
    """LFT_OPERATOR_NAMESPACE: the operator's own namespace (the chart sets it), allowed to read rank 0's progress."""

    log_format: LogFormat = "text"
    """LFT_LOG_FORMAT: text (for people) or json (one object a line, with namespace, finetune and reason fields)."""

    hub_endpoint: str = "https://huggingface.co"
    """LFT_HUB_ENDPOINT (else HF_ENDPOINT): where the operator reads an hf:// model's config.json to check that a
    fine-tune fits in the nodes' GPU memory before its pods start (operator/fit.py); empty: no such check and no
    outbound request."""

    def __post_init__(self) -> None:
        for name in ("reconcile_interval_seconds", "resync_seconds", "progress_interval_seconds", "events_per_second"):
            if not getattr(self, name) > 0:
                raise ValueError(f"LFT_{name.upper()} must be more than 0, got {getattr(self, name)}")
        if self.workers < 1:
            raise ValueError(f"LFT_WORKERS must be at least 1, got {self.workers}")
        parse_format(self.log_format)

    @classmethod
    def from_env(cls) -> OperatorSettings:
        d = cls()
        return cls(
            log_format=parse_format(os.environ.get("LFT_LOG_FORMAT", d.log_format)),
            namespaces=_env_list("LFT_NAMESPACES"),
            default_image=os.environ.get("LFT_DEFAULT_IMAGE", d.default_image),
            backoff_base_seconds=float(os.environ.get("LFT_BACKOFF_BASE_SECONDS", d.backoff_base_seconds)),
            backoff_cap_seconds=float(os.environ.get("LFT_BACKOFF_CAP_SECONDS", d.backoff_cap_seconds)),
            reconcile_interval_seconds=float(
                os.environ.get("LFT_RECONCILE_INTERVAL_SECONDS", d.reconcile_interval_seconds)
            ),
            resync_seconds=float(os.environ.get("LFT_RESYNC_SECONDS", d.resync_seconds)),
            metrics_port=int(os.environ.get("LFT_OPERATOR_METRICS_PORT", d.metrics_port)),
            liveness_port=int(os.environ.get("LFT_LIVENESS_PORT", d.liveness_port)),
            progress_interval_seconds=float(
                os.environ.get("LFT_PROGRESS_INTERVAL_SECONDS", d.progress_interval_seconds)
            ),
            master_port=int(os.environ.get("LFT_MASTER_PORT", d.master_port)),
            trainer_metrics_port=int(os.environ.get("LFT_TRAINER_METRICS_PORT", d.trainer_metrics_port)),
            termination_grace_seconds=int(
                os.environ.get("LFT_TERMINATION_GRACE_SECONDS", d.termination_grace_seconds)
            ),
            lost_pod_seconds=int(os.environ.get("LFT_LOST_POD_SECONDS", d.lost_pod_seconds)),
            leader_election=_env_bool("LFT_LEADER_ELECTION", d.leader_election),
            leader_lease=os.environ.get("LFT_LEADER_LEASE", d.leader_lease),
            lease_seconds=float(os.environ.get("LFT_LEASE_SECONDS", d.lease_seconds)),
            workers=int(os.environ.get("LFT_WORKERS", d.workers)),
            events_per_second=float(os.environ.get("LFT_EVENTS_PER_SECOND", d.events_per_second)),
            secret_preflight=_env_bool("LFT_SECRET_PREFLIGHT", d.secret_preflight),
            network_policy=_env_bool("LFT_NETWORK_POLICY", d.network_policy),
            metrics_namespaces=_env_list("LFT_METRICS_NAMESPACES")
            if "LFT_METRICS_NAMESPACES" in os.environ
            else d.metrics_namespaces,
            operator_namespace=os.environ.get("LFT_OPERATOR_NAMESPACE", d.operator_namespace),
            hub_endpoint=os.environ.get("LFT_HUB_ENDPOINT", os.environ.get("HF_ENDPOINT", d.hub_endpoint)),
        )

    @property
    def shutdown_timeout_seconds(self) -> int:
        """How long torchrun lets the ranks checkpoint after SIGTERM before it kills them (its own default is 30 s):
        the grace period less a margin (a tenth, at least 5 s), so torchrun and the trainer's termination message
        are done before the kubelet kills the container."""
        return max(1, self.termination_grace_seconds - max(5, self.termination_grace_seconds // 10))

    def backoff_seconds(self, failed_attempts: int) -> float:
        """Delay before the next attempt after `failed_attempts` failures: base * 2^(n-1), capped."""
        return min(self.backoff_cap_seconds, self.backoff_base_seconds * 2 ** max(0, failed_attempts - 1))
