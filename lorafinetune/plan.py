"""Per-rank peak memory of a fine-tune, from the model's config alone (never its weights), with a verdict and what to
change when it does not fit. Used by `lorafinetune plan` and by the operator before any pod holds a GPU.

The estimate counts what a rank holds at its peak, the start of the backward pass of the last micro-batch:

- frozen base weights (by dtype; ZeRO-3 shards them, plus the layers it gathers at a time; model.quantization
  stores the decoder's linear layers in 4 or 8 bits, plus one layer dequantized at a time);
- LoRA parameters, their gradients, fp32 master copies and AdamW moments (ZeRO >= 1 shards the optimizer states,
  >= 2 the gradients; offloadOptimizer moves the states to CPU memory);
- activations autograd saves per token per decoder layer, counted for a Llama-style block (RMSNorm, attention with
  rotary embeddings via SDPA, gated MLP) with LoRA (each adapted module's input; with dropout a mask, and on a GPU
  or with PEFT's layers a dropped-out copy); with gradient checkpointing only each layer's input is kept, plus one
  layer recomputed;
- the output layer's logits and the loss's buffers for one chunk of targets (the trainer scores at most
  LOSS_CHUNK_ELEMENTS logits at once, fusing the loss's gradient into that pass; under ZeRO-3 all of a micro-batch's
  at once, kept for backward), every token of the micro-batch taken as a target (prompts are not, so real chat and
  completion runs hold less);
- on a CPU, the holes glibc's heap keeps among the activations under the trainer's mmap threshold (about one more
  step's worth of them; larger buffers are mmap'ed and given back);
- DeepSpeed's gradient buckets (sized by the trainer to the trainable parameters) and a fixed runtime reserve (the
  CUDA context with cuBLAS and NCCL workspaces on a GPU; the interpreter and libraries on a CPU).

Sequences are taken at dataset.maxSeqLength (packed rows are that long; padded batches at most that). The numbers
are checked against measured peaks in benchmarks/memory_plan.py; see benchmarks/README for the error per
configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from lorafinetune.api.spec import PRECISION_DTYPE, LoRAFineTuneSpec, concrete_precision
from lorafinetune.contract import CPU_MMAP_THRESHOLD_BYTES, LOSS_CHUNK_ELEMENTS

GIB = 1024**3
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Bytes per quantized weight (bitsandbytes). nf4: 4 bits, an 8-bit absmax per block of 64 (double quantization),
# and an fp32 scale per 256 of those blocks. int8: 1 byte, plus an fp32 scale per output row (under 1 % for
# hidden sizes from 512 up, not counted).
QUANTIZED_BYTES = {"nf4": 0.5 + 1 / 64 + 4 / (64 * 256), "int8": 1.0}
# A CUDA context with cuBLAS and NCCL loaded takes 0.5-1 GiB before any tensor; a CPU rank with the trainer's
# modules imported (torch, transformers, PEFT, DeepSpeed) holds 733 MiB (measured on the development machine).
RUNTIME_RESERVE = {"gpu": int(1.0 * GIB), "cpu": 733 * 1024**2}
LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4, "KiB": 1024, "MiB": 1024**2,
          "GiB": 1024**3, "TiB": 1024**4, "K": 1000, "M": 1000**2, "G": 1000**3, "T": 1000**4}


def parse_memory(value: str, what: str = "memory") -> int:
    """Bytes in '80Gi', '80GiB', '79.6G' or '81559Mi'. GPU feature discovery's nvidia.com/gpu.memory label is a bare
    number of MiB: pass it with 'Mi' appended."""
    number = value.rstrip("KMGTiB")
    unit = value[len(number) :]
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in _UNITS or amount <= 0:
        raise PlanError(f"{what} {value!r}: expected a size such as 80Gi, 80GiB or 81559Mi")
    return int(amount * _UNITS[unit])


class PlanError(ValueError):
    """The model's config lacks what the estimate needs (an architecture this planner does not know)."""


@dataclass(frozen=True)
class Shape:
    """The parts of a Hugging Face config.json the estimate needs (Llama-style decoder)."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Shape:
        config = config.get("text_config") or config  # multimodal wrappers keep the language model's here
        needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        missing = [k for k in needed if not isinstance(config.get(k), int)]
        if missing:
            raise PlanError(
                f"the model's config.json (model_type {config.get('model_type')!r}) has no {', '.join(missing)}: "
                f"the memory plan knows Llama-style decoders (llama, mistral, qwen2, qwen3, gemma, smollm, ...)"
            )
        heads = config["num_attention_heads"]
        return cls(
            model_type=str(config.get("model_type", "")),
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder block."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    @property
    def block_linear_parameters(self) -> int:
        """Weights of one decoder block's linear layers (what quantization and ZeRO-3's gathering act on)."""
        return sum(a * b for a, b in self.linears().values())

    @property
    def base_parameters(self) -> int:
        block = self.block_linear_parameters + 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + self.layers * block + self.hidden


@dataclass(frozen=True)
class Item:
    what: str
    bytes: int


@dataclass(frozen=True)
class Plan:
    """Per-rank peak memory and, given a device size, whether it fits."""

    items: tuple[Item, ...]
    device: str  # "gpu" or "cpu"
    world_size: int
    trainable_parameters: int
    base_parameters: int
    capacity: int | None = None  # bytes per GPU (or per CPU rank), when known
    suggestions: tuple[str, ...] = ()
    precision: str = "fp32"  # what it trains in, training.precision auto resolved as _estimate says

    @property
    def total(self) -> int:
        return sum(i.bytes for i in self.items)

    @property
    def fits(self) -> bool | None:
        return None if self.capacity is None else self.total <= self.capacity

    def summary(self) -> str:
        """One line, for a condition message or an event."""
        need = f"needs {self.total / GIB:.1f} GiB per {'GPU' if self.device == 'gpu' else 'process'}"
        if self.capacity is None:
            return need
        line = f"{need}, {self.capacity / GIB:.1f} GiB available"
        return line + (f"; try: {self.suggestions[0]}" if self.suggestions else "") if not self.fits else line

    def table(self) -> str:
        width = max(len(i.what) for i in self.items)
        lines = [f"  {i.what:<{width}}  {i.bytes / GIB:8.2f} GiB" for i in self.items]
        lines.append(f"  {'total per ' + ('GPU' if self.device == 'gpu' else 'process'):<{width}}  "
                     f"{self.total / GIB:8.2f} GiB")  # fmt: skip
        return "\n".join(lines)


def _adapted(shape: Shape, targets: list[str]) -> dict[str, tuple[int, int]]:
    linears = shape.linears()
    if "all-linear" in targets:
        return linears
    unknown = [t for t in targets if t not in linears and t != "lm_head"]
    if unknown:
        raise PlanError(
            f"lora.targetModules {unknown} are not linear layers of a Llama-style block ({', '.join(LLAMA_LINEARS)})"
        )
    return {n: linears[n] for n in targets if n in linears}


def estimate(spec: LoRAFineTuneSpec, config: Mapping[str, Any], capacity: int | None = None) -> Plan:
    """The per-rank peak for `spec` on the model `config` describes; `capacity` is the memory of one GPU (bytes)."""
    plan = _estimate(spec, Shape.from_config(config), capacity)
    if plan.fits is False:
        plan = replace(plan, suggestions=tuple(_suggestions(spec, config, capacity)))
    return plan


def _estimate(spec: LoRAFineTuneSpec, shape: Shape, capacity: int | None) -> Plan:
    t, ds, lora, res = spec.training, spec.deepspeed, spec.lora, spec.resources
    world = res.world_size
    device = "gpu" if res.gpus_per_node > 0 else "cpu"
    # auto: bf16 on a GPU (fp16 on one before Ampere: the same bytes); fp32 on a CPU, the larger of the two a CPU
    # may pick (callers that know the CPU resolve it first, as the trainer does)
    precision = concrete_precision(t.precision, on_gpu=device == "gpu", native_bf16=device == "gpu")
    weight_dtype = PRECISION_DTYPE[precision]
    if precision == "fp32" and spec.model.dtype != "auto":
        weight_dtype = spec.model.dtype  # DeepSpeed casts to bf16/fp16 when those are on; fp32 keeps the load dtype
    wb = DTYPE_BYTES[weight_dtype]
    d = wb  # activations follow the weights' dtype; RMSNorm computes in fp32 (counted below)
    h, v = shape.hidden, shape.vocab
    adapted = _adapted(shape, lora.target_modules)
    r = lora.r
    lora_params = shape.layers * sum(r * (a + b) + (b if lora.use_dora else 0) for a, b in adapted.values())
    if "lm_head" in lora.target_modules:
        lora_params += r * (h + v)
    base = shape.base_parameters
    items: list[Item] = []

    # Frozen weights.
    if spec.model.quantization:  # the decoder's linear layers quantized, the rest in the load dtype (ZeRO <= 2)
        quantized = shape.layers * shape.block_linear_parameters
        q_bytes = quantized * QUANTIZED_BYTES[spec.model.quantization]
        items.append(Item(f"base weights ({spec.model.quantization} linear layers, {(base - quantized) / 1e9:.2f} B "
                          f"other parameters in {weight_dtype})", math.ceil(q_bytes) + (base - quantized) * wb))
        items.append(Item(f"dequantized weight of the layer in use ({weight_dtype})",
                          max(a * b for a, b in shape.linears().values()) * wb))  # fmt: skip
    elif ds.zero_stage == 3:
        gathered = 2 * max(shape.block_linear_parameters, v * h) * wb  # the layer in use and the one prefetched
        held = 0 if ds.offload_params else math.ceil(base * wb / world)
        where = f"ZeRO-3 shard of {world}{', offloaded' if ds.offload_params else ''}"
        items.append(Item(f"base weights ({weight_dtype}, {where}) + gathered layers", held + gathered))
    else:
        items.append(Item(f"base weights ({weight_dtype}, {base / 1e9:.2f} B parameters)", base * wb))

    # LoRA parameters and optimizer side.
    shard_opt = world if ds.zero_stage >= 1 else 1
    shard_grad = world if ds.zero_stage >= 2 else 1
    shard_param = world if ds.zero_stage == 3 else 1
    items.append(Item(f"LoRA parameters ({lora_params / 1e6:.1f} M)", math.ceil(lora_params * wb / shard_param)))
    items.append(Item("LoRA gradients", math.ceil(lora_params * wb / shard_grad)))
    states = 8 + (4 if wb != 4 else 0)  # AdamW's two fp32 moments, plus an fp32 master copy under bf16/fp16
    if ds.offload_optimizer:
        items.append(Item("optimizer states (offloaded to CPU memory)", 0))
    else:
        items.append(Item(f"optimizer states (fp32 AdamW{' + master' if wb != 4 else ''})",
                          math.ceil(lora_params * states / shard_opt)))  # fmt: skip

    # Activations saved for backward, per token.
    tokens = t.micro_batch_size * spec.dataset.max_seq_length
    # With LoRA dropout, what backward keeps of each adapted layer's input (trainer/lora_linear.py): the fused layers
    # (ZeRO <= 2, an unquantized base, plain LoRA) keep a bool mask and, on a GPU, the dropped-out copy, while on a
    # CPU they share the input itself; PEFT's layers keep the copy and a mask, in the input's dtype on a CPU.
    fused_lora = ds.zero_stage < 3 and not spec.model.quantization and not lora.use_dora
    dropped = lora.dropout > 0
    copy = dropped and not (fused_lora and device == "cpu")
    mask_bytes = (1 if fused_lora or device == "gpu" else d) if dropped else 0
    # SDPA runs in fp32 on a CPU in half precision (trainer/attention.py): it keeps fp32 copies.
    attention_bytes = 4 if device == "cpu" else d
    saved = _saved_per_token_per_layer(shape, adapted, r, d, copy, mask_bytes, attention_bytes)
    per_layer = sum(saved)
    if t.gradient_checkpointing:
        kept = [h * d] * shape.layers + saved  # every layer's input + one layer recomputed
        how = "layer inputs + one layer recomputed (gradient checkpointing)"
    else:
        kept = saved * shape.layers
        how = f"{per_layer / 1024:.0f} KiB per token per layer x {shape.layers} layers"
    items.append(Item(f"activations ({t.micro_batch_size} x {spec.dataset.max_seq_length} tokens; {how})",
                      tokens * sum(kept)))  # fmt: skip
    if device == "cpu":
        # glibc keeps buffers under the trainer's mmap threshold in its heap, and a step's do not fit the holes the
        # last step's left: at steady state the heap holds about one more step's worth of them (mallinfo2 on the
        # development machine: 1 x 256 tokens, 531 MiB live and 362-392 MiB free at each forward's end).
        in_heap = sum(b for b in kept if tokens * b < CPU_MMAP_THRESHOLD_BYTES)
        if in_heap:
            items.append(Item(f"heap holes (activations under {CPU_MMAP_THRESHOLD_BYTES >> 20} MiB each, CPU)",
                              tokens * in_heap))  # fmt: skip

    # Logits and loss (trainer/loss.py). Fused (a frozen output layer, ZeRO <= 2): one chunk's fp32 logits, turned
    # into their gradient in place, beside the compute-dtype output while it is copied (or the gradient's cast).
    # Otherwise: lm_head output, its fp32 copy, the log-softmax kept for backward, and in backward their gradients.
    fused = ds.zero_stage < 3 and "lm_head" not in lora.target_modules
    logit_bytes = 4 + (d if d != 4 else 0) if fused else d + (4 if d != 4 else 0) + 4 + 4 + d
    scored = min(tokens, max(1, LOSS_CHUNK_ELEMENTS // v)) if ds.zero_stage < 3 else tokens  # ZeRO-3: one chunk
    chunked = f", in chunks of {scored}" if scored < tokens else ""
    how = "fused loss" if fused else "logits and loss buffers"
    items.append(Item(f"{how} ({scored} targets at once{chunked})", scored * v * logit_bytes))

    if ds.zero_stage in (1, 2):
        items.append(Item("DeepSpeed gradient bucket", lora_params * (4 if ds.zero_stage == 1 else wb)))
    items.append(Item("runtime reserve" + (" (CUDA context, cuBLAS, NCCL)" if device == "gpu" else
                                           " (interpreter and libraries)"), RUNTIME_RESERVE[device]))  # fmt: skip
    return Plan(tuple(items), device, world, lora_params, base, capacity, precision=precision)


# Which tensor each linear layer of a block reads: layers that share an input share one saved copy of it.
_INPUT_OF = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
             "o_proj": "attention output", "gate_proj": "MLP input", "up_proj": "MLP input",
             "down_proj": "MLP product"}  # fmt: skip


def _saved_per_token_per_layer(shape: Shape, adapted: Mapping[str, tuple[int, int]], r: int, d: int,
                               dropped_copy: bool, mask_bytes: int, attention_bytes: int) -> list[int]:  # fmt: skip
    """Bytes per token of each tensor autograd keeps for one decoder block (frozen base, LoRA on `adapted`).

    A frozen linear layer keeps nothing of its input; LoRA's A keeps what it reads: the layer's input itself (one
    copy per shared input) or, with `dropped_copy`, its own dropped-out copy; and with dropout a mask of `mask_bytes`
    per input element. Attention computes in `attention_bytes` per element."""
    h, i_ = shape.hidden, shape.intermediate
    q = shape.heads * shape.head_dim
    saved = [h * 4] * 2  # two RMSNorms keep their fp32 input
    # SDPA keeps q, k and v (k and v repeated to every query head, as transformers passes them), its output (o_proj's
    # input unless attention computes in another dtype), and the log-sum-exp.
    saved += [q * attention_bytes] * 4 + [4 * shape.heads]
    saved += [i_ * d] * 3  # gate output (SiLU), its activation and the up projection (the product's factors)
    # What the layers reading a shared input keep of it (0: SDPA's output, kept anyway, when o_proj reads it as is)
    width = {"attention input": h, "attention output": 0 if attention_bytes == d else q, "MLP input": h,
             "MLP product": i_}  # fmt: skip
    kept_inputs = set()
    for name, (a, _b) in adapted.items():
        saved.append(r * d)  # lora_A's output, kept by lora_B
        if mask_bytes:
            saved.append(a * mask_bytes)
        if dropped_copy:
            saved.append(a * d)
        else:
            kept_inputs.add(_INPUT_OF[name])
    return saved + [width[i] * d for i in sorted(kept_inputs) if width[i]]


Changes = dict[str, dict[str, Any]]


def _suggestions(spec: LoRAFineTuneSpec, config: Mapping[str, Any], capacity: int | None) -> list[str]:
    """Changes that make it fit, each with its estimate: single changes first (cheapest first), else the shortest
    run of them, applied one after another, that does. The hardware stays first: changes that keep the run's
    numbers, then quantizing the base (QLoRA, which changes them), and only then more nodes."""
    if capacity is None:
        return []
    shape = Shape.from_config(config)

    def total(candidate: LoRAFineTuneSpec) -> int:
        return _estimate(candidate, shape, capacity).total

    steps, more_nodes = _changes(spec), _more_nodes(spec)
    quantize: list[tuple[str, Changes]] = []
    if spec.model.quantization is None:
        also = " with deepspeed.zeroStage: 2" if spec.deepspeed.zero_stage == 3 else ""
        also += " and deepspeed.offloadParams: false" if spec.deepspeed.offload_params else ""
        quantize.append((f"model.quantization: nf4 (QLoRA){also}",
                         {"model": {"quantization": "nf4"},
                          "deepspeed": {"zero_stage": min(spec.deepspeed.zero_stage, 2), "offload_params": False}}))
    singles: list[tuple[str, int]] = []
    for label, changes in steps + quantize + more_nodes:
        smaller_batch = label.startswith("training.microBatchSize")
        if smaller_batch and any(x.startswith("training.microBatchSize") for x, _ in singles):
            continue  # the largest micro-batch that fits is the one worth naming
        if (n := total(_applied(spec, changes))) <= capacity:
            singles.append((label, n))
    if singles:
        return [f"{label} ({n / GIB:.1f} GiB)" for label, n in singles[:3]]
    runs: list[tuple[LoRAFineTuneSpec, list[str], list[tuple[str, Changes]]]] = [(spec, [], steps)]
    for label, changes in quantize:
        quantized = _applied(spec, changes)
        runs.append((quantized, [label], _changes(quantized)))
    runs.append((spec, [], steps + more_nodes))
    for candidate, labels, chain in runs:
        for label, changes in chain:
            # a smaller micro-batch or more nodes replace the previous ones, so their labels are not listed twice
            replaced = next((p for p in ("training.microBatchSize", "resources.nodes") if label.startswith(p)), None)
            labels = [x for x in labels if not (replaced and x.startswith(replaced))]
            candidate, labels = _applied(candidate, changes), [*labels, label]
            if (n := total(candidate)) <= capacity:
                return [f"{' and '.join(labels)} ({n / GIB:.1f} GiB)"]
    return []


def _changes(spec: LoRAFineTuneSpec) -> list[tuple[str, Changes]]:
    """The changes that keep the run's numbers (up to rounding) and its hardware, cheapest first."""
    t, ds, res = spec.training, spec.deepspeed, spec.resources
    zero3_allowed = spec.model.quantization is None
    steps: list[tuple[str, Changes]] = []
    if not t.gradient_checkpointing:
        steps.append(("training.gradientCheckpointing: true", {"training": {"gradient_checkpointing": True}}))
    if ds.zero_stage < 3 and res.world_size > 1 and zero3_allowed:
        steps.append(("deepspeed.zeroStage: 3", {"deepspeed": {"zero_stage": 3}}))
    if not ds.offload_optimizer:
        steps.append(("deepspeed.offloadOptimizer: true",
                      {"deepspeed": {"offload_optimizer": True, "zero_stage": max(ds.zero_stage, 1)}}))  # fmt: skip
    micro = t.micro_batch_size
    while micro > 1:
        micro //= 2
        accum = t.gradient_accumulation_steps * (t.micro_batch_size // micro)
        steps.append((f"training.microBatchSize: {micro} with gradientAccumulationSteps: {accum} (same global batch)",
                      {"training": {"micro_batch_size": micro, "gradient_accumulation_steps": accum}}))  # fmt: skip
    return steps


def _more_nodes(spec: LoRAFineTuneSpec) -> list[tuple[str, Changes]]:
    if spec.model.quantization is not None:
        return []  # ZeRO-3 would shard the weights over the nodes, and it cannot with quantized ones
    return [(f"resources.nodes: {nodes} with deepspeed.zeroStage: 3",
             {"resources": {"nodes": nodes}, "deepspeed": {"zero_stage": 3}})
            for nodes in (2, 4, 8, 16, 32, 64) if nodes > spec.resources.nodes]  # fmt: skip


def _applied(base: LoRAFineTuneSpec, changes: Changes) -> LoRAFineTuneSpec:
    ds = changes.get("deepspeed", {})
    if "zero_stage" in ds and "model" not in changes:
        # A stage in a change is the least it needs (offloadOptimizer: 1), so an earlier step's ZeRO-3 in a chain
        # stays. Only quantizing lowers it: ZeRO-3 cannot shard quantized weights.
        changes = {**changes, "deepspeed": {**ds, "zero_stage": max(ds["zero_stage"], base.deepspeed.zero_stage)}}
    return base.model_copy(update={k: getattr(base, k).model_copy(update=v) for k, v in changes.items()})
