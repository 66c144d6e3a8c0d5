"""The operator's JSON log lines (LFT_LOG_FORMAT=json)."""

from __future__ import annotations

import json
import logging

import pytest

from lorafinetune.operator import logs
from lorafinetune.operator.settings import OperatorSettings


def test_json_lines_carry_the_fine_tune_as_fields(capfd):
    logs.configure("json")
    try:
        log = logging.getLogger("lorafinetune.operator")
        log.warning("%s: %s: %s", "team/run", "OOMKilled", "attempt 1 failed",
                    extra={"namespace": "team", "finetune": "run", "reason": "OOMKilled"})  # fmt: skip
        try:
            raise RuntimeError("API server gone")
        except RuntimeError:
            log.exception("reconcile failed")
    finally:
        logs.configure("text")
    first, second = (json.loads(line) for line in capfd.readouterr().err.splitlines())
    assert (first["level"], first["namespace"], first["finetune"], first["reason"]) == ("WARNING", "team", "run",
                                                                                     "OOMKilled")  # fmt: skip
    assert first["message"] == "team/run: OOMKilled: attempt 1 failed" and first["time"].endswith("+00:00")
    assert "RuntimeError: API server gone" in second["exception"] and "namespace" not in second


def test_an_unknown_log_format_is_refused(monkeypatch):
    monkeypatch.setenv("LFT_LOG_FORMAT", "yaml")
    with pytest.raises(ValueError, match="LFT_LOG_FORMAT must be one of text, json, got 'yaml'"):
        OperatorSettings.from_env()
