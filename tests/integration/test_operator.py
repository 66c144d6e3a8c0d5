"""The operator against a real API server, scheduler and controllers (kwok plays the kubelet).

Each test gets its own namespace; pods end only when the test says so (`finish_pods`).
"""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from lorafinetune.api.base import APIModel
from tests.conftest import wait_for
from tests.integration.conftest import Cluster, Operator, condition, phase, wait_phase
from tests.invalid_manifests import CASES
from tests.manifests import CLUSTER_RUN, manifest

pytestmark = pytest.mark.integration


def test_create_runs_the_gang_and_success_is_reported(cluster: Cluster):
    c = cluster
    lft = c.apply(manifest("ok", CLUSTER_RUN))
    wait_phase(c, "ok", "Running")
    [job] = c.jobs("ok")
    assert job.metadata.name == "ok-a1"
    assert (job.spec.completion_mode, job.spec.completions, job.spec.parallelism, job.spec.backoff_limit) == (
        "Indexed", 2, 2, 0,
    )  # fmt: skip
    assert job.metadata.owner_references[0].uid == lft["metadata"]["uid"]
    svc = c.core.read_namespaced_service("ok", c.ns)
    assert svc.spec.cluster_ip == "None" and svc.spec.publish_not_ready_addresses
    assert _config(job)["spec"]["training"]["maxSteps"] == 100
    policies = client.NetworkingV1Api(c.api)
    gang = policies.read_namespaced_network_policy("ok", c.ns)  # the gang's own: from its pods, every port
    assert gang.spec.pod_selector.match_labels == {"lorafinetune.io/name": "ok"}
    assert gang.spec.ingress[0]._from[0].pod_selector.match_labels == {"lorafinetune.io/name": "ok"}
    assert gang.metadata.owner_references[0].uid == lft["metadata"]["uid"]
    every_pod = policies.read_namespaced_network_policy("lorafinetune.trainers", c.ns).spec.pod_selector
    assert [(e.key, e.operator) for e in every_pod.match_expressions] == [("lorafinetune.io/name", "Exists")]
    pods = c.pods("ok", 1)
    assert sorted(p.spec.node_name for p in pods) == ["gpu-node-0", "gpu-node-1"], "one 8-GPU pod per node"
    status = c.get("ok")["status"]
    assert status["attempt"] == 1 and condition(status, "Running")["status"] == "True"

    adapter = {"uri": "/mnt/pvc/adapters/ok/adapter", "sizeBytes": 19567880, "sha256": "ab" * 32}
    c.finish_pods("ok", 1, "Succeeded", only=0,
                  message=json.dumps({"exitCode": 0, "reason": "Completed", "adapter": adapter}))  # rank 0 reports
    c.finish_pods("ok", 1, "Succeeded", only=1)
    status = wait_phase(c, "ok", "Succeeded")
    assert status["completionTime"] and condition(status, "Succeeded")["status"] == "True"
    assert status["adapter"] == adapter
    assert condition(status, "Running")["status"] == "False"
    expected = {"AttemptCreated", "AllPodsRunning", "TrainingComplete"}  # events are posted after the status
    wait_for(lambda: expected <= {e.reason for e in c.events("ok")}, 30, f"events {expected}")


def test_a_one_pod_fine_tune_needs_no_service_and_no_policy_of_its_own(cluster: Cluster):
    """One pod rendezvous inside itself: no Service to create, and no policy of its own (two writes fewer beside its
    Job): the namespace's policy, written once, admits the metrics readers to every fine-tune's pods."""
    c = cluster
    policies = client.NetworkingV1Api(c.api)
    c.apply(manifest("solo", CLUSTER_RUN, resources={"nodes": 1}))
    wait_phase(c, "solo", "Running")
    assert [job.metadata.name for job in c.jobs("solo")] == ["solo-a1"]
    assert not c.core.list_namespaced_service(c.ns, label_selector="lorafinetune.io/name=solo").items
    assert not policies.list_namespaced_network_policy(c.ns, label_selector="lorafinetune.io/name=solo").items
    shared = policies.read_namespaced_network_policy("lorafinetune.trainers", c.ns)
    [readers] = shared.spec.ingress
    assert [p.port for p in readers.ports] == [9400] and readers._from[0].namespace_selector
    c.apply(manifest("solo-2", CLUSTER_RUN, resources={"nodes": 1}))
    wait_phase(c, "solo-2", "Running")
    again = policies.read_namespaced_network_policy("lorafinetune.trainers", c.ns)
    assert again.metadata.resource_version == shared.metadata.resource_version, "written once, not per fine-tune"
    policies.delete_namespaced_network_policy("lorafinetune.trainers", c.ns)  # a person deletes it
    c.apply(manifest("solo-3", CLUSTER_RUN, resources={"nodes": 1}))  # (no GPUs left for its pod: Job enough)
    wait_for(lambda: c.jobs("solo-3"), 30, "the next fine-tune's Job")
    policies.read_namespaced_network_policy("lorafinetune.trainers", c.ns)  # written again before that Job
    [pod] = c.pods("solo", 1)
    assert {e.name: e.value for e in pod.spec.containers[0].env}["PET_MASTER_ADDR"] == "127.0.0.1"


def test_a_failed_pod_fails_the_gang_which_is_retried_then_given_up(cluster: Cluster):
    c = cluster
    c.apply(manifest("flaky", CLUSTER_RUN, runPolicy={"backoffLimit": 1}))
    wait_phase(c, "flaky", "Running")
    c.finish_pods("flaky", 1, "Failed", only=1, exit_code="137", reason="OOMKilled")
    status = wait_phase(c, "flaky", "Retrying", timeout=30)
    assert status["lastFailure"]["reason"] == "OOMKilled" and status["lastFailure"]["exitCode"] == 137
    assert status["failedAttempts"] == 1 and status.get("nextAttemptTime")

    status = wait_for(lambda: (s := c.get("flaky")["status"])["attempt"] == 2 and s, 30, "attempt 2")
    assert sorted(j.metadata.name for j in c.jobs("flaky")) == ["flaky-a1", "flaky-a2"]
    assert c.pods("flaky", 1), "the failed attempt's pods are kept, with their logs"
    wait_phase(c, "flaky", "Running")
    c.finish_pods("flaky", 2, "Failed", only=0, exit_code="1", reason="Error",
                  message=json.dumps({"exitCode": 1, "reason": "RuntimeError", "message": "NCCL timeout"}))  # fmt: skip
    status = wait_phase(c, "flaky", "Failed", timeout=30)
    failed = condition(status, "Failed")
    assert failed["reason"] == "BackoffLimitExceeded" and "NCCL timeout" in failed["message"]
    wait_for(lambda: any(e.reason == "BackoffLimitExceeded" and e.type == "Warning" for e in c.events("flaky")),
             30, "the BackoffLimitExceeded event (posted after the status)")  # fmt: skip


def test_a_permanent_trainer_error_is_not_retried(cluster: Cluster):
    c = cluster
    c.apply(manifest("baddata", CLUSTER_RUN, runPolicy={"backoffLimit": 3}))
    wait_phase(c, "baddata", "Running")
    # As in a real pod (tests/e2e/test_real_pods.py): torchrun exits 1, the trainer's termination message says 3.
    message = json.dumps({"exitCode": 3, "reason": "DataError", "message": "train.jsonl:7: not valid JSON"})
    c.finish_pods("baddata", 1, "Failed", only=0, exit_code="1", message=message)
    status = wait_phase(c, "baddata", "Failed", timeout=30)
    assert status["lastFailure"] == {
        "attempt": 1, "reason": "DataError", "message": "train.jsonl:7: not valid JSON", "exitCode": 3,
        "permanent": True,
    }  # fmt: skip
    assert [j.metadata.name for j in c.jobs("baddata")] == ["baddata-a1"]


def test_suspend_stops_the_attempt_and_resume_starts_a_new_one(cluster: Cluster):
    c = cluster
    c.apply(manifest("pause", CLUSTER_RUN))
    wait_phase(c, "pause", "Running")
    for pod in c.pods("pause", 1):  # after SIGTERM they take 8 s to stop, as trainers writing a checkpoint do
        c.core.patch_namespaced_pod(pod.metadata.name, c.ns,
                                    {"metadata": {"annotations": {"test.lorafinetune.io/terminate-after": "8s"}}})
    c.patch_spec("pause", {"runPolicy": {"suspend": True}})
    status = wait_phase(c, "pause", "Suspended")
    assert condition(status, "Suspended")["status"] == "True"
    wait_for(lambda: all(p.metadata.deletion_timestamp for p in c.pods("pause", 1)), 30, "the pods to be stopping")
    c.patch_spec("pause", {"runPolicy": {"suspend": False}})

    # Resuming waits until the old pods are gone: two attempts never write the same run folder at once.
    status = wait_for(lambda: condition(s := c.get("pause")["status"], "Ready")["reason"] == "PreviousAttemptStopping"
                      and s, 30, "the new attempt to wait")  # fmt: skip
    assert "waits for 2 pod(s) of the previous attempt" in condition(status, "Ready")["message"]
    assert c.pods("pause", 1) and not c.pods("pause", 2)
    assert "pause-a2" not in [j.metadata.name for j in c.jobs("pause")]
    status = wait_phase(c, "pause", "Running", timeout=60)
    assert not c.pods("pause", 1), "attempt 2 started only after attempt 1's pods were gone"
    assert status["attempt"] == 2 and [j.metadata.name for j in c.jobs("pause")] == ["pause-a2"]
    wait_for(lambda: "PreviousAttemptStopping" in {e.reason for e in c.events("pause")}, 30, "its event")


def test_pods_stuck_terminating_on_a_lost_node_do_not_hold_back_the_next_attempt(cluster: Cluster):
    # The test operator gives pods a 5 s grace period and calls a pod lost 10 s after it (conftest): a pod still
    # Terminating then has no kubelet finishing it, as on a NotReady or partitioned node.
    c = cluster
    # the lost pod keeps its GPUs: leave room
    c.apply(manifest("lost", CLUSTER_RUN, resources={"nodes": 1, "gpusPerNode": 4}))
    wait_phase(c, "lost", "Running")
    for pod in c.pods("lost", 1):  # no kubelet will confirm these pods' end
        c.core.patch_namespaced_pod(pod.metadata.name, c.ns,
                                    {"metadata": {"annotations": {"test.lorafinetune.io/terminate-after": "1h"}}})
    c.patch_spec("lost", {"runPolicy": {"suspend": True}})
    wait_phase(c, "lost", "Suspended")
    c.patch_spec("lost", {"runPolicy": {"suspend": False}})
    wait_for(lambda: condition(c.get("lost")["status"], "Ready")["reason"] == "PreviousAttemptStopping", 30,
             "the new attempt to wait for the old pods first")  # fmt: skip
    status = wait_for(lambda: (s := c.get("lost")["status"]).get("phase") == "Running" and s, 60, "attempt 2")
    assert status["attempt"] == 2
    stuck = c.pods("lost", 1)
    assert len(stuck) == 1 and stuck[0].metadata.deletion_timestamp, "the lost pod is still there"
    # What an administrator does once the node is gone for good: force-delete, so its GPUs are free for other tests.
    c.core.patch_namespaced_pod(stuck[0].metadata.name, c.ns, {"metadata": {"finalizers": None}})
    c.core.delete_namespaced_pod(stuck[0].metadata.name, c.ns, grace_period_seconds=0)


def test_active_deadline_fails_the_run(cluster: Cluster):
    c = cluster
    c.apply(manifest("slow", CLUSTER_RUN, runPolicy={"activeDeadlineSeconds": 3}))
    status = wait_phase(c, "slow", "Failed", timeout=30)
    assert condition(status, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: not c.jobs("slow"), 30, "the Job to be deleted")


def test_ttl_removes_the_children_of_a_finished_run(cluster: Cluster):
    c = cluster
    c.apply(manifest("short", CLUSTER_RUN, runPolicy={"ttlSecondsAfterFinished": 2}))
    wait_phase(c, "short", "Running")
    c.finish_pods("short", 1, "Succeeded")
    wait_phase(c, "short", "Succeeded")
    wait_for(lambda: not c.jobs("short"), 30, "TTL to delete the Job")
    with pytest.raises(ApiException, match="Not Found"):
        c.core.read_namespaced_service("short", c.ns)
    assert phase(c, "short") == "Succeeded", "the resource itself stays"


def test_deleting_the_resource_leaves_nothing_behind(cluster: Cluster):
    c = cluster
    c.apply(manifest("gone", CLUSTER_RUN))
    wait_phase(c, "gone", "Running")
    c.delete("gone")
    wait_for(lambda: not c.jobs("gone") and not c.pods("gone", 1), 60, "garbage collection of Jobs and pods")
    policies = client.NetworkingV1Api(c.api)
    wait_for(lambda: not c.core.list_namespaced_service(c.ns, label_selector="lorafinetune.io/name=gone").items
             and not policies.list_namespaced_network_policy(c.ns, label_selector="lorafinetune.io/name=gone").items,
             60, "garbage collection of the Service and NetworkPolicy")  # fmt: skip


def test_more_gpus_than_any_node_has_is_a_warning_and_the_pods_wait_for_an_autoscaler(cluster: Cluster):
    # A cluster autoscaler adds a 16-GPU node only for a pod that asks for one: the Job is created anyway, and the
    # pending bound (its own test below) decides how long the pods may wait.
    c = cluster
    c.apply(manifest("huge", CLUSTER_RUN, resources={"nodes": 1, "gpusPerNode": 16}))
    wait_for(lambda: any(e.reason == "InsufficientGPUs" and e.type == "Warning"
                         and "no node has more than 8 allocatable nvidia.com/gpu now" in e.message
                         for e in c.events("huge")), 30, "the InsufficientGPUs warning")  # fmt: skip
    assert [j.metadata.name for j in c.jobs("huge")] == ["huge-a1"]
    ready = wait_for(lambda: (r := condition(c.get("huge")["status"], "Ready"))["reason"] == "Unschedulable" and r,
                     60, "the scheduler's reason")  # fmt: skip
    assert "Insufficient nvidia.com/gpu" in ready["message"] and phase(c, "huge") == "Pending"


def test_pods_refused_by_a_quota_are_explained_then_bounded_by_the_pending_timeout(cluster: Cluster):
    c = cluster
    quota = client.V1ResourceQuota(metadata=client.V1ObjectMeta(name="no-pods"),
                                   spec=client.V1ResourceQuotaSpec(hard={"pods": "0"}))  # fmt: skip
    c.core.create_namespaced_resource_quota(c.ns, quota)
    wait_for(lambda: c.core.read_namespaced_resource_quota("no-pods", c.ns).status.hard, 30, "the quota to count")
    c.apply(manifest("quota", CLUSTER_RUN, runPolicy={"pendingTimeoutSeconds": 30, "backoffLimit": 0}))
    ready = wait_for(lambda: (r := condition(c.get("quota")["status"], "Ready"))["reason"] == "FailedCreate" and r,
                     30, "the Job controller's FailedCreate in the Ready condition")  # fmt: skip
    assert "exceeded quota: no-pods" in ready["message"] and phase(c, "quota") == "Pending"
    status = wait_phase(c, "quota", "Failed", timeout=60)
    failure = status["lastFailure"]
    assert failure["reason"] == "PendingTimeout" and "exceeded quota: no-pods" in failure["message"]
    assert "pendingTimeoutSeconds (30 s)" in failure["message"] and status["failedAttempts"] == 1
    wait_for(lambda: not c.jobs("quota"), 30, "the timed-out attempt's Job to be deleted")


def test_a_refused_network_policy_takes_its_job_down_and_the_run_starts_once_it_is_allowed(cluster: Cluster, operator):
    """A gang's own NetworkPolicy is sent beside its Job, not before it: if the API server refuses the policy (here a
    quota of policies used up by the namespace's policy), the Job goes again and the retries create the policy
    first, so no Job stays without one. The namespace's policy itself is written before any Job."""
    c = cluster
    policies = client.NetworkingV1Api(c.api)
    quota = client.V1ResourceQuota(metadata=client.V1ObjectMeta(name="no-policies"), spec=client.V1ResourceQuotaSpec(
        hard={"count/networkpolicies.networking.k8s.io": "0"}))  # fmt: skip
    c.core.create_namespaced_resource_quota(c.ns, quota)
    wait_for(lambda: c.core.read_namespaced_resource_quota("no-policies", c.ns).status.hard, 30, "the quota to count")
    c.apply(manifest("fenced", CLUSTER_RUN, runPolicy={"backoffLimit": 1}))
    wait_for(lambda: "exceeded quota: no-policies" in operator.log.read_text(), 30, "the policy to be refused")
    time.sleep(3)  # the retries after 1 s and 2 s
    assert not c.jobs("fenced"), "a Job without the namespace's policy"
    # Room for the namespace's policy, none for the gang's: refused beside the Job, which goes again.
    c.core.patch_namespaced_resource_quota("no-policies", c.ns, {"spec": {"hard": {
        "count/networkpolicies.networking.k8s.io": "1"}}})  # fmt: skip
    wait_for(lambda: policies.list_namespaced_network_policy(c.ns).items, 60, "the namespace's policy")
    time.sleep(8)  # the retries: the Job beside the policy, taken down; then the policy first, refused
    assert not c.jobs("fenced"), "a Job stayed without its NetworkPolicy"
    assert not (c.get("fenced").get("status") or {}).get("attempt")

    c.core.delete_namespaced_resource_quota("no-policies", c.ns)
    wait_phase(c, "fenced", "Running", timeout=150)  # the backoff has grown to 8-32 s by now
    assert [job.metadata.name for job in c.jobs("fenced")] == ["fenced-a1"]
    policies.read_namespaced_network_policy("fenced", c.ns)

    # A quota exactly used up: quota admission comes before the name check, so the retry's create of the policy
    # that exists is refused (403), not answered 409. That is "ours already", not a refusal to take attempt 2 down.
    full = client.V1ResourceQuota(metadata=client.V1ObjectMeta(name="full"), spec=client.V1ResourceQuotaSpec(
        hard={"count/networkpolicies.networking.k8s.io": "2"}))  # fmt: skip
    c.core.create_namespaced_resource_quota(c.ns, full)
    wait_for(lambda: (c.core.read_namespaced_resource_quota("full", c.ns).status.used or {}).get(
        "count/networkpolicies.networking.k8s.io") == "2", 30, "the quota to count the policies")  # fmt: skip
    c.finish_pods("fenced", 1, "Failed", only=0, exit_code="1")
    wait_for(lambda: (s := c.get("fenced")["status"]).get("attempt") == 2 and s.get("phase") == "Running", 60,
             "attempt 2 to run")  # fmt: skip
    assert sorted(job.metadata.name for job in c.jobs("fenced")) == ["fenced-a1", "fenced-a2"]


def test_preemptions_restart_the_gang_without_spending_the_backoff_limit(cluster: Cluster):
    c = cluster
    c.apply(manifest("spot", CLUSTER_RUN, runPolicy={"backoffLimit": 1}))
    for attempt in range(1, 6):
        wait_for(lambda n=attempt: (s := c.get("spot")["status"]).get("phase") == "Running" and s["attempt"] == n,
                 60, f"attempt {attempt} to run")  # fmt: skip
        victim = sorted(c.pods("spot", attempt), key=lambda p: p.metadata.name)[1].metadata.name
        # The Eviction API, as a drain or a node-pressure controller calls it: the API server marks the pod with
        # the DisruptionTarget condition and deletes it; the gang's Job fails by its pod failure policy.
        eviction = client.V1Eviction(metadata=client.V1ObjectMeta(name=victim, namespace=c.ns))
        c.core.create_namespaced_pod_eviction(victim, c.ns, eviction)
        status = wait_for(lambda n=attempt: (s := c.get("spot")["status"]).get("disruptions") == n and s, 60,
                          f"disruption {attempt} to be counted")  # fmt: skip
        # the pod condition's reason (EvictionByEvictionAPI) if the pod is still there, else the Job's
        assert status["failedAttempts"] == 0
        assert status["lastDisruption"]["reason"] in ("EvictionByEvictionAPI", "DisruptionTarget")
    status = wait_for(lambda: (s := c.get("spot")["status"]).get("phase") == "Running" and s["attempt"] == 6 and s,
                      60, "attempt 6 to run")  # fmt: skip
    c.finish_pods("spot", 6, "Succeeded")
    status = wait_phase(c, "spot", "Succeeded")
    assert (status["failedAttempts"], status["disruptions"], status["attempt"]) == (0, 5, 6)
    assert "lastFailure" not in status
    job = c.batch.read_namespaced_job("spot-a1", c.ns)
    failed = [x for x in job.status.conditions if x.type == "Failed"]
    assert failed and failed[0].reason == "PodFailurePolicy", "the Job itself says a disruption ended it"
    wait_for(lambda: sum(e.reason == "Disrupted" for e in c.events("spot")) >= 1, 30, "the Disrupted events")


def test_a_gang_that_does_not_fit_says_why_in_status(cluster: Cluster):
    c = cluster
    c.apply(manifest("wide", CLUSTER_RUN, resources={"nodes": 3, "gpusPerNode": 8}))  # 3 x 8 GPUs on 2 nodes of 8
    def ready_condition():
        status = c.get("wide").get("status", {})
        ready = [x for x in status.get("conditions", []) if x["type"] == "Ready"]
        return ready and ready[0]["reason"] == "Unschedulable" and (status, ready[0])

    status, ready = wait_for(ready_condition, 60, "the scheduler's reason in the Ready condition")
    assert status["phase"] == "Pending" and ready["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in ready["message"]


def test_a_missing_pvc_is_reported_and_creates_no_pods_until_it_exists(cluster: Cluster):
    c = cluster
    c.apply(manifest("nopvc", CLUSTER_RUN, output={"uri": "pvc://adapters/run1"}))
    wait_for(lambda: any("PersistentVolumeClaim 'adapters' does not exist" in e.message for e in c.events("nopvc")),
             30, "a PVCNotFound event")  # fmt: skip
    assert not c.jobs("nopvc") and phase(c, "nopvc") == "Pending"
    assert condition(c.get("nopvc")["status"], "Ready")["reason"] == "PVCNotFound"
    c.bind_claim("adapters")
    try:
        wait_phase(c, "nopvc", "Running", timeout=30)
        assert [job.metadata.name for job in c.jobs("nopvc")] == ["nopvc-a1"]
    finally:
        c.core.delete_persistent_volume(f"{c.ns}-adapters")


def test_a_run_that_cannot_fit_in_the_nodes_gpu_memory_holds_no_gpu_until_the_spec_makes_it_fit(cluster: Cluster):
    # The nodes carry GPU feature discovery's nvidia.com/gpu.memory (80 GB H100s); the model's config comes from the
    # (stand-in) Hub. 70 B parameters in bf16 are 131 GiB on every GPU under ZeRO-2: no pod is created.
    c = cluster
    c.apply(manifest("too-big", CLUSTER_RUN, model={"uri": "hf://meta-llama/Llama-3.1-70B"}))
    status = wait_for(lambda: (s := c.get("too-big").get("status", {})).get("conditions") and s, 30, "a condition")
    ready = condition(status, "Ready")
    assert (ready["reason"], ready["status"], status["phase"]) == ("WontFit", "False", "Pending"), ready
    assert "GiB per GPU but node gpu-node-" in ready["message"], ready["message"]
    assert "(nvidia.com/gpu.memory=81559 MiB) gives 79.6 GiB" in ready["message"]
    assert "create it again with training.gradientCheckpointing: true and deepspeed.zeroStage: 3" in ready["message"]
    wait_for(lambda: any(e.reason == "WontFit" for e in c.events("too-big")), 30, "the WontFit event")  # posted after
    time.sleep(3)  # several reconciles later: still nothing holds a GPU
    assert not c.jobs("too-big") and not c.pods("too-big", 1)
    # Training settings are immutable; resources.gpuMemory is not, and overrules the estimate: the run starts.
    c.patch_spec("too-big", {"resources": {"gpuMemory": "400Gi"}})
    wait_phase(c, "too-big", "Running")
    assert [j.metadata.name for j in c.jobs("too-big")] == ["too-big-a1"]


def test_a_missing_credentials_secret_is_reported_and_creates_no_pods(cluster: Cluster):
    c = cluster
    s3 = {"endpointUrl": "http://127.0.0.1:9000", "credentialsSecret": "s3-creds"}
    c.apply(manifest("nosecret", CLUSTER_RUN, output={"uri": "s3://adapters/run1"}, s3=s3))
    status = wait_for(lambda: (s := c.get("nosecret").get("status", {})).get("conditions") and s, 30, "a condition")
    ready = condition(status, "Ready")
    assert (ready["reason"], status["phase"]) == ("SecretNotFound", "Pending")
    assert "Secret 's3-creds' (spec.s3.credentialsSecret) does not exist" in ready["message"]
    assert not c.jobs("nosecret")


@pytest.mark.parametrize("case", [c for c in CASES if c.api_server], ids=[c.id for c in CASES if c.api_server])
def test_invalid_manifests_are_refused_by_the_api_server(cluster: Cluster, case):
    # The same table runs against `lorafinetune validate --cluster` (tests/unit/test_api.py).
    with pytest.raises(ApiException) as err:
        cluster.apply(case.manifest("invalid"))
    message = json.loads(err.value.body)["message"]
    assert err.value.status in (400, 422), err.value.body
    if case.field != "(top level)":  # the API server names the field as validate does
        assert case.field in message, message
    if any(case.message in rule for rule in RULE_MESSAGES):  # a rule's own words (schema limits have the server's)
        assert case.message in message, message


def _rule_messages(model: type[APIModel]) -> set[str]:
    own = {rule.message for rule in model.__dict__.get("RULES", ())}
    return own.union(*(_rule_messages(sub) for sub in model.__subclasses__()))


RULE_MESSAGES = _rule_messages(APIModel)


def test_a_spec_the_api_server_accepts_but_the_operator_cannot_run_fails_loudly(cluster: Cluster, operator):
    """What the CRD lets through and the models refuse (a '..' path segment, which RE2 patterns cannot refuse):
    Failed with every problem named, a Warning event and an operator log line, never an empty status."""
    c = cluster
    [case] = [c for c in CASES if not c.api_server]
    c.apply(case.manifest("dotdot"))
    status = wait_phase(c, "dotdot", "Failed", 30)
    assert status["lastFailure"]["reason"] == "InvalidSpec" and status["lastFailure"]["permanent"]
    assert f"{case.field}: " in status["lastFailure"]["message"] and case.message in status["lastFailure"]["message"]
    assert condition(status, "Failed")["reason"] == "InvalidSpec"
    warning = wait_for(lambda: [e for e in c.events("dotdot") if e.reason == "InvalidSpec"], 30, "the event")
    assert warning[0].type == "Warning" and case.message in warning[0].message
    assert f"{c.ns}/dotdot: InvalidSpec: invalid spec: {case.field}" in operator.log.read_text()
    assert not c.jobs("dotdot")


def test_training_settings_are_immutable_but_suspend_is_not(cluster: Cluster):
    c = cluster
    c.apply(manifest("frozen", CLUSTER_RUN))
    wait_phase(c, "frozen", "Running")
    with pytest.raises(ApiException) as err:
        c.patch_spec("frozen", {"training": {"learningRate": 0.1}})
    assert "spec.training is immutable" in json.loads(err.value.body)["message"]
    with pytest.raises(ApiException) as err:
        c.patch_spec("frozen", {"resources": {"nodes": 1}})
    assert "resources.nodes, gpusPerNode and processesPerNode are immutable" in json.loads(err.value.body)["message"]
    c.patch_spec("frozen", {"runPolicy": {"suspend": True}})
    wait_phase(c, "frozen", "Suspended")


def test_an_operator_killed_mid_run_converges_without_duplicates(cluster: Cluster, operator):
    c = cluster
    c.apply(manifest("crashy", CLUSTER_RUN))
    wait_phase(c, "crashy", "Running")
    operator.kill()
    c.finish_pods("crashy", 1, "Succeeded")  # the run finishes while nobody watches
    operator.start()
    wait_phase(c, "crashy", "Succeeded")
    assert [j.metadata.name for j in c.jobs("crashy")] == ["crashy-a1"]
    assert c.get("crashy")["status"]["attempt"] == 1


def test_operator_metrics_count_reconciles_and_phases(cluster: Cluster, operator):
    c = cluster
    before = _metric_values(operator)
    c.apply(manifest("counted", CLUSTER_RUN))
    wait_phase(c, "counted", "Running")
    # The gauge follows the status patch within the same reconcile
    values = wait_for(lambda: (v := _metric_values(operator))['lorafinetune_operator_resources{phase="Running"}']
                      >= 1 and v, 10, "the Running gauge")  # fmt: skip
    def reconciles(source: str) -> float:
        return values.get(f'lorafinetune_operator_reconciles_total{{handler="{source}"}}', 0)

    assert reconciles("change") > 0  # the create event
    # Its Job and pods changed as the pods got ready (queued by whichever event came first; the rest coalesce)
    assert reconciles("job-event") + reconciles("pod-event") > 0
    assert values["lorafinetune_operator_attempts_started_total"] >= 1
    # Where its apply -> Job went: the operator's own share, and the API server's answer to the Job create
    def new(name: str) -> float:
        return values.get(name, 0) - before.get(name, 0)

    assert new("lorafinetune_operator_first_job_seconds_count") >= 1
    assert 0 < new("lorafinetune_operator_first_job_seconds_sum") < 30
    assert new('lorafinetune_operator_api_request_duration_seconds_count{resource="jobs",verb="create"}') >= 1
    # Its attempt written to its status (held at most 10 s while other new fine-tunes wait for Jobs), and the gauge
    # of statuses held exported
    assert new("lorafinetune_operator_attempt_recorded_seconds_count") >= 1
    assert 0 < new("lorafinetune_operator_attempt_recorded_seconds_sum") < 15
    assert "lorafinetune_operator_statuses_held" in values


def test_a_running_run_is_reconciled_on_its_events_and_deadlines_not_on_a_timer(cluster: Cluster, operator,
                                                                                 kubeconfig, tmp_path):  # fmt: skip
    c = cluster
    # An operator of its own, for this namespace only: the shared one's clock also serves other tests' runs (a
    # finished run's TTL, a problem only the clock can see fixed), which would count here.
    operator.stop()
    own = Operator(kubeconfig, tmp_path / "operator.log", LFT_NAMESPACES=c.ns)
    own.start()
    try:
        c.apply(manifest("quiet", CLUSTER_RUN, runPolicy={"activeDeadlineSeconds": 20}))
        wait_phase(c, "quiet", "Running")

        def clock() -> float:
            return _metric_values(own).get('lorafinetune_operator_reconciles_total{handler="clock"}', 0)

        before = clock()
        time.sleep(5)  # five of the test operator's 1 s reconcile intervals, each of which reconciled it before
        assert clock() == before, "a running run with nothing changing was reconciled by the clock"
        # The clock still ends it at its deadline: no event comes for that
        status = wait_phase(c, "quiet", "Failed", timeout=30)
        assert condition(status, "Failed")["reason"] == "DeadlineExceeded" and clock() > before
    finally:
        own.stop()
        operator.start()


def _metric_values(operator) -> dict[str, float]:
    text = operator.metrics()
    return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line and line[0] != "#"}


def test_finished_runs_cost_nothing_and_deleting_one_needs_no_operator(cluster: Cluster, operator):
    c = cluster
    c.apply(manifest("rest", CLUSTER_RUN, runPolicy={"ttlSecondsAfterFinished": 2}))
    wait_phase(c, "rest", "Running")
    assert not c.get("rest")["metadata"].get("finalizers"), "nothing can make its deletion wait for the operator"
    c.finish_pods("rest", 1, "Succeeded")
    wait_phase(c, "rest", "Succeeded")
    status = wait_for(lambda: (s := c.get("rest")["status"]).get("childrenDeletedTime") and s, 30, "the TTL")
    wait_for(lambda: not c.jobs("rest"), 30, "the TTL to delete the Job")

    # Once no run is live (other tests' namespaces are gone), the finished one costs no API request per tick.
    live = ("Pending", "Running", "Retrying", "Suspended")
    wait_for(lambda: sum(_metric_values(operator)[f'lorafinetune_operator_resources{{phase="{p}"}}'] for p in live)
             == 0 or None, 60, "no live run known to the operator")  # fmt: skip

    def requests() -> float:
        # Not the informers' watches: each is one long-lived request, renewed every few minutes, whatever is at rest
        return sum(v for k, v in _metric_values(operator).items()
                   if k.startswith("lorafinetune_operator_api_requests_total") and 'verb="watch"' not in k)  # fmt: skip

    before = requests()
    time.sleep(6)  # six ticks of the test operator's 1 s timer
    assert requests() == before, "a finished run cost API requests at rest"
    assert c.get("rest")["status"]["childrenDeletedTime"] == status["childrenDeletedTime"], "the TTL acted once"

    operator.stop()
    try:
        c.delete("rest")
        wait_for(lambda: not c.custom.list_namespaced_custom_object("lorafinetune.io", "v1alpha1", c.ns,
                                                                    "lorafinetunes")["items"],
                 15, "the fine-tune to be deleted while no operator runs")  # fmt: skip
    finally:
        operator.start()


def _owner_uid(obj) -> str:
    return next(ref.uid for ref in obj.metadata.owner_references if ref.controller)


def _config(job) -> dict:
    """The trainer config an attempt's pods read (their downward API volume projects this annotation)."""
    return json.loads(job.spec.template.metadata.annotations["lorafinetune.io/config"])


def test_a_recreated_fine_tune_waits_for_the_old_ones_pods_and_adopts_nothing_of_it(cluster: Cluster):
    c = cluster
    old = c.apply(manifest("again", CLUSTER_RUN))
    wait_phase(c, "again", "Running")
    for pod in c.pods("again", 1):  # the old pods write a last checkpoint for 8 s after SIGTERM
        c.core.patch_namespaced_pod(pod.metadata.name, c.ns,
                                    {"metadata": {"annotations": {"test.lorafinetune.io/terminate-after": "8s"}}})
    old_job_uid = c.jobs("again")[0].metadata.uid
    c.delete("again")
    wait_for(lambda: all(p.metadata.deletion_timestamp for p in c.pods("again", 1)) or None, 30, "old pods stopping")
    new = c.apply(manifest("again", CLUSTER_RUN))  # same name, new UID, same output
    assert new["metadata"]["uid"] != old["metadata"]["uid"]

    def old_pods():
        return [p for p in c.pods("again", 1) if _owner_uid(p) == old_job_uid]

    reasons = set()

    def running():
        status = c.get("again").get("status") or {}
        reasons.update(x["reason"] for x in status.get("conditions", []) if x["type"] == "Ready")
        return status.get("phase") == "Running" and status

    wait_for(running, 90, "the new fine-tune to run")
    assert not old_pods(), "the new attempt started while the old fine-tune's pods could still write the output"
    assert reasons & {"PreviousAttemptStopping", "NameInUse"}, reasons
    [job] = c.jobs("again")
    assert _owner_uid(job) == new["metadata"]["uid"]
    assert _owner_uid(c.core.read_namespaced_service("again", c.ns)) == new["metadata"]["uid"]


def test_a_child_name_held_by_another_object_is_not_adopted(cluster: Cluster):
    c = cluster
    squatter = client.V1Service(metadata=client.V1ObjectMeta(name="squat"),
                                spec=client.V1ServiceSpec(cluster_ip="None", ports=[client.V1ServicePort(port=80)]))
    c.core.create_namespaced_service(c.ns, squatter)
    c.apply(manifest("squat", CLUSTER_RUN))
    ready = wait_for(lambda: (r := condition(c.get("squat")["status"], "Ready"))["reason"] == "NameInUse" and r, 30,
                     "NameInUse")  # fmt: skip
    assert "Service squat already exists and belongs to nobody" in ready["message"]
    assert not c.jobs("squat") and c.get("squat")["status"]["attempt"] == 0
    c.core.delete_namespaced_service("squat", c.ns)
    wait_phase(c, "squat", "Running")
    [job] = c.jobs("squat")
    assert _config(job)["name"] == "squat"
    assert _owner_uid(c.core.read_namespaced_service("squat", c.ns)) == job.metadata.owner_references[0].uid


def test_an_edited_mutable_field_reaches_the_next_attempt(cluster: Cluster):
    c = cluster
    secret = client.V1Secret(metadata=client.V1ObjectMeta(name="s3-creds"), string_data={"AWS_ACCESS_KEY_ID": "a",
                             "AWS_SECRET_ACCESS_KEY": "b"})  # fmt: skip
    c.core.create_namespaced_secret(c.ns, secret)
    s3 = {"endpointUrl": "http://old-endpoint:9000", "credentialsSecret": "s3-creds"}
    c.apply(manifest("moved", CLUSTER_RUN, output={"uri": "s3://adapters/run1"}, s3=s3, runPolicy={"backoffLimit": 2}))
    wait_phase(c, "moved", "Running")
    c.patch_spec("moved", {"s3": {"endpointUrl": "http://new-endpoint:9000"}})
    c.finish_pods("moved", 1, "Failed", only=0, exit_code="1")  # e.g. the old endpoint went away
    wait_for(lambda: c.get("moved")["status"]["attempt"] == 2, 60, "attempt 2")
    first, second = sorted(c.jobs("moved"), key=lambda job: job.metadata.name)
    assert _config(second)["spec"]["s3"]["endpointUrl"] == "http://new-endpoint:9000"
    assert _config(first)["spec"]["s3"]["endpointUrl"] == "http://old-endpoint:9000", "attempt 1 ran with the old"


def test_two_replicas_one_acts_and_the_other_takes_over_when_it_dies(cluster: Cluster, operator, kubeconfig,
                                                                    tmp_path):  # fmt: skip
    c = cluster
    operator.stop()  # the session's operator would act too
    env = {"LFT_LEADER_ELECTION": "true", "LFT_LEADER_LEASE": "lorafinetune-operator", "LFT_LEASE_SECONDS": "6",
           "LFT_OPERATOR_NAMESPACE": c.ns, "LFT_LOG_FORMAT": "json"}  # fmt: skip
    replicas = [Operator(kubeconfig, tmp_path / f"replica-{i}.log", **env) for i in range(2)]
    try:
        for replica in replicas:
            replica.start()  # live (/healthz) whether leading or waiting
        leader = wait_for(lambda: [r for r in replicas if "leading as" in r.log.read_text()], 30, "a leader")
        assert len(leader) == 1, "two replicas lead"
        [leader] = leader
        [standby] = [r for r in replicas if r is not leader]
        assert "waiting to lead" in standby.log.read_text()

        c.apply(manifest("ha", CLUSTER_RUN, runPolicy={"backoffLimit": 2}))
        wait_phase(c, "ha", "Running")
        c.finish_pods("ha", 1, "Failed", only=0, exit_code="1")
        wait_phase(c, "ha", "Retrying", timeout=30)
        assert f"{c.ns}/ha:" not in standby.log.read_text(), "the standby acted"
        leader.kill()  # mid-retry: the backoff is running, attempt 2 not yet created
        status = wait_for(lambda: (s := c.get("ha")["status"]).get("phase") == "Running" and s["attempt"] == 2 and s,
                          60, "the new leader to start attempt 2")  # fmt: skip
        assert "leading as" in standby.log.read_text()
        c.finish_pods("ha", 2, "Succeeded")
        status = wait_phase(c, "ha", "Succeeded")
        assert status["failedAttempts"] == 1
        assert sorted(j.metadata.name for j in c.jobs("ha")) == ["ha-a1", "ha-a2"], "a duplicate or missing Job"
        lease = client.CoordinationV1Api(c.api).read_namespaced_lease("lorafinetune-operator", c.ns)
        assert lease.spec.lease_transitions == 1 and lease.spec.holder_identity in standby.log.read_text()
        # LFT_LOG_FORMAT=json: every line an object; transitions carry the fine-tune as fields of their own
        lines = [json.loads(line) for line in standby.log.read_text().splitlines()]
        transitions = [e for e in lines if e.get("finetune") == "ha"]
        assert {(e["namespace"], e["reason"]) for e in transitions} >= {(c.ns, "AllPodsRunning"),
                                                                        (c.ns, "TrainingComplete")}  # fmt: skip
        assert all(e["message"].startswith(f"{c.ns}/ha: {e['reason']}: ") for e in transitions)
    finally:
        for replica in replicas:
            replica.stop()
        operator.start()
