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

from pydantic import ValidationError

from lorafinetune.api.status import AdapterRef
from lorafinetune.contract import (
    ADAPTER_DIR,
    COMPLETE_MARKER,
    MERGED_DIR,
    MODEL_CARD_FILE,
    SUMMARY_FILE,
    TrainingSummary,
    adapter_fields,
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


def adapter_of(marker: dict[str, Any]) -> AdapterRef | None:
    """The adapter a COMPLETE.json describes (its fingerprint left out), or None if the marker is not an adapter's."""
    try:
        return AdapterRef.model_validate(adapter_fields(marker))
    except ValidationError:
        return None


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
        how = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit {proc.returncode}"
        what = "reload check and merge" if merge_into else "reload check"
        hint = " (SIGKILL: most likely out of host memory)" if proc.returncode == -9 else ""
        raise TrainerError(f"adapter {what} failed ({how}{hint}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def adapter_ref(staging: Path, uri: str, base_model_revision: str | None, merged_uri: str | None) -> AdapterRef:
    """The record of the adapter in `staging` once it is published at `uri` (status.adapter, the termination record,
    the summary and COMPLETE.json all carry this one)."""
    weights = staging / ADAPTER_FILE
    return AdapterRef(uri=uri, size_bytes=weights.stat().st_size, sha256=sha256_of(weights),
                      base_model_revision=base_model_revision, merged_uri=merged_uri)  # fmt: skip


def publish(run_dir: Path, summary: TrainingSummary, card: str, fingerprint: dict[str, str],
            attempt: str | None = None, written_precision: str | None = None) -> None:  # fmt: skip
    """Write summary and card into the verified staging folder, mark it complete, and rename it into place (only
    while this attempt still holds the run folder: see fence.py). The marker keeps the fingerprint and the
    manifest's training.precision (auto or not: fingerprint.trained_in_other_precision)."""
    staging = staging_dir(run_dir)
    write_json_atomic(staging / SUMMARY_FILE, summary.dumps())
    (staging / MODEL_CARD_FILE).write_text(card)
    fence.check(run_dir, attempt, "publishing the adapter")
    merged = merged_staging_dir(run_dir)
    if summary.merged_model:  # before the adapter's marker: a published adapter means its merged model is there too
        shutil.rmtree(run_dir / MERGED_DIR, ignore_errors=True)
        os.replace(merged, run_dir / MERGED_DIR)
    else:  # a failed earlier attempt's, with mergeAdapter on then: not this adapter's
        shutil.rmtree(merged, ignore_errors=True)
    ref = summary.adapter.to_manifest() if summary.adapter else {}
    written = {"writtenPrecision": written_precision} if written_precision else {}
    write_json_atomic(staging / COMPLETE_MARKER, {**ref, "fingerprint": fingerprint, **written})
    final = run_dir / ADAPTER_DIR
    if final.exists():  # only an incomplete leftover can be here: a complete one stops the run before training
        shutil.rmtree(final)
    os.replace(staging, final)
