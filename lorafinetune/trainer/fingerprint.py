"""What a result was trained from, per spec section, so that a checkpoint or a published adapter is only ever
resumed or reused by the same training, and a refusal can say exactly which section changed."""

from __future__ import annotations

import hashlib
import json

from lorafinetune.api.spec import LoRAFineTuneSpec

SECTIONS = ("model", "dataset", "lora", "training", "deepspeed")
# Fields that change how a result is computed, not what it is: a checkpoint resumes across a change of them (and
# across their introduction, which would otherwise change every earlier result's section). sharePrefix changes only
# how dropout masks are drawn for shared tokens: the same training, not bit for bit the same run.
HOW_NOT_WHAT = {"dataset": ("sharePrefix",)}


def spec_fingerprint(spec: LoRAFineTuneSpec) -> dict[str, str]:
    return {name: _digest(getattr(spec, name).to_manifest(), HOW_NOT_WHAT.get(name, ())) for name in SECTIONS}


def _digest(section: dict, left_out: tuple[str, ...]) -> str:
    kept = {k: v for k, v in section.items() if k not in left_out}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def changed_sections(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return sorted(k for k in new if old.get(k) != new[k])


def trained_in_other_precision(stored: dict[str, str], spec: LoRAFineTuneSpec, written: str,
                               stored_written: str | None) -> str | None:  # fmt: skip
    """The precision a result was trained in when its training section differs from `spec`'s (auto resolved for this
    device) in that alone and neither side chose it: `written` (this manifest's training.precision) is auto, and
    `stored_written` (the result's) was auto too, or is unknown (a result from before auto, when the default was
    bf16). Then nothing the user wrote changed: auto picked differently, on other nodes."""
    if written != "auto" or stored_written not in ("auto", None):
        return None
    t = spec.training
    for precision in ("bf16", "fp16", "fp32") if stored_written == "auto" else ("bf16",):
        other = spec.model_copy(update={"training": t.model_copy(update={"precision": precision})})
        if precision != t.precision and spec_fingerprint(other)["training"] == stored.get("training"):
            return precision
    return None


def picked_where(stored_written: str | None) -> str:
    """How a result came to be trained in another precision (see trained_in_other_precision), for messages."""
    return "which training.precision auto picked there" if stored_written else "the default before auto"
