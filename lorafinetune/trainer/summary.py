"""What rank 0 writes beside the adapter when a run ends: the training summary (contract.TrainingSummary) and the
model card made from it, so the two can never disagree."""

from __future__ import annotations

import resource
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import torch

from lorafinetune.api.status import AdapterRef
from lorafinetune.contract import BaseModelUsed, DatasetUsed, MergedModel, TrainingSummary
from lorafinetune.trainer.output import sha256_of

if TYPE_CHECKING:
    from lorafinetune.trainer.recipe import LoRAFineTuneRecipe


def training_summary(recipe: LoRAFineTuneRecipe, adapter: AdapterRef, adapter_tensors: int,
                     merged: MergedModel | None, started: float) -> TrainingSummary:  # fmt: skip
    r, spec, state = recipe, recipe.spec, recipe.state
    return TrainingSummary(
        name=r.name,
        spec=spec.to_manifest(),
        base_model=BaseModelUsed(uri=spec.model.uri, revision=r.model_revision, resolved_path=str(r.model_dir)),
        dataset=DatasetUsed(
            train=spec.dataset.train,
            train_sha256=sha256_of(r.train_path),
            validation=spec.dataset.validation,
            validation_sha256=sha256_of(r.val_path) if r.val_path else None,
            train_examples=len(r.train_examples),
            validation_examples=len(r.val_examples),
        ),
        world_size=r.world,
        steps=r.steps_done,
        total_steps=r.total_steps,
        epochs=r.schedule.epoch_of(r.steps_done),
        trained_tokens=state.trained_tokens,
        input_tokens=state.input_tokens,
        computed_tokens=state.computed_tokens,
        train_seconds=round(state.train_seconds, 2),
        tokens_per_second=round(state.tokens_per_second, 1),
        # Rank 0's peaks (all ranks hold about the same): what `lorafinetune plan` estimates, measured.
        peak_gpu_memory_bytes=torch.cuda.max_memory_allocated(r.device) if r.on_gpu else None,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        quantized_linear_layers=r.quantized_layers,
        attention=r.attention,
        trainable_parameters=r.trainable,
        total_parameters=r.total_params,
        adapter_tensors=adapter_tensors,
        duration_seconds=round(time.time() - started, 1),
        final_train_loss=state.final_train_loss,
        initial_eval_loss=state.initial_eval,
        final_eval_loss=state.final_eval_loss,
        best_eval_loss=state.best_eval,
        history=state.history,
        merged_model=merged,
        completed_at=datetime.now(UTC).isoformat(),
        adapter=adapter,
    )


def model_card(s: TrainingSummary) -> str:
    lora = s.spec["lora"]
    pinned = f" (commit `{s.base_model.revision}`)" if s.base_model.revision else ""
    lines = [
        f"# LoRA adapter: {s.name}",
        "",
        f"Fine-tuned from `{s.base_model.uri}`{pinned} with LoRAFineTune (PEFT LoRA, DeepSpeed "
        f"ZeRO-{s.spec['deepspeed']['zeroStage']}, {s.world_size} processes).",
        "",
        "| | |",
        "|---|---|",
        f"| dataset | `{s.dataset.train}` ({s.dataset.train_examples} train / "
        f"{s.dataset.validation_examples} validation examples) |",
        f"| steps | {s.steps} ({s.epochs:.2f} epochs), {s.trained_tokens} trained tokens |",
        f"| LoRA | r={lora['r']}, alpha={lora['alpha']}, targets={lora['targetModules']} |",
        f"| final train loss | {s.final_train_loss} |",
        f"| eval loss (before -> final, best) | {s.initial_eval_loss} -> {s.final_eval_loss}, {s.best_eval_loss} |",
        "",
        "Load it with:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "base = AutoModelForCausalLM.from_pretrained(BASE_MODEL_PATH)",
        "model = PeftModel.from_pretrained(base, ADAPTER_PATH)",
        "```",
    ]
    if s.merged_model:
        lines += ["", f"A merged copy (the base with the adapter folded in, {s.merged_model.dtype}) is at "
                      f"`{s.merged_model.uri}`: `AutoModelForCausalLM.from_pretrained` loads it without PEFT."]
    return "\n".join(lines) + "\n"
