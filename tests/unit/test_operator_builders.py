"""What the operator creates for an attempt, as data: the Indexed Job with its config, the headless Service."""

from __future__ import annotations

import json

from lorafinetune.api import parse_manifest
from lorafinetune.operator.builders import Owner, build_job, build_service, config_too_large, master_address
from lorafinetune.operator.settings import OperatorSettings
from tests.manifests import MINIMAL, manifest

OWNER = Owner("llama", "team-a", "uid-123")
SETTINGS = OperatorSettings()


def spec(**override):
    return parse_manifest(manifest("demo", MINIMAL, **override)).spec


def config_of(job) -> dict:
    """The trainer's config file as the pods see it: the annotation their downward API volume projects."""
    template = job["spec"]["template"]
    [volume] = [v for v in template["spec"]["volumes"] if v["name"] == "config"]
    [item] = volume["downwardAPI"]["items"]
    assert item["path"] == "config.json"
    annotation = item["fieldRef"]["fieldPath"].removeprefix("metadata.annotations['").removesuffix("']")
    return json.loads(template["metadata"]["annotations"][annotation])


def env_of(job) -> dict:
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in env}


def test_job_is_an_indexed_gang_without_pod_retries():
    job = build_job(OWNER, spec(resources={"nodes": 3, "gpusPerNode": 8}), attempt=2, settings=SETTINGS)
    js = job["spec"]
    assert job["metadata"]["name"] == "llama-a2"
    assert (js["completionMode"], js["completions"], js["parallelism"], js["backoffLimit"]) == ("Indexed", 3, 3, 0)
    assert js["template"]["spec"]["restartPolicy"] == "Never"
    assert js["template"]["spec"]["subdomain"] == "llama"
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LoRAFineTune", "uid-123", True)


def test_torchrun_gets_its_topology_from_the_environment():
    job = build_job(OWNER, spec(resources={"nodes": 2, "gpusPerNode": 4}), attempt=1, settings=SETTINGS)
    env = env_of(job)
    assert (env["PET_NNODES"], env["PET_NPROC_PER_NODE"], env["PET_MASTER_PORT"]) == ("2", "4", "29500")
    two = spec(resources={"nodes": 2, "gpusPerNode": 4})
    assert env["PET_MASTER_ADDR"] == "llama-a1-0.llama.team-a.svc.cluster.local" == master_address(OWNER, 1, two)
    assert env["PET_NODE_RANK"] == {
        "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
    }
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun", "-m", "lorafinetune.trainer"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "4"


def test_pods_run_non_root_with_a_checkpoint_grace_period():
    pod = build_job(OWNER, spec(), 1, SETTINGS)["spec"]["template"]["spec"]
    sc, csc = pod["securityContext"], pod["containers"][0]["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] != 0 and sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert csc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert pod["terminationGracePeriodSeconds"] == SETTINGS.termination_grace_seconds >= 60
    # torchrun would kill the ranks 30 s after SIGTERM; they get until just before the grace period ends.
    stop = int(env_of(build_job(OWNER, spec(), 1, SETTINGS))["PET_SHUTDOWN_TIMEOUT"])
    assert SETTINGS.termination_grace_seconds - 60 <= stop < SETTINGS.termination_grace_seconds
    assert pod["automountServiceAccountToken"] is False


def test_volumes_follow_the_uris():
    s = spec(
        model={"uri": "pvc://models/llama"},
        dataset={"train": "pvc://data/train.jsonl"},
        output={"uri": "pvc://adapters/run1"},
    )
    pod = build_job(OWNER, s, 1, SETTINGS)["spec"]["template"]["spec"]
    claims = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"]
              for v in pod["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
    assert claims == {"models": True, "data": True, "adapters": False}
    mounts = {m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert {"/mnt/pvc/models", "/mnt/pvc/data", "/mnt/pvc/adapters", "/dev/shm", "/etc/lorafinetune"} <= mounts
    assert env_of(build_job(OWNER, s, 1, SETTINGS))["LFT_RUN_DIR"] == "/mnt/pvc/adapters/run1"


def test_scheduling_fields_pass_through_and_cpu_runs_request_no_gpu():
    s = spec(resources={"gpusPerNode": 0, "nodeSelector": {"pool": "cpu"}, "priorityClassName": "batch",
                        "tolerations": [{"key": "x", "operator": "Exists"}], "image": "me/trainer:1"})  # fmt: skip
    pod = build_job(OWNER, s, 1, SETTINGS)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "cpu"} and pod["priorityClassName"] == "batch"
    assert pod["tolerations"] == [{"key": "x", "operator": "Exists"}]
    assert pod["containers"][0]["image"] == "me/trainer:1"
    assert "nvidia.com/gpu" not in json.dumps(pod["containers"][0]["resources"])
    assert env_of(build_job(OWNER, s, 1, SETTINGS))["DS_ACCELERATOR"] == "cpu"


def test_s3_credentials_are_passed_by_reference_only():
    s = spec(output={"uri": "s3://bucket/out"}, s3={"endpointUrl": "http://s3:9000", "credentialsSecret": "s3-creds"})
    job = build_job(OWNER, s, 1, SETTINGS)
    secret_ref = {"secretKeyRef": {"name": "s3-creds", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert env_of(job)["AWS_SECRET_ACCESS_KEY"] == secret_ref
    config = config_of(job)
    assert config["spec"]["s3"] == {"endpointUrl": "http://s3:9000", "credentialsSecret": "s3-creds"}


def test_a_hub_token_is_passed_by_reference_only():
    s = spec(model={"uri": "hf://org/private-model", "tokenSecret": "hf-token"})
    assert env_of(build_job(OWNER, s, 1, SETTINGS))["HF_TOKEN"] == {"secretKeyRef": {"name": "hf-token",
                                                                                      "key": "HF_TOKEN"}}  # fmt: skip
    config = config_of(build_job(OWNER, s, 1, SETTINGS))
    assert config["spec"]["model"]["tokenSecret"] == "hf-token"
    assert "HF_TOKEN" not in env_of(build_job(OWNER, spec(), 1, SETTINGS))


def test_the_namespace_policy_admits_only_the_metrics_readers_to_every_fine_tunes_pods():
    from lorafinetune.operator.builders import build_namespace_policy
    from lorafinetune.operator.settings import OperatorSettings

    settings = OperatorSettings(operator_namespace="lft-system", metrics_namespaces=["monitoring"])
    policy = build_namespace_policy("team-a", settings)
    assert policy["metadata"]["name"] == "lorafinetune.trainers" and policy["metadata"]["namespace"] == "team-a"
    assert "ownerReferences" not in policy["metadata"], "it serves every fine-tune of the namespace, outlives each"
    every_pod = {"matchExpressions": [{"key": "lorafinetune.io/name", "operator": "Exists"}]}
    assert policy["spec"]["podSelector"] == every_pod
    [from_readers] = policy["spec"]["ingress"]
    [readers] = from_readers["from"][0]["namespaceSelector"]["matchExpressions"]
    assert readers["values"] == ["lft-system", "monitoring"]
    assert from_readers["ports"] == [{"protocol": "TCP", "port": settings.trainer_metrics_port}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    nobody = build_namespace_policy("team-a", OperatorSettings(metrics_namespaces=[]))
    assert nobody["spec"]["ingress"] == [], "no readers: no ingress at all"


def test_a_gangs_policy_admits_its_own_pods_on_every_port():
    from lorafinetune.operator.builders import build_gang_policy

    policy = build_gang_policy(OWNER)
    gang = {"matchLabels": {"lorafinetune.io/name": OWNER.name}}
    assert policy["spec"]["podSelector"] == gang and policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": gang}]}]  # every port: rendezvous, gloo and NCCL
    assert policy["metadata"]["name"] == OWNER.name and policy["metadata"]["ownerReferences"][0]["uid"] == OWNER.uid


def test_headless_service_publishes_not_ready_addresses():
    svc = build_service(OWNER, SETTINGS)
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"lorafinetune.io/name": "llama"}


def test_builders_are_deterministic():
    s = spec()
    assert build_job(OWNER, s, 3, SETTINGS) == build_job(OWNER, s, 3, SETTINGS)



def test_each_attempt_carries_the_spec_it_runs_with():
    job = build_job(OWNER, spec(training={"maxSteps": 77}), 2, SETTINGS)
    config = config_of(job)
    assert config["name"] == "llama" and config["spec"]["training"]["maxSteps"] == 77
    mount = next(m for m in job["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] if m["name"] == "config")
    assert env_of(job)["LFT_CONFIG"] == f"{mount['mountPath']}/config.json" and mount["readOnly"]


def test_a_one_pod_gang_rendezvous_inside_its_pod_without_a_service():
    job = build_job(OWNER, spec(resources={"nodes": 1, "gpusPerNode": 8}), 1, SETTINGS)
    assert env_of(job)["PET_MASTER_ADDR"] == "127.0.0.1"
    assert "subdomain" not in job["spec"]["template"]["spec"]


def test_a_spec_too_large_for_a_pod_template_is_refused_with_its_size():
    assert config_too_large(OWNER, spec()) is None
    values = [f"gpu-{i:05d}-" + "x" * 50 for i in range(4000)]
    terms = [{"matchExpressions": [{"key": "pool", "operator": "In", "values": values}]}]
    big = spec(resources={"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": terms}}}})  # fmt: skip
    message = config_too_large(OWNER, big)
    assert message and "KiB" in message and "200 KiB" in message, message


def test_a_queued_run_gives_kueue_a_suspended_labelled_gang():
    job = build_job(OWNER, spec(runPolicy={"queueName": "gpu", "queuePriorityClass": "urgent"}), 2, SETTINGS)
    labels = job["metadata"]["labels"]
    assert (labels["kueue.x-k8s.io/queue-name"], labels["kueue.x-k8s.io/priority-class"]) == ("gpu", "urgent")
    assert job["spec"]["suspend"] is True, "created suspended: Kueue alone starts the pods, all of them or none"
    plain = build_job(OWNER, spec(), 2, SETTINGS)
    assert "suspend" not in plain["spec"] and not any(k.startswith("kueue.") for k in plain["metadata"]["labels"])
