"""The Helm chart's values, typed once, and the chart's files derived from them (written by lorafinetune.generate):

  values.yaml           the defaults below, each preceded by its description as a comment
  values.schema.json    JSON Schema of these models: helm lint/install/template refuse a misspelt or mistyped value
  files/crd.yaml        the CRD (generated from lorafinetune/api, like crds/)
  files/dashboard.json  a byte copy of dashboards/lorafinetune.json (a chart cannot read files outside itself)

Operator settings appear under `operator:` with the names of OperatorSettings (settings.py), which the Deployment
passes as LFT_* variables, so the chart and the operator cannot disagree on a default.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field

from lorafinetune.api.base import APIModel
from lorafinetune.generate.crd import REPO, render_crd
from lorafinetune.operator.settings import OperatorSettings

CHART_DIR = REPO / "charts" / "lorafinetune"
DASHBOARD_PATH = REPO / "dashboards" / "lorafinetune.json"
_DEFAULTS = OperatorSettings()

# Free-form Kubernetes fields (resources, affinity, ...) are passed through as written.
KubeObject = dict[str, Any]


class Image(APIModel):
    repository: str = Field("ghcr.io/lorafinetune/lorafinetune", description="Image of the operator.", min_length=1)
    tag: str = Field("", description="Image tag; empty means the chart's appVersion.")
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Kubernetes imagePullPolicy."
    )


class Operator(APIModel):
    """What the operator does; each field becomes the LFT_* variable of the OperatorSettings field of that name."""

    watch_namespaces: list[str] = Field(
        default_factory=list,
        description="Namespaces to watch. Empty: the whole cluster (a ClusterRole); otherwise a Role in each.",
    )
    trainer_image: str = Field(
        "", description="Image of the trainer pods when a LoRAFineTune sets none; empty means the operator's image."
    )
    reconcile_interval_seconds: float = Field(
        _DEFAULTS.reconcile_interval_seconds, gt=0,
        description="How often a fine-tune held back by something no watch reports (a missing Secret, the nodes' "
        "GPU memory) is checked again.",
    )  # fmt: skip
    resync_seconds: float = Field(
        _DEFAULTS.resync_seconds, gt=0,
        description="The longest a live fine-tune goes without a reconcile when nothing it watches changes.",
    )  # fmt: skip
    backoff_base_seconds: float = Field(
        _DEFAULTS.backoff_base_seconds, ge=0, description="Wait before the 2nd attempt; doubles per attempt."
    )
    backoff_cap_seconds: float = Field(
        _DEFAULTS.backoff_cap_seconds, ge=0, description="Longest wait between attempts."
    )
    progress_interval_seconds: float = Field(
        _DEFAULTS.progress_interval_seconds, gt=0, description="How often a running fine-tune's progress is read."
    )
    termination_grace_seconds: int = Field(
        _DEFAULTS.termination_grace_seconds, ge=0,
        description="Time trainer pods get after SIGTERM to write a checkpoint before SIGKILL.",
    )  # fmt: skip
    trainer_metrics_port: int = Field(
        _DEFAULTS.trainer_metrics_port, ge=1, le=65535, description="Rank 0's metrics port in trainer pods."
    )
    metrics_port: int = Field(
        _DEFAULTS.metrics_port, ge=1, le=65535, description="The operator's own Prometheus metrics port."
    )
    health_port: int = Field(_DEFAULTS.liveness_port, ge=1, le=65535, description="Liveness endpoint (/healthz).")
    workers: int = Field(
        _DEFAULTS.workers, ge=1, le=64, description="Reconciles run at once (one per fine-tune at a time)."
    )
    events_per_second: float = Field(
        _DEFAULTS.events_per_second, gt=0,
        description="The most Kubernetes Events the operator posts a second, after a burst of 25 (best-effort notes: "
        "in a burst of applies they leave the API server to the Jobs; each keeps the time it was sent).",
    )  # fmt: skip
    secret_preflight: bool = Field(
        _DEFAULTS.secret_preflight,
        description="Grant `get` on Secrets so a missing spec.s3.credentialsSecret is reported before pods start. "
        "Off by default: `get` on a Secret returns its values. Without it a missing Secret still shows as "
        "Pending/CreateContainerConfigError from the pods.",
    )
    lease_seconds: float = Field(
        _DEFAULTS.lease_seconds, ge=3, description="A standby replica takes over after the leader's Lease went "
        "unrenewed this long (the leader exits first)."
    )
    log_format: Literal["text", "json"] = Field(
        _DEFAULTS.log_format, description="Operator log lines: text, or json (one object a line with namespace, "
        "finetune and reason fields, for a log pipeline)."
    )
    network_policy: bool = Field(
        _DEFAULTS.network_policy,
        description="Isolate fine-tunes' pods with NetworkPolicies: they accept only the metrics port from the "
        "operator's namespace and metricsNamespaces (one policy per namespace, lorafinetune.trainers, kept on "
        "uninstall), and a gang of several pods any port from its own pods (enforced where the network plugin "
        "implements NetworkPolicy).",
    )
    metrics_namespaces: list[str] = Field(
        default_factory=lambda: list(_DEFAULTS.metrics_namespaces),
        description="Namespaces whose pods may scrape the trainers' metrics port (where Prometheus runs).",
    )
    hub_endpoint: str = Field(
        _DEFAULTS.hub_endpoint, max_length=2048,
        description="Hugging Face Hub the operator reads hf:// models' config.json from, to check that a fine-tune "
        "fits in the nodes' GPU memory (nvidia.com/gpu.memory) before its pods start; empty: no check and no "
        "outbound request.",
    )  # fmt: skip


class ServiceAccount(APIModel):
    create: bool = Field(True, description="Create the operator's ServiceAccount.")
    name: str = Field("", description="Name to use; empty means the release's full name.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Annotations (e.g. for workload identity).")


class Rbac(APIModel):
    create: bool = Field(True, description="Create the least-privilege (Cluster)Roles and bindings the operator needs.")


class Crds(APIModel):
    install: bool = Field(True, description="Install and upgrade the LoRAFineTune CRD with the release.")
    keep: bool = Field(
        True,
        description="Keep the CRD on `helm uninstall`: deleting it would delete every LoRAFineTune and, through "
        "owner references, their Jobs.",
    )


class Monitor(APIModel):
    enabled: bool = Field(False, description="Create it (needs the Prometheus Operator's CRDs).")
    interval: str = Field("30s", description="Scrape interval.", pattern="^[0-9]+(ms|s|m|h)$")
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels, e.g. the `release` your Prometheus selects monitors by."
    )


class Metrics(APIModel):
    service_monitor: Monitor = Field(
        default_factory=Monitor,
        description="ServiceMonitor for the operator (honorLabels: its per-fine-tune series carry their own "
        "`namespace`).",
    )
    pod_monitor: Monitor = Field(
        default_factory=lambda: Monitor(interval="15s"),
        description="PodMonitor for rank 0 of every fine-tune, relabelling the pod label lorafinetune.io/name "
        "to `finetune` as the dashboard expects.",
    )


class Dashboard(APIModel):
    enabled: bool = Field(True, description="Ship the Grafana dashboard as a ConfigMap.")
    namespace: str = Field("", description="Namespace of the ConfigMap; empty means the release's namespace.")
    labels: dict[str, str] = Field(
        default_factory=lambda: {"grafana_dashboard": "1"},
        description="Labels the Grafana sidecar discovers dashboards by.",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations, e.g. grafana_folder for the sidecar's folder."
    )


class Admission(APIModel):
    enabled: bool = Field(
        True,
        description="A ValidatingAdmissionPolicy on LoRAFineTunes: whoever may create one may otherwise run pods with "
        "any image, ServiceAccount, PriorityClass and tolerations in that namespace, through the operator's "
        "permissions. Fields a fine-tune leaves unset are not checked (the operator's defaults apply).",
    )
    allowed_image_prefixes: list[str] = Field(
        default_factory=list,
        description="spec.resources.image must start with one of these (e.g. registry.example.com/ml/). Empty: "
        "only the operator's own image repository and operator.trainerImage.",
    )
    allowed_service_accounts: list[str] = Field(
        default_factory=list,
        description="ServiceAccounts spec.resources.serviceAccountName may name. Empty: none (pods run as the "
        "namespace's default one, with no API token mounted).",
    )
    allowed_priority_classes: list[str] = Field(
        default_factory=list, description="PriorityClasses spec.resources.priorityClassName may name. Empty: none."
    )
    allowed_toleration_keys: list[str] = Field(
        default_factory=lambda: ["nvidia.com/gpu"],
        description="Taint keys spec.resources.tolerations may tolerate (each toleration needs a key: no "
        "tolerate-everything).",
    )


class ChartValues(APIModel):
    """Top-level values of charts/lorafinetune."""

    image: Image = Field(default_factory=Image, description="The operator's image (it also holds the trainer).")
    image_pull_secrets: list[str] = Field(default_factory=list, description="Names of image pull Secrets.")
    name_override: str = Field("", description="Replaces the chart name in resource names.")
    full_name_override: str = Field("", description="Replaces the release-chart full name.", alias="fullnameOverride")
    operator: Operator = Field(default_factory=Operator, description="Operator behaviour (LFT_* settings).")
    service_account: ServiceAccount = Field(default_factory=ServiceAccount, description="The operator's identity.")
    replicas: int = Field(
        2, ge=1, le=5, description="Operator replicas: the holder of a Lease acts, the others wait to take over."
    )
    rbac: Rbac = Field(default_factory=Rbac, description="RBAC objects.")
    crds: Crds = Field(default_factory=Crds, description="The LoRAFineTune CustomResourceDefinition.")
    metrics: Metrics = Field(default_factory=Metrics, description="Prometheus Operator monitors.")
    dashboard: Dashboard = Field(default_factory=Dashboard, description="Grafana dashboard ConfigMap.")
    admission: Admission = Field(default_factory=Admission, description="Who may run what through the operator.")
    resources: KubeObject = Field(
        default_factory=lambda: {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        description="The operator container's resources (measured: ~90 MiB RSS idle, ~160 MiB at 500 fine-tunes).",
    )
    pod_annotations: dict[str, str] = Field(default_factory=dict, description="Annotations of the operator pod.")
    pod_labels: dict[str, str] = Field(default_factory=dict, description="Extra labels of the operator pod.")
    priority_class_name: str = Field("", description="PriorityClass of the operator pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node selector of the operator pod.")
    tolerations: list[KubeObject] = Field(default_factory=list, description="Tolerations of the operator pod.")
    affinity: KubeObject = Field(default_factory=dict, description="Affinity of the operator pod.")
    global_: KubeObject = Field(
        default_factory=dict, alias="global", description="Helm's global values (when used as a subchart)."
    )


# ---------------------------------------------------------------- generation


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve $refs and drop pydantic's titles: helm's validator and readers both prefer one flat schema."""
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _inline({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    out = {k: _inline(v, defs) for k, v in node.items() if k not in ("title", "$defs")}
    if out.get("type") == "object" and "properties" in out:
        out["additionalProperties"] = False  # a misspelt value fails `helm install` instead of being ignored
    if out.get("type") == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = True  # free-form Kubernetes objects (resources, affinity, ...)
    return out


def values_schema() -> dict[str, Any]:
    schema = ChartValues.model_json_schema(by_alias=True)
    out = _inline(schema, schema.get("$defs", {}))
    for node in _walk(out):
        node.pop("default", None)  # values.yaml holds the defaults; a second copy here could only drift
    return {"$schema": "http://json-schema.org/draft-07/schema#", **out}


def _walk(node: dict[str, Any]):
    yield node
    for child in node.get("properties", {}).values():
        yield from _walk(child)


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def values_yaml() -> str:
    """values.yaml: the model's defaults, nested as Helm users expect, with each description as a comment."""
    lines = [
        "# Generated from lorafinetune/generate/chart.py (make generate); values.schema.json checks every value.",
        "",
    ]

    def emit(model: APIModel, indent: str) -> None:
        for name, field in type(model).model_fields.items():
            value = getattr(model, name)
            lines.extend(textwrap.wrap(field.description or "", 116 - len(indent), initial_indent=f"{indent}# ",
                                       subsequent_indent=f"{indent}# "))  # fmt: skip
            if isinstance(value, APIModel):
                lines.append(f"{indent}{field.alias}:")
                emit(value, indent + "  ")
            else:
                lines.append(f"{indent}{field.alias}: {_yaml_scalar(value)}")

    emit(ChartValues(), "")
    return "\n".join(lines) + "\n"


def chart_files() -> dict[Path, str]:
    return {
        CHART_DIR / "values.yaml": values_yaml(),
        CHART_DIR / "values.schema.json": json.dumps(values_schema(), indent=2) + "\n",
        CHART_DIR / "files" / "crd.yaml": render_crd(),
        CHART_DIR / "files" / "dashboard.json": DASHBOARD_PATH.read_text(),
    }
