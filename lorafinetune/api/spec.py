"""`LoRAFineTune.spec`: the one typed source of truth for what a user can ask for.

The CRD's OpenAPI schema (crds/), the chart's copy and `kubectl explain` text are generated from these models, and
the same models validate manifests in local runs, so every field's description says its unit, default and why.
Cross-field rules are declared once per type (`RULES`, see rules.py): the same declaration is a pydantic check
(local runs, `lorafinetune validate`) and a CEL rule (`x-kubernetes-validations`, enforced by the API server). Every
string and list is bounded, which also keeps CEL within the API server's cost budget.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from lorafinetune.api.base import APIModel
from lorafinetune.api.rules import F, Rule
from lorafinetune.api.uris import Scheme, StorageURI, URIOf

PositiveInt = Annotated[int, Field(ge=1)]
K8sObject = dict[str, Any]  # a Kubernetes type (affinity, tolerations, ...) passed through to the pod unchanged


def cel(rule: str, message: str) -> dict:
    """A CEL validation rule attached to a model's schema (picked up by the CRD generator)."""
    return {"rule": rule, "message": message}


def immutable(field: str) -> dict:
    """CEL transition rule: the API server refuses changes to this part of the spec after creation, because a
    retry resumes from checkpoints that were made with it."""
    return {
        "x-kubernetes-validations": [
            cel("self == oldSelf", f"spec.{field} is immutable: create a new LoRAFineTune to train with other settings")
        ]
    }


_SECRET_NAME = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"  # a Kubernetes object name (DNS-1123 subdomain)
_LABEL_VALUE = r"^[a-z0-9]([-a-z0-9.]{0,61}[a-z0-9])?$"  # an object name that is also a label value
_PINNED_HF = r"@[0-9a-f]{40}$"  # hf://org/name@<commit>
URI_MAX = 2048  # characters in a storage URI
# Schemes each URI accepts: the field's CRD pattern and its Python check (parse_uri) are both made from these.
MODEL_SCHEMES: tuple[Scheme, ...] = ("hf", "pvc", "s3", "file", "package")
DATA_SCHEMES: tuple[Scheme, ...] = ("file", "pvc", "s3")
OUTPUT_SCHEMES: tuple[Scheme, ...] = ("pvc", "s3", "file")
NAME_MAX = 253  # a Kubernetes object name
# Schemes a cluster can serve: file:// is a path inside the pod (lost with it) and package:// a Python package on the
# local machine; both work in local runs only.
CLUSTER_ONLY = " (file:// and package:// work in local runs only: a pod's file:// output is lost with the pod)"


class ModelSpec(APIModel):
    """The base model to fine-tune."""

    RULES = (
        Rule(~F("trustRemoteCode") | ~F("uri").startswith("hf://") | F("uri").matches(_PINNED_HF),
             "model.trustRemoteCode runs the repository's Python code in your pods: pin model.uri to a commit "
             "(hf://org/name@<40-hex commit>) so the code that runs is the code you reviewed"),
        Rule(~F("tokenSecret").has() | F("uri").startswith("hf://"), "model.tokenSecret is only used for hf:// models"),
        Rule(F("uri").matches("^(hf|pvc|s3)://"),
             "model.uri must be hf://, pvc:// or s3:// in a cluster" + CLUSTER_ONLY, cluster=True),
    )  # fmt: skip

    uri: Annotated[StorageURI, URIOf(MODEL_SCHEMES, URI_MAX)] = Field(
        description="Where the base model is: hf://org/name[@revision] (Hugging Face Hub), pvc://claim/path, "
        "s3://bucket/prefix, file:///abs/path, or package://python_package (a model shipped in an installed "
        "Python package, local runs only).",
    )
    gguf_file: str | None = Field(
        default=None,
        max_length=255,
        description="Name of a GGUF file inside `uri` to load instead of safetensors weights. The weights are "
        "dequantised to `dtype` once and cached as an ordinary checkpoint, because transformers refuses to train "
        "or save a model it loaded from GGUF.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="dtype the frozen base weights are loaded in. `auto` follows the precision training computes in "
        "(bf16 -> bfloat16, fp16 -> float16, fp32 -> float32), training.precision `auto` as resolved on the machine.",
    )
    quantization: Literal["nf4", "int8"] | None = Field(
        default=None,
        description="Load the frozen base weights quantized with bitsandbytes (QLoRA): nf4 is 4-bit NormalFloat with "
        "double quantization (about 0.52 bytes per weight of the decoder's linear layers), int8 is LLM.int8() "
        "(about 1 byte). Embeddings, norms and the output layer stay unquantized (in `dtype`, or in the 16-bit "
        "training.precision when that is bf16 or fp16), and the LoRA weights train in training.precision as usual. "
        "Cuts the base weights' memory about 4x (nf4) or 2x (int8) against 16-bit, "
        "for slower steps. Needs deepspeed.zeroStage 0, 1 or 2. The adapter applies to the unquantized base model.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Allow the model repository to run its own Python code. Off by default: it executes code "
        "from the model source inside your pods.",
    )

    token_secret: str | None = Field(
        default=None,
        pattern=_SECRET_NAME,
        max_length=253,
        description="Name of a Secret in the same namespace with key HF_TOKEN, for gated or private hf:// models: "
        "passed to the pods as the HF_TOKEN variable by reference (never copied into config, status, events or "
        "logs). Local runs read HF_TOKEN from your environment.",
    )

    @field_validator("gguf_file")
    @classmethod
    def _gguf(cls, v: str | None) -> str | None:
        if v is not None and ("/" in v or not v.endswith(".gguf")):
            raise ValueError(f"{v!r} must be a file name ending in .gguf inside model.uri, without '/'")
        return v


class DatasetSpec(APIModel):
    """JSON Lines training data and how to turn it into tokens."""

    RULES = (
        Rule(~(F("validation").has() & F("validationSplit").has() & (F("validationSplit") > 0.0)),
             "set either dataset.validation (a file) or dataset.validationSplit (a fraction), not both"),
        Rule(F("train").matches("^(pvc|s3)://") & (~F("validation").has() | F("validation").matches("^(pvc|s3)://")),
             "dataset.train and dataset.validation must be pvc:// or s3:// in a cluster" + CLUSTER_ONLY, cluster=True),
    )  # fmt: skip

    train: Annotated[StorageURI, URIOf(DATA_SCHEMES, URI_MAX)] = Field(
        description="JSONL file with training rows: file://, pvc:// or s3:// URI.",
    )
    validation: Annotated[StorageURI, URIOf(DATA_SCHEMES, URI_MAX)] | None = Field(
        default=None,
        description="JSONL file with held-out rows for evaluation; same schemes as `train`.",
    )
    validation_split: float | None = Field(
        default=None,
        ge=0.0,
        lt=0.5,
        description="Fraction of `train` held out (seeded by training.seed) when no validation file is given. "
        "Default 0.1 when `validation` is unset; 0 disables evaluation.",
    )
    format: Literal["text", "completion", "chat"] = Field(
        default="chat",
        description='Row format. text: {"text"}; all tokens trained. completion: {"prompt", "completion"}; '
        'the prompt is masked out of the loss. chat: {"messages": [{"role", "content"}]} rendered with the '
        "model's chat template; only assistant turns (with their end-of-turn token) are trained.",
    )
    max_seq_length: int = Field(
        default=1024,
        ge=16,
        le=131072,
        description="Tokens per example (or per packed sequence). Longer examples are truncated from the end.",
    )
    packing: bool = Field(
        default=False,
        description="Pack several examples into one sequence to remove padding. Each example keeps its own "
        "position ids and attends only to itself (block-diagonal mask), so results equal unpacked training.",
    )
    train_on_prompt: bool = Field(
        default=False,
        description="Also train on prompt / user tokens. Off by default: the loss is on completions only.",
    )
    share_prefix: bool = Field(
        default=True,
        description="Compute the tokens that every row of a micro-batch begins with (a system prompt, an "
        "instruction template) once per micro-batch: each row's other tokens attend to that one copy with their "
        "own positions, so losses and gradients equal separate rows' (dropout draws one mask for the shared "
        "tokens). Applied where it costs less (rows short next to the shared part, at most 2,048 tokens in all); not "
        "with packing, on GPUs' variable-length attention or for models whose attention is not plain causal "
        "attention (sliding windows, recurrent layers).",
    )

    @property
    def effective_validation_split(self) -> float:
        if self.validation is not None:
            return 0.0
        return 0.1 if self.validation_split is None else self.validation_split


class LoRASpec(APIModel):
    """The LoRA adapter (PEFT `LoraConfig`)."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the low-rank update matrices.")
    alpha: float = Field(
        default=32.0, gt=0, description="Scaling numerator: updates are scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."
    )
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    RULES = (
        Rule(~(F("targetModules").contains("all-linear") & (F("targetModules").size() > 1)),
             "use either [\"all-linear\"] or a list of module names in lora.targetModules, not both"),
    )  # fmt: skip

    target_modules: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description='Module names to adapt (e.g. q_proj, v_proj) or ["all-linear"] for every linear layer except '
        "the output head.",
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised LoRA scaling (alpha/sqrt(r)).")
    use_dora: bool = Field(
        default=False,
        description="Weight-decomposed LoRA (DoRA): adds a magnitude vector per adapted module; slower per step.",
    )


# The torch dtype (by name) each training.precision computes in, once `auto` is resolved.
PRECISION_DTYPE = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def concrete_precision(precision: str, *, on_gpu: bool, native_bf16: bool) -> str:
    """What training.precision trains in on this hardware: `auto` is bf16 where it is computed natively (GPUs from
    Ampere on, CPUs with AVX512-BF16 or AMX), else fp16 with loss scaling on a GPU and fp32 on a CPU, which emulates
    both half types (a quick start step: 88 s in bf16 against about 30 s in fp32 on an AVX2 CPU)."""
    if precision != "auto":
        return precision
    if native_bf16:
        return "bf16"
    return "fp16" if on_gpu else "fp32"


class TrainingSpec(APIModel):
    """Optimisation settings. Exactly one of `epochs` and `maxSteps`."""

    RULES = (
        Rule(F("epochs").has() != F("maxSteps").has(), "set exactly one of training.epochs and training.maxSteps"),
    )

    epochs: float | None = Field(default=None, gt=0, le=1000, description="Passes over the training set.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps to run (overrides epochs).")
    learning_rate: float = Field(default=2e-4, gt=0, le=1.0, description="Peak learning rate of AdamW.")
    lr_scheduler: Literal["linear", "cosine", "constant"] = Field(
        default="cosine", description="Decay after warm-up: to 0 (linear, cosine) or none (constant)."
    )
    warmup_ratio: float = Field(default=0.03, ge=0.0, lt=1.0, description="Fraction of steps with linear warm-up.")
    micro_batch_size: int = Field(default=4, ge=1, le=4096, description="Sequences per process per forward pass.")
    gradient_accumulation_steps: int = Field(
        default=1, ge=1, le=4096, description="Micro-batches per optimizer step. Global batch = micro x accum x ranks."
    )
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0, description="AdamW decoupled weight decay.")
    max_grad_norm: float = Field(
        default=1.0, ge=0.0, description="Clip the global gradient norm to this value; 0 disables clipping."
    )
    seed: int = Field(default=42, ge=0, description="Seeds the LoRA init, data order, validation split and dropout.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        default="auto",
        description="Compute precision. `auto` picks per machine when training starts: bf16 on GPUs from Ampere on "
        "and on CPUs with AVX512-BF16 or AMX (1.4x fp32's speed on the quick start), fp16 with loss scaling on "
        "older GPUs, fp32 on other CPUs, which emulate bf16 about 20x slower than fp32.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in the backward pass: less memory, about a third more compute.",
    )


class DeepSpeedSpec(APIModel):
    """DeepSpeed ZeRO sharding."""

    RULES = (
        Rule(~F("offloadParams") | (F("zeroStage") == 3), "deepspeed.offloadParams needs zeroStage 3"),
        Rule(~F("offloadOptimizer") | (F("zeroStage") >= 1), "deepspeed.offloadOptimizer needs zeroStage >= 1"),
    )

    zero_stage: int = Field(
        default=2,
        ge=0,
        le=3,
        description="0: data parallel; 1: shard optimizer states; 2: also gradients; 3: also parameters.",
    )
    offload_optimizer: bool = Field(default=False, description="Keep optimizer states in CPU memory (stage >= 1).")
    offload_params: bool = Field(default=False, description="Keep parameters in CPU memory (stage 3 only).")


class EarlyStoppingSpec(APIModel):
    """Stop when the evaluation loss stops improving."""

    patience: int = Field(default=3, ge=1, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(default=0.0, ge=0.0, description="Smallest decrease of eval loss that counts.")


class EvaluationSpec(APIModel):
    """Evaluation on the held-out split (loss and perplexity; logits are never accumulated)."""

    every_steps: int = Field(
        default=50, ge=1, description="Evaluate every N optimizer steps (and always before step 1 and at the end)."
    )
    early_stopping: EarlyStoppingSpec | None = Field(default=None, description="Optional early stopping.")


class CheckpointingSpec(APIModel):
    """Resumable checkpoints (adapter, optimizer, scheduler, data position, RNG), written atomically."""

    every_steps: int = Field(default=100, ge=1, description="Checkpoint every N optimizer steps.")
    keep_last: int = Field(default=2, ge=1, le=100, description="Complete checkpoints kept; older ones are removed.")


class ResourcesSpec(APIModel):
    """Where and on how much hardware the trainer runs."""

    RULES = (
        Rule((F("gpusPerNode") == 0) | ~F("processesPerNode").has() | (F("processesPerNode") == F("gpusPerNode")),
             "resources.processesPerNode must equal gpusPerNode when GPUs are used (one process per GPU), or be "
             "left unset"),
    )  # fmt: skip

    nodes: int = Field(default=1, ge=1, le=1024, description="Pods (machines); one torchrun agent each.")
    gpus_per_node: int = Field(default=1, ge=0, le=16, description="nvidia.com/gpu per pod; 0 trains on CPU.")
    processes_per_node: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Training processes per node. Default: gpusPerNode, or 1 on CPU. Must equal gpusPerNode "
        "when GPUs are used (one process per GPU).",
    )
    gpu_memory: str | None = Field(
        default=None,
        pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti)$",
        max_length=32,
        description="Memory of one GPU, e.g. 80Gi, for the operator's check that the run fits before any pod holds "
        "a GPU. Default: the nodes' nvidia.com/gpu.memory label (GPU feature discovery); without either, no check.",
    )
    resources: K8sObject | None = Field(
        default=None,
        description="Pod container resources (requests/limits of cpu, memory); nvidia.com/gpu is set from gpusPerNode.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    image: str | None = Field(
        default=None, max_length=512, description="Trainer image; default: the operator's configured image."
    )
    node_selector: dict[Annotated[str, Field(max_length=317)], Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=64, description="Pod nodeSelector."
    )
    tolerations: list[K8sObject] | None = Field(
        default=None,
        max_length=64,
        description="Pod tolerations.",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
    )
    affinity: K8sObject | None = Field(
        default=None, description="Pod affinity.", json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    priority_class_name: str | None = Field(
        default=None, max_length=NAME_MAX, pattern=_SECRET_NAME, description="Pod priorityClassName."
    )
    service_account_name: str | None = Field(
        default=None, max_length=NAME_MAX, pattern=_SECRET_NAME, description="Pod serviceAccountName."
    )

    @property
    def procs_per_node(self) -> int:
        return self.processes_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


class OutputSpec(APIModel):
    """Where the adapter, summary, model card and checkpoints go."""

    RULES = (
        Rule(F("uri").matches("^(pvc|s3)://"), "output.uri must be pvc:// or s3:// in a cluster" + CLUSTER_ONLY,
             cluster=True),
    )  # fmt: skip

    uri: Annotated[StorageURI, URIOf(OUTPUT_SCHEMES, URI_MAX)] = Field(
        description="Output folder: pvc://claim/path, s3://bucket/prefix or file:///abs/path.",
    )
    merge_adapter: bool = Field(
        default=False,
        description="Also write the base model with the adapter folded in to <output>/merged, in model.dtype (auto: "
        "the dtype of training.precision), with the tokenizer: a model plain transformers loads and serves without "
        "PEFT. Merged after training on rank 0's CPU, in fp32, then checked against the adapted model's logits: it "
        "needs host memory for about 4 bytes per base parameter.",
    )

    @property
    def per_node_scratch(self) -> bool:
        """An s3:// output: each node trains in a scratch folder of its own, mirrored to S3 (no folder is shared).
        Otherwise every node shares the one folder (a PVC, or a local path)."""
        return self.uri.scheme == "s3"


class S3Spec(APIModel):
    """Connection to S3 or an S3-compatible store, used for every s3:// URI in the spec."""

    RULES = (
        Rule(~F("endpointUrl").has() | F("endpointUrl").matches("^https?://[^/]"),
             "s3.endpointUrl must start with http:// or https:// and name a host"),
    )  # fmt: skip

    endpoint_url: str | None = Field(
        default=None,
        max_length=URI_MAX,
        description="Endpoint of an S3-compatible store (http(s)://host:port); unset for AWS S3.",
    )
    region: str | None = Field(
        default=None, max_length=64, pattern=r"^[a-z0-9-]+$", description="Region, e.g. us-east-1."
    )
    credentials_secret: str | None = Field(
        default=None,
        max_length=NAME_MAX,
        pattern=_SECRET_NAME,
        description="Name of a Secret in the same namespace with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        "passed to pods by reference (never copied into config, status or logs). Unset: the pod's own identity.",
    )


class RunPolicySpec(APIModel):
    """Retries, deadlines, queueing and clean-up of the whole run."""

    RULES = (
        Rule(~F("queuePriorityClass").has() | F("queueName").has(),
             "runPolicy.queuePriorityClass needs runPolicy.queueName (Kueue orders only what it queues)"),
    )  # fmt: skip

    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Failed attempts retried (whole gang, resuming from the last checkpoint)."
    )
    disruption_limit: int = Field(
        default=20,
        ge=0,
        le=1000,
        description="Attempts stopped by a disruption (preemption, eviction, node drain, spot reclaim: a pod with the "
        "DisruptionTarget condition) restarted without counting against backoffLimit; the run fails above this many.",
    )
    pending_timeout_seconds: int = Field(
        default=1800,
        ge=30,
        le=604800,
        description="Fail an attempt whose pods are not all running after this many seconds (quota, image pull, "
        "unschedulable, config error), naming the cause; its pods are released and it counts against backoffLimit.",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the run (DeadlineExceeded) after this many seconds since it started."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the run's pods, Jobs and config this long after it finishes."
    )
    suspend: bool = Field(
        default=False, description="Stop the running attempt after a checkpoint; set back to false to resume."
    )
    queue_name: str | None = Field(
        default=None,
        max_length=63,
        pattern=_LABEL_VALUE,
        description="Kueue LocalQueue (in this namespace) that admits the run: each attempt's Job is created suspended "
        "with the kueue.x-k8s.io/queue-name label, so Kueue starts all of its pods or none (gang admission) when the "
        "ClusterQueue has quota. Phase Queued while it waits; a Kueue preemption counts as a disruption. Unset: the "
        "pods are created at once.",
    )
    queue_priority_class: str | None = Field(
        default=None,
        max_length=63,
        pattern=_LABEL_VALUE,
        description="Kueue WorkloadPriorityClass of the run (kueue.x-k8s.io/priority-class): orders the queue and "
        "decides which admitted run Kueue preempts. Needs queueName.",
    )


class LoRAFineTuneSpec(APIModel):
    """What to fine-tune, on what, how, and where the adapter goes."""

    RULES = (
        Rule(~F("model.quantization").has() | ~F("deepspeed").has() | (F("deepspeed.zeroStage") != 3),
             "model.quantization needs deepspeed.zeroStage 0, 1 or 2: ZeRO-3 would partition the quantized weights, "
             "which DeepSpeed cannot gather"),
        Rule(F("s3").has() | ~(F("model.uri").startswith("s3://") | F("dataset.train").startswith("s3://")
                               | (F("dataset.validation").has() & F("dataset.validation").startswith("s3://"))
                               | F("output.uri").startswith("s3://")),
             "s3:// URIs need spec.s3 (endpointUrl, region, credentialsSecret)"),
    )  # fmt: skip

    model: ModelSpec = Field(description="The base model.", json_schema_extra=immutable("model"))
    dataset: DatasetSpec = Field(description="Training and validation data.", json_schema_extra=immutable("dataset"))
    lora: LoRASpec = Field(
        default_factory=LoRASpec, description="LoRA adapter settings.", json_schema_extra=immutable("lora")
    )
    training: TrainingSpec = Field(
        default_factory=lambda: TrainingSpec(epochs=1),
        description="Optimisation.",
        json_schema_extra=immutable("training"),
    )
    deepspeed: DeepSpeedSpec = Field(
        default_factory=DeepSpeedSpec, description="DeepSpeed ZeRO settings.", json_schema_extra=immutable("deepspeed")
    )
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec, description="Held-out evaluation.")
    checkpointing: CheckpointingSpec = Field(default_factory=CheckpointingSpec, description="Checkpoints.")
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="Nodes, GPUs and pod scheduling.",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    "self.nodes == oldSelf.nodes && self.gpusPerNode == oldSelf.gpusPerNode && "
                    "has(self.processesPerNode) == has(oldSelf.processesPerNode) && "
                    "(!has(self.processesPerNode) || self.processesPerNode == oldSelf.processesPerNode)",
                    "resources.nodes, gpusPerNode and processesPerNode are immutable: checkpoints are sharded per "
                    "process; create a new LoRAFineTune to change the world size",
                )
            ]
        },
    )
    output: OutputSpec = Field(description="Where results go.", json_schema_extra=immutable("output"))
    s3: S3Spec | None = Field(default=None, description="S3 connection for s3:// URIs.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Retries, deadlines, clean-up.")
