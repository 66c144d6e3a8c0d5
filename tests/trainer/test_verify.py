"""The adapter's reload check in a fresh interpreter (trainer/verify.py), on the tiny model: what it accepts, what
it refuses, and the merged model it writes. Each case runs the real subprocess the trainer runs before publishing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafinetune.trainer.errors import TrainerError
from lorafinetune.trainer.output import verify_in_fresh_process


def base_in(dtype: torch.dtype, tiny_model: Path, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def adapter_of(base: Path, folder: Path, trained: bool = True) -> Path:
    """An adapter as the trainer saves one: PEFT's files plus the tokenizer; `trained` gives lora_B non-zero values
    (PEFT starts them at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype="auto"),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))  # fmt: skip
    if trained:
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(std=0.02)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_a_trained_adapter_reloads_and_merges_into_a_model_plain_transformers_loads(
    tmp_path: Path, tiny_model: Path, dtype: torch.dtype
):
    from transformers import AutoModelForCausalLM

    base = base_in(dtype, tiny_model, tmp_path / "base")
    adapter = adapter_of(base, tmp_path / "adapter")
    verify_in_fresh_process(adapter, base)
    verify_in_fresh_process(adapter, base, merge_into=tmp_path / "merged", merge_dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.bfloat16 and (tmp_path / "merged" / "tokenizer.json").exists()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()


def test_an_adapter_that_never_trained_is_refused(tmp_path: Path, tiny_model: Path):
    adapter = adapter_of(tiny_model, tmp_path / "adapter", trained=False)
    with pytest.raises(TrainerError, match="every lora_B tensor is zero"):
        verify_in_fresh_process(adapter, tiny_model)


def test_a_truncated_adapter_file_is_refused(tmp_path: Path, tiny_model: Path):
    adapter = adapter_of(tiny_model, tmp_path / "adapter")
    weights = adapter / "adapter_model.safetensors"
    with weights.open("r+b") as f:  # what a full disk leaves of a write
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(TrainerError, match="reload check failed"):
        verify_in_fresh_process(adapter, tiny_model)
