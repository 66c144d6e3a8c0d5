"""How the tests write a LoRAFineTune: `manifest(name, base, **overrides)`, from one of the base specs below or a
test's own, any spec field overridden by nesting: `manifest("flaky", CLUSTER_RUN, runPolicy={"backoffLimit": 1})`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from lorafinetune.api.manifest import API_VERSION, KIND


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in: a dict merges key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def manifest(name: str, base: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """A LoRAFineTune called `name`: `base` with `overrides` deep-merged in. "{name}" in a string of `base` stands for
    the name (so that every CLUSTER_RUN writes its own output)."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": name},
        "spec": deep_merge(_named(base, name), overrides),
    }


def _named(value: Any, name: str) -> Any:
    if isinstance(value, dict):
        return {k: _named(v, name) for k, v in value.items()}
    return value.replace("{name}", name) if isinstance(value, str) else value


# The fewest fields a cluster accepts; the invalid-manifest table (tests/invalid_manifests.py) breaks one rule of it.
MINIMAL: dict[str, Any] = {
    "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"train": "pvc://data/train.jsonl"},
    "training": {"maxSteps": 10},
    "output": {"uri": "pvc://out/demo"},
}

SHARED_CLAIM = "shared"  # a bound claim in every integration test namespace: the operator tests' data and outputs

# A fine-tune of 2 nodes x 8 GPUs that the operator tests' cluster runs (on kwok nodes), each run writing its own
# folder of the shared claim.
CLUSTER_RUN: dict[str, Any] = {
    "model": {"uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct"},
    "dataset": {"train": f"pvc://{SHARED_CLAIM}/data/train.jsonl"},
    "training": {"maxSteps": 100},
    "resources": {"nodes": 2, "gpusPerNode": 8},
    "output": {"uri": f"pvc://{SHARED_CLAIM}/out/{{name}}"},
}


def tiny_cpu_run(model_dir: Path, train: Path, output_dir: Path) -> dict[str, Any]:
    """A 2-process CPU run of 4 steps on the tiny model (tests/tiny_model.py), from and to local folders."""
    return {
        "model": {"uri": f"file://{model_dir}"},
        "dataset": {"train": f"file://{train}", "format": "chat", "maxSeqLength": 64, "validationSplit": 0.125},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "training": {"maxSteps": 4, "microBatchSize": 2, "precision": "fp32", "learningRate": 0.01},
        "deepspeed": {"zeroStage": 2},
        "evaluation": {"everySteps": 2},
        "checkpointing": {"everySteps": 2},
        "resources": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 2},
        "output": {"uri": f"file://{output_dir}"},
    }
