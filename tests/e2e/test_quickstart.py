"""The README's quick start, end to end: the packaged SmolLM2-135M-Instruct, 2 CPU ranks under ZeRO-2.

Asserts what the quick start promises a new user: validation loss goes down, the task score goes up with the
adapter, and the adapter, summary, model card and loss curve are where the summary says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.e2e


def test_quickstart_fine_tunes_smollm2_and_the_adapter_beats_the_base(tmp_path: Path):
    local = ["examples/quickstart.yaml", "--pvc", "quickstart-data=examples/data", "--pvc-root", str(tmp_path)]
    proc = run_cli("run", *local, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "smollm2-json-extract: done" in proc.stdout

    out = tmp_path / "quickstart-output" / "smollm2-json-extract"
    adapter = out / "adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_summary.json", "README.md",
                 "loss_curve.png", "COMPLETE.json"):  # fmt: skip
        assert (adapter / name).is_file(), name
    assert (adapter / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((adapter / "training_summary.json").read_text())
    assert summary["worldSize"] == 2 and summary["spec"]["deepspeed"]["zeroStage"] == 2
    assert summary["finalEvalLoss"] < 0.5 * summary["initialEvalLoss"], summary["history"]

    proc = run_cli("evaluate", *local, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "evaluation.json").read_text())
    base, tuned = report["base"], report["adapter"]
    assert tuned["validationLoss"] < base["validationLoss"]
    assert tuned["taskScore"] > base["taskScore"] + 0.1, (base, tuned)
    assert "with adapter" in proc.stdout
