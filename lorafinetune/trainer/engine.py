"""The DeepSpeed side: the config dict (a pure function of the spec), the optimizer, and the LR schedule."""

from __future__ import annotations

import math
from typing import Any

import torch

from lorafinetune.api.spec import LoRAFineTuneSpec


def deepspeed_config(spec: LoRAFineTuneSpec, world_size: int, on_gpu: bool, trainable: int) -> dict[str, Any]:
    """DeepSpeed's JSON config for this spec, world size and number of trainable parameters."""
    t, ds = spec.training, spec.deepspeed
    # ZeRO allocates its gradient buckets at full size (500 M elements by default: 1 GB in bf16, per bucket) however
    # few parameters train; LoRA trains a few million, so size them to fit all of those in one bucket.
    bucket = max(trainable, 1 << 20)
    zero: dict[str, Any] = {"stage": ds.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.micro_batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "initial_scale_power": 16},
        # We pass a torch AdamW; on CPU-only machines DeepSpeed's CPU Adam would be compiled at start-up.
        "zero_force_ds_cpu_optimizer": on_gpu and ds.offload_optimizer,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # progress and metrics are ours
        "wall_clock_breakdown": False,
    }


def make_optimizer(params: list[torch.nn.Parameter], spec: LoRAFineTuneSpec, on_gpu: bool) -> torch.optim.Optimizer:
    t = spec.training
    if on_gpu and spec.deepspeed.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # vectorised CPU Adam: the point of optimizer offload

        return DeepSpeedCPUAdam(params, lr=t.learning_rate, weight_decay=t.weight_decay, adamw_mode=True)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float, kind: str) -> float:
    """Factor on the peak learning rate at optimizer step `step` (0-based): linear warm-up, then decay."""
    warmup = math.ceil(total_steps * warmup_ratio)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer: torch.optim.Optimizer, spec: LoRAFineTuneSpec, total_steps: int) -> Any:
    t = spec.training
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, total_steps, t.warmup_ratio, t.lr_scheduler)
    )
