"""Finding and wrapping the base model: the errors a user sees for a wrong path, GGUF name or target list."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafinetune.api.spec import LoRASpec, ModelSpec
from lorafinetune.trainer import model
from lorafinetune.trainer.errors import ModelError


def test_missing_model_folder(tmp_path: Path):
    with pytest.raises(ModelError, match=r"model.uri file://.*/nope: .* is not a folder"):
        model.resolve_model_dir(ModelSpec(uri=f"file://{tmp_path}/nope"))


def test_wrong_gguf_name_lists_the_gguf_files_present(tmp_path: Path):
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"'other.gguf' is not in .* \(GGUF files there: \['model.Q8_0.gguf'\]\)"):
        model.resolve_model_dir(ModelSpec(uri=f"file://{tmp_path}", gguf_file="other.gguf"))


def test_package_that_is_not_installed():
    with pytest.raises(ModelError, match=r"package 'no_such_model_pkg' is not installed"):
        model.resolve_model_dir(ModelSpec(uri="package://no_such_model_pkg"))


def test_s3_models_need_downloading_first():
    with pytest.raises(ModelError, match=r"s3:// is not a local path; the trainer downloads s3:// inputs"):
        model.resolve_model_dir(ModelSpec(uri="s3://bucket/model"))


def test_lora_targets_that_match_nothing_name_the_linear_modules(tiny_model: Path):
    import torch

    spec = ModelSpec(uri=f"file://{tiny_model}")
    base = model.load_base_model(tiny_model, spec, torch.float32)
    with pytest.raises(ModelError, match=r"lora.targetModules \['qkv'\].*linear modules in this model: .*'q_proj'"):
        model.wrap_with_lora(base, LoRASpec(target_modules=["qkv"]), gradient_checkpointing=False)


@pytest.mark.parametrize("targets, expected", [(["all-linear"], 14), (["q_proj", "v_proj"], 4)])
def test_lora_wraps_the_requested_modules(tiny_model: Path, targets, expected):
    import torch

    base = model.load_base_model(tiny_model, ModelSpec(uri=f"file://{tiny_model}"), torch.float32)
    wrapped = model.wrap_with_lora(base, LoRASpec(r=4, target_modules=targets), gradient_checkpointing=False)
    adapted = [n for n, _ in wrapped.named_modules() if n.endswith("lora_A.default")]
    assert len(adapted) == expected
    assert all(not p.requires_grad for n, p in wrapped.named_parameters() if "lora_" not in n)
