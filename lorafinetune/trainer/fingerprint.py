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
