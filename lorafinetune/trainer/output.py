"""Writing, verifying and publishing the adapter.

Publishing is a rename of a fully written, verified folder: readers of <run>/adapter see a complete adapter or none.
Verification guards against the classic ZeRO-3 failure (empty or partial adapter files): the tensor count must be
two per adapted module (plus DoRA magnitudes), the file must hold data, and a fresh process must load it with
`PeftModel.from_pretrained` on the base model and get the same tensors back.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from lorafinetune.contract import (
    ADAPTER_DIR,
    COMPLETE_MARKER,
    MERGED_DIR,
    MODEL_CARD_FILE,
    SUMMARY_FILE,
    write_json_atomic,
)
from lorafinetune.trainer import fence
from lorafinetune.trainer.errors import TrainerError

ADAPTER_FILE = "adapter_model.safetensors"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def published_adapter(run_dir: Path) -> dict[str, Any] | None:
    """The marker of an adapter already published in this run folder, or None."""
    marker = run_dir / ADAPTER_DIR / COMPLETE_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else None


def staging_dir(run_dir: Path) -> Path:
    return run_dir / f"{ADAPTER_DIR}.partial"


def check_tensors(adapter_dir: Path, adapted_modules: int, use_dora: bool) -> int:
    """Count and size check of the saved tensors; returns the tensor count."""
    from safetensors import safe_open

    path = adapter_dir / ADAPTER_FILE
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        empty = [n for n in names if f.get_slice(n).get_shape() in ([], [0]) or 0 in f.get_slice(n).get_shape()]
    expected = adapted_modules * (3 if use_dora else 2)
    if len(names) != expected or empty:
        raise TrainerError(
            f"adapter check failed: {len(names)} tensors for {adapted_modules} adapted modules "
            f"(expected {expected}); empty tensors: {empty[:5]}"
        )
    return len(names)


def merged_staging_dir(run_dir: Path) -> Path:
    return run_dir / f"{MERGED_DIR}.partial"


def verify_in_fresh_process(adapter_dir: Path, base_model_dir: Path | str, revision: str | None = None,
                            merge_into: Path | None = None, merge_dtype: str = "bfloat16") -> None:  # fmt: skip
    """Reload base (at the commit trained on) + adapter in a new interpreter and compare every LoRA tensor with the
    file; with `merge_into`, also write the merged model there (see verify.py). On the CPU: the trainer's GPU
    memory is not freed until its process ends."""
    proc = subprocess.run(
        [sys.executable, "-m", "lorafinetune.trainer.verify", str(adapter_dir), str(base_model_dir),
         *(["--revision", revision] if revision else []),
         *(["--merge-into", str(merge_into), "--dtype", merge_dtype] if merge_into else [])],  # fmt: skip
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    if proc.returncode != 0:
        raise TrainerError(f"adapter reload check failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def model_card(summary: dict[str, Any]) -> str:
    s = summary
    lines = [
        f"# LoRA adapter: {s['name']}",
        "",
        f"Fine-tuned from `{s['baseModel']['uri']}`"
        + (f" (commit `{s['baseModel']['revision']}`)" if s["baseModel"].get("revision") else "")
        + " with LoRAFineTune (PEFT LoRA, DeepSpeed ZeRO-"
        f"{s['spec']['deepspeed']['zeroStage']}, {s['worldSize']} processes).",
        "",
        "| | |",
        "|---|---|",
        f"| dataset | `{s['dataset']['train']}` ({s['dataset']['trainExamples']} train / "
        f"{s['dataset']['validationExamples']} validation examples) |",
        f"| steps | {s['steps']} ({s['epochs']:.2f} epochs), {s['trainedTokens']} trained tokens |",
        f"| LoRA | r={s['spec']['lora']['r']}, alpha={s['spec']['lora']['alpha']}, "
        f"targets={s['spec']['lora']['targetModules']} |",
        f"| final train loss | {s['finalTrainLoss']} |",
        f"| eval loss (before -> final, best) | {s['initialEvalLoss']} -> {s['finalEvalLoss']}, {s['bestEvalLoss']} |",
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
    if s.get("mergedModel"):
        lines += ["", f"A merged copy (the base with the adapter folded in, {s['mergedModel']['dtype']}) is at "
                      f"`{s['mergedModel']['uri']}`: `AutoModelForCausalLM.from_pretrained` loads it without PEFT."]
    return "\n".join(lines) + "\n"


def publish(run_dir: Path, summary: dict[str, Any], fingerprint: dict[str, str], attempt: str | None = None
            ) -> dict[str, Any]:  # fmt: skip
    """Write summary and card into the verified staging folder, mark it complete, and rename it into place (only
    while this attempt still holds the run folder: see fence.py)."""
    staging = staging_dir(run_dir)
    weights = staging / ADAPTER_FILE
    ref = {"uri": str(run_dir / ADAPTER_DIR), "sizeBytes": weights.stat().st_size, "sha256": sha256_of(weights)}
    summary = {**summary, "adapter": ref}
    write_json_atomic(staging / SUMMARY_FILE, summary)
    (staging / MODEL_CARD_FILE).write_text(model_card(summary))
    fence.check(run_dir, attempt, "publishing the adapter")
    merged = merged_staging_dir(run_dir)
    if merged.is_dir():  # before the adapter's marker: a published adapter means its merged model is there too
        shutil.rmtree(run_dir / MERGED_DIR, ignore_errors=True)
        os.replace(merged, run_dir / MERGED_DIR)
    write_json_atomic(staging / COMPLETE_MARKER, {**ref, "fingerprint": fingerprint})
    final = run_dir / ADAPTER_DIR
    if final.exists():  # only an incomplete leftover can be here: a complete one stops the run before training
        shutil.rmtree(final)
    os.replace(staging, final)
    return ref
