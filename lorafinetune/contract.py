"""The contract between whoever launches the trainer (operator pods, the local runner) and the trainer itself.

Both sides import this module and nothing else of each other: environment variable names, the layout of the run
folder, and exit codes that tell a launcher whether retrying can help.

Launch (one torchrun agent per node; the operator and the local runner both do exactly this):

    LFT_CONFIG=/etc/lorafinetune/config.json LFT_RUN_DIR=/output/run PET_SHUTDOWN_TIMEOUT=270 \\
    torchrun --nnodes N --node-rank R --nproc-per-node P --master-addr ADDR --master-port 29500 \\
        -m lorafinetune.trainer

PET_SHUTDOWN_TIMEOUT (torchrun's `--shutdown-timeout`) is how long torchrun lets the ranks checkpoint after SIGTERM
before it kills them; its default, 30 s, is shorter than a step plus a save of a large model. Launchers set it a
margin below their own grace period, as a variable: an older torchrun (torch 2.11's) refuses the flag but ignores
the variable. torchrun exits 1 whatever its ranks exited with, so a launcher reads the
trainer's exit code from the termination log (below), never from torchrun.
"""

from __future__ import annotations

import json
import os
import tempfile
from enum import IntEnum
from pathlib import Path
from typing import Any, Final

from pydantic import ConfigDict, Field, ValidationError, field_validator

from lorafinetune.api.base import APIModel
from lorafinetune.api.status import AdapterRef, Progress

# Environment variables read by the trainer.
ENV_CONFIG = "LFT_CONFIG"  # path of the rendered trainer config (JSON: the spec plus the run name)
ENV_RUN_DIR = "LFT_RUN_DIR"  # local folder for checkpoints, progress and the adapter before publishing
ENV_METRICS_PORT = "LFT_METRICS_PORT"  # rank 0 serves Prometheus metrics here; unset or 0 disables
ENV_CACHE_DIR = "LFT_CACHE_DIR"  # converted models and tokenised data; default ~/.cache/lorafinetune
ENV_PVC_ROOT = "LFT_PVC_ROOT"  # where pvc://claim/... is mounted: <root>/<claim>/... (pods: /mnt/pvc)
ENV_TERMINATION_LOG = "LFT_TERMINATION_LOG"  # the failing process writes {exitCode, reason, message} here
ENV_FAIL_AT_STEP = "LFT_FAIL_AT_STEP"  # fault injection for tests: rank 0 exits with FAILED after this step
ENV_LOSS_CHUNK = "LFT_LOSS_CHUNK_ELEMENTS"  # logits scored at once (default LOSS_CHUNK_ELEMENTS)
LOSS_CHUNK_ELEMENTS = 1 << 26  # 256 MiB of fp32 logits: the trainer scores targets in chunks of this (see plan.py)
# On a CPU the trainer has glibc mmap buffers from this size up, which go back to the system when freed; smaller ones
# stay in its heap (trainer/heap.py; plan.py counts what that heap keeps).
CPU_MMAP_THRESHOLD_BYTES = 4 << 20
# A token unique to this attempt (operator: the fine-tune's UID and the attempt; local runner: one per `run`). The
# attempt's first act is to write it to ATTEMPT_FILE; a rank publishes a checkpoint or an adapter only while that
# file still holds its own token, so a stale rank (a partitioned node, a paused process) cannot overwrite the work of
# an attempt that started after it. Unset: no fencing.
ENV_ATTEMPT = "LFT_ATTEMPT"

# Files in the run folder.
CONFIG_FILE = "config.json"
PROGRESS_FILE = "progress.json"  # rank 0 rewrites it atomically after every step and evaluation
CHECKPOINTS_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"  # output.mergeAdapter: the base model with the adapter folded in (written before adapter/)
SUMMARY_FILE = "training_summary.json"
MODEL_CARD_FILE = "README.md"
LOSS_PLOT_FILE = "loss_curve.png"
COMPLETE_MARKER = "COMPLETE.json"  # written last into a checkpoint or adapter folder: its presence means complete
ATTEMPT_FILE = "attempt.json"  # {token, claimedAt}: the attempt that owns the run folder now (ENV_ATTEMPT)


class TrainerMetricNames:
    """The Prometheus metrics rank 0 serves on ENV_METRICS_PORT (trainer/metrics.py). Named here because others read
    them: the operator (status.progress), `lorafinetune plot` and the Grafana dashboard. Counters are exported with a
    `_total` suffix, the histogram as `_bucket`/`_sum`/`_count`, the info as `_info`."""

    TRAIN_LOSS: Final = "lorafinetune_train_loss"
    EVAL_LOSS: Final = "lorafinetune_eval_loss"
    LEARNING_RATE: Final = "lorafinetune_learning_rate"
    GLOBAL_STEP: Final = "lorafinetune_global_step"
    TOTAL_STEPS: Final = "lorafinetune_total_steps"
    OPTIMIZER_STEPS: Final = "lorafinetune_optimizer_steps"  # counter
    TOKENS: Final = "lorafinetune_tokens"  # counter
    TRAINED_TOKENS: Final = "lorafinetune_trained_tokens"  # counter
    STEP_DURATION: Final = "lorafinetune_step_duration_seconds"  # histogram
    LAST_CHECKPOINT_TIME: Final = "lorafinetune_last_checkpoint_timestamp_seconds"
    TOKENS_PER_SECOND: Final = "lorafinetune_tokens_per_second"
    ETA: Final = "lorafinetune_eta_seconds"
    WORLD_SIZE: Final = "lorafinetune_world_size"
    INFO: Final = "lorafinetune_trainer"  # info


class ExitCode(IntEnum):
    """Trainer exit codes. Launchers retry RETRYABLE codes (and signals), never PERMANENT ones."""

    OK = 0
    FAILED = 1  # unexpected error: retryable, resumes from the last checkpoint
    INVALID_CONFIG = 2  # permanent: the spec or the environment cannot work (fix the manifest)
    DATA_ERROR = 3  # permanent: a malformed dataset row or an example with nothing to train on
    MODEL_ERROR = 4  # permanent: the model cannot be found or loaded (offline hub, missing file)
    INTERRUPTED = 130  # stopped on request (SIGINT/SIGTERM) after writing a checkpoint: resume later

    @property
    def permanent(self) -> bool:
        return self in (ExitCode.INVALID_CONFIG, ExitCode.DATA_ERROR, ExitCode.MODEL_ERROR)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so readers see the old file or the new one, never half of it (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def adapter_fields(data: dict[str, Any]) -> dict[str, Any]:
    """`data` without the keys AdapterRef does not know. AdapterRef is an API type and refuses unknown fields, but a
    trainer image newer than the operator may add some, and COMPLETE.json adds the fingerprint."""
    known = {f.alias or name for name, f in AdapterRef.model_fields.items()}
    return {k: v for k, v in data.items() if k in known}


class _Record(APIModel):
    """A record one process writes and another reads: what a newer trainer adds does not stop an older reader."""

    model_config = ConfigDict(extra="ignore")

    @field_validator("adapter", mode="before", check_fields=False)
    @classmethod
    def _known_adapter_fields(cls, value: Any) -> Any:
        return adapter_fields(value) if isinstance(value, dict) else value  # AdapterRef itself refuses unknown keys


class TerminationRecord(_Record):
    """What the trainer writes to its termination log when it exits (ENV_TERMINATION_LOG; in a pod
    /dev/termination-log, which Kubernetes shows as the container's termination message): its own exit code, since
    torchrun's is always 1, why, and on success the adapter it published. Written by the trainer, read by the
    operator (status.lastFailure, status.adapter) and the local runner."""

    exit_code: int = Field(description="The trainer's exit code (ExitCode).")
    reason: str = Field(description="One CamelCase word: DataError, ModelError, Superseded, Completed, ...")
    message: str = Field(default="", description="What happened, for people (no secrets).")
    adapter: AdapterRef | None = Field(default=None, description="On success: the published adapter.")

    @property
    def permanent(self) -> bool:
        return self.exit_code in {c.value for c in ExitCode if c.permanent}

    def dumps(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    @classmethod
    def loads(cls, text: str) -> TerminationRecord | None:
        """The record in `text`, or None if it is not one (the kubelet's fallback to the log tail, say)."""
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return None


class BaseModelUsed(_Record):
    uri: str = Field(description="spec.model.uri as written.")
    revision: str | None = Field(default=None, description="For hf://: the commit every rank loaded.")
    resolved_path: str = Field(default="", description="The local folder the weights were loaded from.")


class DatasetUsed(_Record):
    train: str
    train_sha256: str = ""
    validation: str | None = None
    validation_sha256: str | None = None
    train_examples: int
    validation_examples: int


class MergedModel(_Record):
    uri: str = Field(description="Folder of the base model with the adapter folded in (output.mergeAdapter).")
    dtype: str


class TrainingSummary(_Record):
    """SUMMARY_FILE in the published adapter folder: what was trained, on what, how fast and how well. Written by
    the trainer (trainer/summary.py, with the model card made from it), read by the local runner's closing lines,
    benchmarks and people. The trainer writes every key (null when it does not apply); the defaults are for
    summaries of older trainers, which lack the later keys."""

    name: str
    spec: dict[str, Any] = Field(description="The spec as trained (the manifest's camelCase form).")
    base_model: BaseModelUsed
    dataset: DatasetUsed
    world_size: int
    steps: int
    total_steps: int
    epochs: float
    trained_tokens: int = Field(description="Tokens in the loss (the completion tokens).")
    input_tokens: int = Field(default=0, description="Non-padding tokens fed to the model.")
    computed_tokens: int = Field(default=0, description="Token positions the model ran: padding included, the "
                                 "first tokens a micro-batch's rows share (dataset.sharePrefix) once.")  # fmt: skip
    train_seconds: float = Field(default=0.0, description="Time in optimizer steps (not evaluation or checkpoints).")
    tokens_per_second: float = Field(default=0.0, description="input_tokens / train_seconds.")
    peak_gpu_memory_bytes: int | None = Field(default=None, description="Rank 0's max_memory_allocated; CPU: None.")
    peak_rss_bytes: int = Field(default=0, description="Rank 0's peak resident memory.")
    quantized_linear_layers: int = Field(default=0, description="model.quantization: the linear layers quantized.")
    attention: str | None = Field(default=None, description="The attention implementation trained with: "
                                  "lft_varlen (no masks, on a GPU) or sdpa.")  # fmt: skip
    trainable_parameters: int
    total_parameters: int
    adapter_tensors: int = 0
    duration_seconds: float = 0.0
    final_train_loss: float | None
    initial_eval_loss: float | None
    final_eval_loss: float | None
    best_eval_loss: float | None
    history: list[dict[str, Any]] = Field(description="Per step: step, trainLoss, learningRate, evalLoss.")
    merged_model: MergedModel | None = None
    completed_at: str = Field(default="", description="ISO 8601, UTC.")
    adapter: AdapterRef | None = Field(default=None, description="Set when published: the adapter's weights.")

    def dumps(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


def read_summary(path: Path) -> TrainingSummary:
    return TrainingSummary.model_validate_json(path.read_text())


def read_termination(path: Path) -> TerminationRecord | None:
    """What a trainer wrote to its termination log, if anything."""
    try:
        return TerminationRecord.loads(path.read_text())
    except FileNotFoundError:
        return None


def read_progress(run_dir: Path) -> Progress | None:
    """The last progress rank 0 published (the same record the operator puts in status.progress), or None before
    the first one."""
    try:
        return Progress.model_validate_json((run_dir / PROGRESS_FILE).read_text())
    except (FileNotFoundError, ValidationError):
        return None
