"""The Helm chart with a real helm: lint, values schema, rendering, and an install on a real control plane where the
operator then runs as the chart's ServiceAccount, so a missing RBAC rule fails a fine-tune here, not in production.

helm is built from its Go module with the cluster's tools (hack/cluster/build.sh); the Prometheus Operator's CRDs
come from its Go module (hack/monitoring/crds.sh) so the API server validates the chart's ServiceMonitor and
PodMonitor against the real schemas.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from lorafinetune.generate.chart import ChartValues
from lorafinetune.operator.settings import OperatorSettings
from tests.conftest import REPO, wait_for
from tests.integration.conftest import Cluster, Operator, local_cluster
from tests.manifests import manifest

pytestmark = pytest.mark.integration
CHART = REPO / "charts" / "lorafinetune"
# What the chart-installed operator runs: 2 nodes x 8 GPUs on kwok nodes, from and to the "adapters" claim.
CHART_RUN = {
    "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"train": "pvc://adapters/data/train.jsonl"},
    "training": {"maxSteps": 10},
    "resources": {"nodes": 2, "gpusPerNode": 8},
    "output": {"uri": "pvc://adapters/{name}"},
    "runPolicy": {"backoffLimit": 1},
    "s3": {"endpointUrl": "http://127.0.0.1:9000", "credentialsSecret": "absent"},  # preflight off
}
MONITORS_ON = ["--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"]


def _script(path: str) -> str:
    return subprocess.run([REPO / path], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def helm() -> str:
    return str(Path(_script("hack/cluster/build.sh")) / "helm")


def run_helm(helm: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run([helm, *args], capture_output=True, text=True, timeout=300, **kwargs)


def render(helm: str, *args: str) -> dict[tuple[str, str], dict]:
    out = run_helm(helm, "template", "lft", str(CHART), "--namespace", "lft-system", *args)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {(d["kind"], d["metadata"]["name"] + "@" + d["metadata"].get("namespace", "")): d for d in docs}


def by_kind(objects: dict[tuple[str, str], dict], kind: str) -> list[dict]:
    return [o for (k, _), o in objects.items() if k == kind]


# ---------------------------------------------------------------- lint, schema, rendering


@pytest.mark.parametrize(
    "values",
    [[], [*MONITORS_ON, "--set", "operator.watchNamespaces={team-a,team-b}", "--set", "operator.secretPreflight=true"]],
    ids=["defaults", "everything-on"],
)
def test_chart_lints_strictly(helm: str, values: list[str]):
    out = run_helm(helm, "lint", "--strict", str(CHART), *values)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "operator.reconcileIntervalSecond=5"], "reconcileIntervalSecond"),  # misspelt: not ignored
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "operator.reconcileIntervalSeconds=0"], "reconcileIntervalSeconds"),
        (["--set-string", "operator.metricsPort=eighty"], "metricsPort"),
        (["--set", "metrics.podMonitor.interval=often"], "interval"),
    ],
)
def test_values_schema_refuses_bad_values_naming_them(helm: str, args: list[str], named: str):
    out = run_helm(helm, "template", "lft", str(CHART), *args)
    assert out.returncode != 0
    assert "values don't meet the specifications of the schema" in out.stderr and named in out.stderr, out.stderr


def test_operator_pod_is_non_root_and_restricted(helm: str):
    [deployment] = by_kind(render(helm), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 1000
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
    }  # fmt: skip
    # Two replicas, one acting at a time (leader election on a Lease): a rolling update is safe too.
    assert deployment["spec"]["replicas"] == 2 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] > 60, (
        "the startup probe must outlast the operator's wait for its CRD"
    )
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LFT_DEFAULT_IMAGE"] == container["image"] == "ghcr.io/lorafinetune/lorafinetune:0.1.0"
    assert env["LFT_SECRET_PREFLIGHT"] == "false" and env["LFT_NAMESPACES"] == ""
    assert env["LFT_NETWORK_POLICY"] == "true" and env["LFT_METRICS_NAMESPACES"] == "monitoring"
    assert env["LFT_LEADER_ELECTION"] == "true" and env["LFT_LEADER_LEASE"] == "lft-lorafinetune"
    [own_namespace] = [e for e in container["env"] if e["name"] == "LFT_OPERATOR_NAMESPACE"]
    assert own_namespace["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_values_render_as_the_operator_parses_them(helm: str):
    objects = render(helm, "--set", "operator.terminationGraceSeconds=1000000", "--set", "podLabels.team=nlp",
                     "--set", "podLabels.app\\.kubernetes\\.io/name=other")  # fmt: skip
    [deployment] = by_kind(objects, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LFT_TERMINATION_GRACE_SECONDS"] == "1000000"  # not 1e+06, which int() refuses
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["team"] == "nlp"
    assert labels["app.kubernetes.io/name"] == deployment["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]


# Every operator value, none at its default: each must reach the operator's settings as set.
OPERATOR_VALUES = {
    "watchNamespaces": ["team-a", "team-b"], "trainerImage": "registry.example/lft:9", "reconcileIntervalSeconds": 17.5,
    "resyncSeconds": 123,
    "backoffBaseSeconds": 3, "backoffCapSeconds": 301, "progressIntervalSeconds": 7, "terminationGraceSeconds": 1000000,
    "trainerMetricsPort": 9411, "metricsPort": 9412, "healthPort": 9413, "workers": 5, "eventsPerSecond": 2.5,
    "secretPreflight": True,
    "leaseSeconds": 21, "logFormat": "json", "networkPolicy": False, "metricsNamespaces": ["mon-a", "mon-b"],
    "hubEndpoint": "https://hub.example",
}  # fmt: skip
SETTING_OF = {"watch_namespaces": "namespaces", "trainer_image": "default_image", "health_port": "liveness_port"}


def test_every_operator_value_reaches_the_operator_as_set(helm: str, tmp_path: Path, monkeypatch):
    """The template, not the values model, decides what the operator sees: a value it forgets or passes under the
    wrong variable fails here."""
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({"operator": OPERATOR_VALUES}))
    [deployment] = by_kind(render(helm, "-f", str(values)), "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}  # not valueFrom: the pod's namespace
    for name in [n for n in os.environ if n.startswith("LFT_") or n == "HF_ENDPOINT"]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = OperatorSettings.from_env()

    chosen, defaults = ChartValues.model_validate({"operator": OPERATOR_VALUES}).operator, ChartValues().operator
    for field in type(chosen).model_fields:
        assert getattr(chosen, field) != getattr(defaults, field), f"operator.{field}: set it to a non-default here"
        assert getattr(settings, SETTING_OF.get(field, field)) == getattr(chosen, field), f"operator.{field}"


def _rules(role: dict) -> dict[str, set[str]]:
    verbs: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                verbs.setdefault(f"{group or 'core'}/{resource}", set()).update(rule["verbs"])
    return verbs


EXPECTED_RULES = {
    "lorafinetune.io/lorafinetunes": {"list", "watch"},
    "lorafinetune.io/lorafinetunes/status": {"patch"},
    "lorafinetune.io/lorafinetunes/finalizers": {"update"},
    "batch/jobs": {"create", "get", "delete", "list", "watch"},
    "core/services": {"create", "delete", "get"},
    "core/pods": {"list", "watch"},
    "core/persistentvolumeclaims": {"get", "list", "watch"},
    "core/events": {"create", "list", "watch"},
    "kueue.x-k8s.io/workloads": {"list"},
    "networking.k8s.io/networkpolicies": {"create", "delete", "get", "list", "update", "watch"},
}


def test_rbac_grants_exactly_what_the_operator_calls(helm: str):
    objects = render(helm)
    roles = {r["metadata"]["name"]: _rules(r) for r in by_kind(objects, "ClusterRole")}
    assert roles == {"lft-lorafinetune": EXPECTED_RULES, "lft-lorafinetune-nodes": {"core/nodes": {"list", "watch"}}}
    leader = {"coordination.k8s.io/leases": {"create", "get", "update"}}  # get/update: only its own Lease, by name
    roles = [(r["metadata"]["name"], _rules(r)) for r in by_kind(objects, "Role")]
    assert roles == [("lft-lorafinetune-leader", leader)]

    with_secrets = render(helm, "--set", "operator.secretPreflight=true")
    roles = {r["metadata"]["name"]: _rules(r) for r in by_kind(with_secrets, "ClusterRole")}
    assert roles["lft-lorafinetune"] == {**EXPECTED_RULES, "core/secrets": {"get"}}

    no_policy = render(helm, "--set", "operator.networkPolicy=false")
    roles = {r["metadata"]["name"]: _rules(r) for r in by_kind(no_policy, "ClusterRole")}
    assert "networking.k8s.io/networkpolicies" not in roles["lft-lorafinetune"]



def test_watching_namespaces_grants_roles_only_there(helm: str):
    objects = render(helm, "--set", "operator.watchNamespaces={team-a,team-b}", *MONITORS_ON)
    workload = [r for r in by_kind(objects, "Role") if not r["metadata"]["name"].endswith("-leader")]
    assert sorted(r["metadata"]["namespace"] for r in workload) == ["team-a", "team-b"]
    assert all(_rules(r) == EXPECTED_RULES for r in workload)
    assert [r["metadata"]["name"] for r in by_kind(objects, "ClusterRole")] == ["lft-lorafinetune-nodes"]
    [deployment] = by_kind(objects, "Deployment")
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LFT_NAMESPACES"] == "team-a,team-b"
    [pod_monitor] = by_kind(objects, "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_monitors_give_the_labels_the_dashboard_selects_by(helm: str):
    objects = render(helm, *MONITORS_ON)
    [service_monitor] = by_kind(objects, "ServiceMonitor")
    assert service_monitor["spec"]["endpoints"][0]["honorLabels"] is True
    [pod_monitor] = by_kind(objects, "PodMonitor")
    spec = pod_monitor["spec"]
    assert spec["selector"]["matchLabels"] == {"batch.kubernetes.io/job-completion-index": "0"}  # rank 0 only
    [endpoint] = spec["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert {"sourceLabels": ["__meta_kubernetes_pod_label_lorafinetune_io_name"], "targetLabel": "finetune"} in (
        endpoint["relabelings"]
    )
    assert not by_kind(render(helm), "PodMonitor"), "monitors are off by default (they need the Prometheus Operator)"


def test_dashboard_configmap_ships_the_repository_dashboard(helm: str):
    [config_map] = [c for c in by_kind(render(helm), "ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(config_map["data"]["lorafinetune.json"])
    assert shipped == json.loads((REPO / "dashboards" / "lorafinetune.json").read_text())


def test_crd_in_the_chart_is_the_generated_one_and_kept_on_uninstall(helm: str):
    [crd] = by_kind(render(helm), "CustomResourceDefinition")
    generated = yaml.safe_load((REPO / "crds" / "lorafinetune.io_lorafinetunes.yaml").read_text())
    assert crd["spec"] == generated["spec"]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert not by_kind(render(helm, "--set", "crds.install=false"), "CustomResourceDefinition")


# ---------------------------------------------------------------- on a real control plane


@pytest.fixture(scope="module")
def bare_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A cluster of its own without the CRD: the chart installs it."""
    with local_cluster(tmp_path_factory.mktemp("chart-cluster"), apply_crd=False) as kubeconfig:
        yield kubeconfig


def kubectl(kubeconfig: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    binary = Path(_script("hack/cluster/build.sh")) / "kubectl"
    out = subprocess.run([binary, "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True, timeout=120)
    if check and out.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
    return out


def token_kubeconfig(admin: Path, token: str, path: Path) -> Path:
    """A kubeconfig for the same API server that authenticates with a ServiceAccount token instead."""
    config = yaml.safe_load(admin.read_text())
    cluster = config["clusters"][0]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": "sa"}}], "current-context": "sa",
    }))  # fmt: skip
    return path


def test_install_run_a_fine_tune_as_the_chart_identity_upgrade_uninstall(
    helm: str, bare_cluster: Path, tmp_path: Path
):
    kc = bare_cluster
    # Real ServiceMonitor/PodMonitor schemas, and a namespace enforcing the "restricted" Pod Security Standard: the
    # API server itself refuses the operator pod if it asks for root, privilege escalation or capabilities.
    kubectl(kc, "apply", "--server-side", "-f", _script("hack/monitoring/crds.sh"))
    kubectl(kc, "create", "namespace", "lft-system")
    kubectl(kc, "label", "namespace", "lft-system", "pod-security.kubernetes.io/enforce=restricted")
    install = run_helm(
        helm, "install", "lft", str(CHART), "--kubeconfig", str(kc), "--namespace", "lft-system", *MONITORS_ON,
        "--set", "image.tag=test", "--wait", "--timeout", "180s",
    )  # fmt: skip
    assert install.returncode == 0, install.stderr
    kubectl(kc, "wait", "--for=condition=Established", "crd/lorafinetunes.lorafinetune.io", "--timeout=60s")
    monitors = ("servicemonitor/lft-lorafinetune-operator", "podmonitor/lft-lorafinetune-trainers")
    kubectl(kc, "-n", "lft-system", "get", *monitors)
    dashboard = kubectl(kc, "-n", "lft-system", "get", "configmap", "-l", "grafana_dashboard=1", "-o", "name")
    assert dashboard.stdout.strip() == "configmap/lft-lorafinetune-dashboard"

    # What the ServiceAccount may and may not do, as the API server's authorizer answers it.
    sa = "system:serviceaccount:lft-system:lft-lorafinetune"
    allowed = ["create jobs.batch -n ns1", "patch lorafinetunes.lorafinetune.io --subresource=status -n ns1",
               "list nodes", "watch nodes", "create events -n ns1", "list pods -n ns1", "watch pods -n ns1",
               "get persistentvolumeclaims -n ns1", "watch persistentvolumeclaims -n ns1",
               "watch events -n ns1", "create networkpolicies.networking.k8s.io -n ns1",
               "watch networkpolicies.networking.k8s.io -n ns1"]
    denied = ["get secrets -n ns1", "list secrets -n ns1", "create configmaps -n ns1", "delete pods -n ns1",
              "create pods -n ns1", "create pods/exec -n ns1", "update lorafinetunes.lorafinetune.io -n ns1",
              "patch lorafinetunes.lorafinetune.io -n ns1", "get lorafinetunes.lorafinetune.io -n ns1",
              "delete lorafinetunes.lorafinetune.io -n ns1", "create clusterrolebindings", "patch nodes"]
    for check in allowed + denied:
        answer = kubectl(kc, "auth", "can-i", *check.split(), f"--as={sa}", check=False).stdout.strip()
        assert answer == ("yes" if check in allowed else "no"), f"can-i {check}: {answer}"

    # The operator process, authenticated as the chart's ServiceAccount, drives a fine-tune through a failure, a
    # retry and success (kwok pods run nothing, so it runs here rather than in the chart's pod).
    token = kubectl(kc, "-n", "lft-system", "create", "token", "lft-lorafinetune", "--duration=1h").stdout.strip()
    op = Operator(token_kubeconfig(kc, token, tmp_path / "sa.kubeconfig"), tmp_path / "operator.log",
                  LFT_SECRET_PREFLIGHT="false")  # fmt: skip
    op.start()
    c = Cluster(kc, f"t-{uuid.uuid4().hex[:8]}")
    kubectl(kc, "create", "namespace", c.ns)
    # The trainer pods the operator creates must pass the "restricted" Pod Security Standard too.
    kubectl(kc, "label", "namespace", c.ns, "pod-security.kubernetes.io/enforce=restricted")
    try:
        # A bound claim (kwok has no provisioner): an unbound one would leave the pods Unschedulable.
        c.core.create_persistent_volume({
            "metadata": {"name": f"{c.ns}-adapters"},
            "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                     "hostPath": {"path": "/tmp/lft-chart-test"},
                     "claimRef": {"namespace": c.ns, "name": "adapters"}},
        })  # fmt: skip
        c.core.create_namespaced_persistent_volume_claim(c.ns, {
            "metadata": {"name": "adapters"},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"{c.ns}-adapters",
                     "resources": {"requests": {"storage": "1Gi"}}},
        })  # fmt: skip
        def fine_tune(name: str, **resources: Any) -> dict:
            return manifest(name, CHART_RUN, resources=resources)

        # Who may run what: the chart's ValidatingAdmissionPolicy, enforced by the API server (defaults: only the
        # chart's image, no ServiceAccount, no PriorityClass, tolerations of the GPU taint only).
        forbidden = [
            ({"image": "docker.io/someone/miner:1"}, "spec.resources.image docker.io/someone/miner:1 is not allowed"),
            ({"serviceAccountName": "deployer"}, "spec.resources.serviceAccountName deployer is not allowed"),
            ({"priorityClassName": "system-node-critical"}, "priorityClassName system-node-critical is not allowed"),
            ({"tolerations": [{"operator": "Exists"}]}, "tolerations may only tolerate the taint keys"),
        ]
        for resources, message in forbidden:
            def refused(resources: dict = resources, message: str = message) -> str | None:
                try:
                    c.apply(fine_tune("denied", **resources))
                except ApiException as err:
                    return err.body if message in err.body else None
                c.delete("denied")  # the policy is not active yet (the API server loads it asynchronously)
                return None

            assert "ValidatingAdmissionPolicy" in wait_for(refused, 30, f"refusal: {message}")
        gpu_taint = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        c.apply(fine_tune("permitted", image="ghcr.io/lorafinetune/lorafinetune:test", tolerations=gpu_taint))
        c.delete("permitted")

        c.apply(fine_tune("rbac"))
        def wait_phase(phase: str, attempt: int) -> None:
            try:
                wait_for(lambda: (s := c.get("rbac").get("status", {})).get("phase") == phase
                         and s.get("attempt") == attempt, 60, f"attempt {attempt} {phase}")  # fmt: skip
            except pytest.fail.Exception:
                status = c.get("rbac").get("status")
                pytest.fail(f"attempt {attempt} not {phase}: {status}\n{op.log.read_text()[-3000:]}")

        wait_phase("Running", 1)
        # The PodMonitor scrapes rank 0 by the index label the Job controller puts on Indexed Job pods.
        index = {p.metadata.labels.get("batch.kubernetes.io/job-completion-index") for p in c.pods("rbac", 1)}
        assert index == {"0", "1"}
        c.finish_pods("rbac", 1, "Failed", only=1, exit_code="137", reason="OOMKilled")
        wait_phase("Running", 2)
        c.finish_pods("rbac", 2, "Succeeded")
        wait_phase("Succeeded", 2)
        expected = {"AttemptCreated", "AllPodsRunning", "OOMKilled", "TrainingComplete"}  # posted after the status
        wait_for(lambda: expected <= {e.reason for e in c.events("rbac")}, 30, f"events {expected}")
        assert sorted(j.metadata.name for j in c.jobs("rbac")) == ["rbac-a1", "rbac-a2"]
    finally:
        op.stop()
    log = op.log.read_text()
    # A 403 as a status, not the milliseconds of a log line's time ("00:55:40,403" failed this once)
    refusal = re.search(r"Forbidden|(?<![,.\d])403(?!\d)", log)
    assert refusal is None, f"{refusal}\n{log[-3000:]}"

    # Upgrade changes a setting in place; uninstall leaves the CRD and every fine-tune alone.
    upgrade = run_helm(
        helm, "upgrade", "lft", str(CHART), "--kubeconfig", str(kc), "--namespace", "lft-system", *MONITORS_ON,
        "--set", "image.tag=test", "--set", "operator.reconcileIntervalSeconds=5", "--wait", "--timeout", "180s",
    )  # fmt: skip
    assert upgrade.returncode == 0, upgrade.stderr
    env = json.loads(kubectl(kc, "-n", "lft-system", "get", "deployment/lft-lorafinetune", "-o", "json").stdout)
    env = {e["name"]: e.get("value", "") for e in env["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LFT_RECONCILE_INTERVAL_SECONDS"] == "5"
    uninstall = run_helm(helm, "uninstall", "lft", "--kubeconfig", str(kc), "--namespace", "lft-system", "--wait")
    assert uninstall.returncode == 0, uninstall.stderr
    kubectl(kc, "get", "crd/lorafinetunes.lorafinetune.io")
    assert c.get("rbac")["status"]["phase"] == "Succeeded"
    assert kubectl(kc, "get", "clusterrole/lft-lorafinetune", check=False).returncode != 0
