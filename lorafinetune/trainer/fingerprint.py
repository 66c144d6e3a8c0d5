"""What a result was trained from, per spec section, so that a checkpoint or a published adapter is only ever
resumed or reused by the same training, and a refusal can say exactly which section changed."""

from __future__ import annotations

import hashlib
import json

from lorafinetune.api.spec import LoRAFineTuneSpec

SECTIONS = ("model", "dataset", "lora", "training", "deepspeed")


def spec_fingerprint(spec: LoRAFineTuneSpec) -> dict[str, str]:
    return {
        name: hashlib.sha256(json.dumps(getattr(spec, name).to_manifest(), sort_keys=True).encode()).hexdigest()[:16]
        for name in SECTIONS
    }


def changed_sections(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return sorted(k for k in new if old.get(k) != new[k])


def trained_in_other_precision(stored: dict[str, str], spec: LoRAFineTuneSpec, written: str) -> str | None:
    """The precision a result was trained in when its training section differs from `spec`'s (auto resolved for
    this device) in that alone and `written`, the manifest's training.precision, is auto: nothing the user wrote
    changed; auto picked differently (other nodes, or before auto existed, when bf16 was the default)."""
    if written != "auto":
        return None
    t = spec.training
    for precision in ("bf16", "fp16", "fp32"):
        other = spec.model_copy(update={"training": t.model_copy(update={"precision": precision})})
        if precision != t.precision and spec_fingerprint(other)["training"] == stored.get("training"):
            return precision
    return None
