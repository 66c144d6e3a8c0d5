"""Trainer errors. The type encodes the retry policy through the exit code the launcher sees."""

from __future__ import annotations

from lorafinetune.contract import ExitCode


class TrainerError(Exception):
    """A failure the trainer understands; `exit_code` tells the launcher whether a retry can help."""

    exit_code = ExitCode.FAILED


class ConfigError(TrainerError):
    """The spec cannot work in this environment (permanent)."""

    exit_code = ExitCode.INVALID_CONFIG


class DataError(TrainerError):
    """A dataset row is malformed or has nothing to train on (permanent); the message names file and line."""

    exit_code = ExitCode.DATA_ERROR


class ModelError(TrainerError):
    """The base model cannot be found or loaded (permanent)."""

    exit_code = ExitCode.MODEL_ERROR
