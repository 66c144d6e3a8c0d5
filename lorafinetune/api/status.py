"""`LoRAFineTune.status`: written by the operator (or the local runner), never by users."""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from pydantic import Field

from lorafinetune.api.base import APIModel

# Queued: an attempt waits for Kueue to admit it (runPolicy.queueName); it holds no pods.
Phase = Literal["Pending", "Queued", "Running", "Retrying", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = get_args(Phase)


class Condition(APIModel):
    """A Kubernetes-style condition (metav1.Condition)."""

    type: str = Field(description="Running, Succeeded, Failed, Suspended, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="Whether the condition holds.")
    reason: str = Field(description="One CamelCase word a program can match on.")
    message: str = Field(default="", description="What happened, for people.")
    last_transition_time: datetime = Field(description="When status last changed.")
    observed_generation: int | None = Field(default=None, description="metadata.generation this was computed from.")


class Progress(APIModel):
    """Training progress as published by rank 0."""

    step: int = Field(default=0, description="Optimizer steps completed.")
    total_steps: int | None = Field(default=None, description="Optimizer steps planned.")
    summary: str | None = Field(default=None, description="`step/totalSteps`, e.g. 12/100 (kubectl's Progress column).")
    epoch: float | None = Field(default=None, description="Fractional epochs completed.")
    train_loss: float | None = Field(default=None, description="Mean train loss per token of the last logging window.")
    eval_loss: float | None = Field(default=None, description="Latest evaluation loss per token.")
    best_eval_loss: float | None = Field(default=None, description="Lowest evaluation loss so far.")
    tokens_per_second: float | None = Field(default=None, description="Non-padding trained tokens/s, all ranks.")
    eta_seconds: float | None = Field(default=None, description="Estimated seconds until the last step.")
    updated_at: datetime | None = Field(default=None, description="When rank 0 published this.")


class AdapterRef(APIModel):
    """The published adapter."""

    uri: str = Field(description="Folder holding adapter_model.safetensors and adapter_config.json.")
    size_bytes: int = Field(description="Size of adapter_model.safetensors in bytes.")
    sha256: str = Field(description="SHA-256 of adapter_model.safetensors.")
    base_model_revision: str | None = Field(
        default=None,
        description="For an hf:// base model: the commit it was trained on (resolved once, at the first attempt; "
        "load the adapter onto exactly this revision).",
    )
    merged_uri: str | None = Field(
        default=None,
        description="With output.mergeAdapter: the folder of the base model with the adapter folded in, which "
        "AutoModelForCausalLM.from_pretrained loads without PEFT.",
    )


class Failure(APIModel):
    """Why an attempt failed, as read from its pods."""

    attempt: int = Field(description="The attempt that failed.")
    reason: str = Field(description="OOMKilled, DataError, ModelError, Error, DeadlineExceeded, ...")
    message: str = Field(default="", description="The trainer's termination message (no secrets).")
    exit_code: int | None = Field(
        default=None, description="The trainer's exit code (from its termination message), else the container's."
    )
    permanent: bool = Field(default=False, description="True when retrying cannot help (bad config, data, model).")


class LoRAFineTuneStatus(APIModel):
    """Observed state of a fine-tune."""

    phase: Phase | None = Field(default=None, description=", ".join(PHASES) + ".")
    conditions: list[Condition] = Field(default_factory=list, description="Standard conditions.")
    attempt: int = Field(default=0, description="Attempts started (1 = first attempt).")
    failed_attempts: int = Field(default=0, description="Attempts that failed; retries stop above backoffLimit.")
    disruptions: int = Field(
        default=0, description="Attempts stopped by preemption, eviction or drain; not counted in failedAttempts."
    )
    pending_since: datetime | None = Field(
        default=None, description="When the current attempt began waiting for its pods (pendingTimeoutSeconds)."
    )
    next_attempt_time: datetime | None = Field(
        default=None, description="When the next attempt starts (exponential backoff after a failure)."
    )
    last_failure: Failure | None = Field(default=None, description="Why the last failed attempt failed.")
    last_disruption: Failure | None = Field(default=None, description="What stopped the last disrupted attempt.")
    progress: Progress | None = Field(default=None, description="Progress of the current attempt.")
    last_checkpoint: str | None = Field(default=None, description="URI of the last complete checkpoint.")
    adapter: AdapterRef | None = Field(default=None, description="The adapter, once published.")
    start_time: datetime | None = Field(default=None, description="When the first attempt started.")
    completion_time: datetime | None = Field(default=None, description="When the run succeeded or failed.")
    children_deleted_time: datetime | None = Field(
        default=None, description="When ttlSecondsAfterFinished removed the run's pods, Jobs and config."
    )
    observed_generation: int | None = Field(default=None, description="metadata.generation last reconciled.")
