"""Finding and wrapping the base model: the errors a user sees for a wrong path, GGUF name or target list."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafinetune.api.spec import LoRAFineTuneSpec, LoRASpec, ModelSpec
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


def test_an_evaluation_pass_leaves_a_4_bit_base_differentiable(tiny_model: Path):
    """The trainer evaluates between steps. On a CPU with AVX512-BF16, bitsandbytes would repack 4-bit weights for an
    inference-only kernel at the first evaluation, and no gradient would reach the layers below afterwards (or, for
    layers narrower than a quantization block, as in this tiny model, the evaluation itself would fail)."""
    import torch

    base = model.load_base_model(tiny_model, ModelSpec(uri=f"file://{tiny_model}", quantization="nf4"),
                                 torch.float32, quantized_on=torch.device("cpu"))  # fmt: skip
    wrapped = model.wrap_with_lora(base, LoRASpec(r=4, dropout=0.0), gradient_checkpointing=False)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])

    def embedding_gradient() -> torch.Tensor:
        embeds = wrapped.get_input_embeddings()(ids).detach().requires_grad_()
        wrapped(inputs_embeds=embeds).logits.float().pow(2).mean().backward()
        assert embeds.grad is not None
        return embeds.grad

    wrapped.train()
    before = embedding_gradient()
    wrapped.eval()
    with torch.no_grad():
        wrapped(input_ids=ids)
    wrapped.train()
    torch.testing.assert_close(embedding_gradient(), before)


def test_importing_the_trainer_and_peft_prints_no_bitsandbytes_kernel_warning():
    """On an AVX512-BF16 CPU bitsandbytes warns on import about a hub kernel the trainer never uses (it turns that
    kernel off): the quick start's output showed it. Elsewhere there is no warning to hide, so this cannot fail."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", "import lorafinetune.trainer, peft"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr + done.stdout


def test_wrapping_a_model_in_peft_prints_no_transformers_deprecation_warning():
    """PEFT reads a property transformers 5 deprecates; the quick start's evaluation printed the FutureWarning."""
    import subprocess
    import sys

    from tests.conftest import REPO

    script = """
import lorafinetune.trainer
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=64)
get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj"]))
"""
    done = subprocess.run([sys.executable, "-W", "default", "-c", script], cwd=REPO, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "is_gradient_checkpointing" not in done.stderr + done.stdout, done.stderr


@pytest.mark.parametrize(("precision", "dtype", "field"), [
    ("bf16", "auto", "training.precision bf16"),
    ("fp16", "float32", "training.precision fp16"),  # DeepSpeed casts to fp16 whatever the load dtype
    ("fp32", "bfloat16", "model.dtype bfloat16"),  # fp32 training computes in the frozen weights' dtype
])  # fmt: skip
def test_half_precision_on_a_cpu_that_emulates_it_is_named_with_its_field(precision, dtype, field):
    spec = ModelSpec(uri="file:///models/m", dtype=dtype)
    warning = model.emulated_on_cpu(spec, precision, native=False)
    assert warning is not None and warning.startswith(f"{field} on this CPU")
    assert "training.precision: auto" in warning
    assert model.emulated_on_cpu(spec, precision, native=True) is None


def test_a_cpu_computes_bf16_natively_when_its_flags_name_avx512_bf16_or_amx():
    """Not oneDNN's own check, which says yes for any AVX512 CPU, where it emulates bf16."""
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    assert model.cpu_native_bf16() == bool(set(flags.split(":")[1].split()) & {"avx512_bf16", "amx_bf16"})


def test_auto_precision_resolves_to_what_this_cpu_computes_natively_and_never_to_an_emulated_one():
    from tests.manifests import MINIMAL, manifest

    spec = LoRAFineTuneSpec.model_validate(manifest("auto", MINIMAL)["spec"])
    resolved = model.with_concrete_precision(spec, on_gpu=False)
    assert resolved.training.precision == ("bf16" if model.cpu_native_bf16() else "fp32")
    assert model.emulated_on_cpu(resolved.model, resolved.training.precision) is None
    assert spec.training.precision == "auto", "the spec given is left as written"
    fp16 = LoRAFineTuneSpec.model_validate(manifest("fp16", MINIMAL, training={"precision": "fp16"})["spec"])
    assert model.with_concrete_precision(fp16, on_gpu=False) is fp16, "a written precision is kept"


@pytest.mark.parametrize("dtype", ["auto", "float32"])
def test_fp32_on_any_cpu_is_not_flagged(dtype):
    assert model.emulated_on_cpu(ModelSpec(uri="file:///models/m", dtype=dtype), "fp32", native=False) is None
