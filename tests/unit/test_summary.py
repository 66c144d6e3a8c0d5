"""training_summary.json as readers meet it: this version's, an older trainer's (fewer keys) and a newer one's."""

from __future__ import annotations

import json

from lorafinetune.contract import SUMMARY_FILE, TrainingSummary, read_summary
from lorafinetune.local.display import print_summary

# What a trainer of an earlier version wrote (before inputTokens, trainSeconds, peaks, quantizedLinearLayers,
# mergedModel), with its adapter ref.
OLDER = {
    "name": "demo", "spec": {"lora": {"r": 4}}, "baseModel": {"uri": "hf://org/model"},
    "dataset": {"train": "file:///d/train.jsonl", "trainExamples": 7, "validationExamples": 1},
    "worldSize": 2, "steps": 4, "totalSteps": 4, "epochs": 1.0, "trainedTokens": 321,
    "trainableParameters": 10, "totalParameters": 100, "finalTrainLoss": 1.5, "initialEvalLoss": 2.0,
    "finalEvalLoss": 1.0, "bestEvalLoss": 1.0, "history": [{"step": 1, "trainLoss": 1.5}],
    "adapter": {"uri": "/run/adapter", "sizeBytes": 2_000_000, "sha256": "ab" * 32},
}  # fmt: skip


def test_an_older_trainers_summary_is_still_shown(tmp_path, capsys):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / SUMMARY_FILE).write_text(json.dumps(OLDER))
    print_summary(tmp_path, "file:///run")
    out = capsys.readouterr().out
    assert "demo: done" in out and "4 / 4 (1.00 epochs)" in out and "2.0 MB, sha256 abababababab" in out


def test_a_newer_trainers_keys_are_ignored_not_fatal(tmp_path):
    newer = {**OLDER, "somethingNew": 1, "dataset": {**OLDER["dataset"], "rows": 8},
             "adapter": {**OLDER["adapter"], "files": 3}}  # fmt: skip
    (tmp_path / SUMMARY_FILE).write_text(json.dumps(newer))
    summary = read_summary(tmp_path / SUMMARY_FILE)
    assert summary.adapter is not None and summary.adapter.size_bytes == 2_000_000
    # and what this version writes has every key, nulls included, with the camelCase names readers use
    written = summary.dumps()
    assert written["mergedModel"] is None and written["inputTokens"] == 0 and "peakGpuMemoryBytes" in written
    assert TrainingSummary.model_validate(written) == summary
