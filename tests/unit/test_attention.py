"""Varlen attention (a GPU path): its plumbing on CPU, with a reference kernel in place of flash's varlen kernel,
which has no CPU implementation. benchmarks/gpu_check.sh runs the real kernel (the trainer checks it against SDPA
at start and says which attention it uses). And SDPA in fp32 for a half-precision model on a CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafinetune.api.spec import LoRASpec
from lorafinetune.trainer import attention
from lorafinetune.trainer.batching import Unit, collate, make_units
from lorafinetune.trainer.data import Formatter
from lorafinetune.trainer.loss import TokenLoss
from lorafinetune.trainer.model import wrap_with_lora
from tests.tiny_model import chat_rows


def reference_kernel(q, k, v, starts, longest, scale):
    """Causal attention within each sequence of a flattened batch, one SDPA call per sequence."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    bounds = starts.tolist()
    assert longest == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
    parts = []
    for a, b in zip(bounds, bounds[1:], strict=False):
        part = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scale)
        parts.append(part.transpose(0, 1))
    return torch.cat(parts)


def test_boundaries_cover_every_example_and_each_rows_padding():
    starts, longest = attention.boundaries([[3, 2], [4], [6]], width=6)
    assert starts.tolist() == [0, 3, 5, 6, 10, 12, 18] and starts.dtype == torch.int32
    assert longest == 6


def _lora_model(tiny_model: str, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.nn.Module, TokenLoss]:
    """(base, LoRA model with non-zero B, its token loss) on SDPA."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa", dtype=dtype)
    assert base.config.num_key_value_heads < base.config.num_attention_heads, "the test needs grouped-query heads"
    model = wrap_with_lora(base, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]), False)
    model.to(dtype)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return base, model, TokenLoss(model)


def _units(tiny_tokenizer, packing: bool) -> list[Unit]:
    """7 chat examples: packed rows holding several, or one per row at different lengths."""
    fmt = Formatter(tiny_tokenizer, "chat", 256)
    examples = [fmt(f"x:{i}", row) for i, row in enumerate(chat_rows(7, seed=5))]
    units = make_units(examples, 256, True) if packing else [Unit((e,)) for e in examples]
    assert any(len(u.examples) > 1 for u in units) if packing else len({u.length for u in units}) > 1
    return units


def _loss_and_grads(model: torch.nn.Module, token_loss: TokenLoss, batch: dict) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = token_loss(model, batch)
    loss.backward()
    return loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_varlen_attention_trains_exactly_as_sdpa_with_masks(tiny_model, tiny_tokenizer, monkeypatch, packing):
    monkeypatch.setattr(attention, "kernel", reference_kernel)
    base, model, token_loss = _lora_model(tiny_model, torch.float32)
    units = _units(tiny_tokenizer, packing)
    want, want_grads = _loss_and_grads(model, token_loss, collate(units, tiny_tokenizer.pad_token_id, packing))
    attention.register(attention.VARLEN)
    base.set_attn_implementation(attention.VARLEN)
    assert base.config._attn_implementation == attention.VARLEN
    varlen = collate(units, tiny_tokenizer.pad_token_id, packing, varlen=True)
    assert "attention_mask" not in varlen
    got, got_grads = _loss_and_grads(model, token_loss, varlen)
    base.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
def test_sdpa_in_fp32_trains_a_bf16_model_as_sdpa_does_with_the_same_masks(tiny_model, tiny_tokenizer, packing):
    """The same loss and gradients as bf16 SDPA to bf16's precision, with the batch's masks: packed rows carry
    block-diagonal additive masks in bf16, and attention across their examples would differ by far more. (Padded rows
    pad at the end, which causal attention never reads: their mask makes no difference to the loss.)"""
    base, model, token_loss = _lora_model(tiny_model, torch.bfloat16)
    batch = collate(_units(tiny_tokenizer, packing), tiny_tokenizer.pad_token_id, packing)
    if batch["attention_mask"].dim() == 4:  # as the trainer hands it over (recipe._to_device)
        batch["attention_mask"] = batch["attention_mask"].to(torch.bfloat16)
    want, want_grads = _loss_and_grads(model, token_loss, batch)
    attention.register(attention.SDPA_FP32)
    base.set_attn_implementation(attention.SDPA_FP32)
    assert base.config._attn_implementation == attention.SDPA_FP32
    got, got_grads = _loss_and_grads(model, token_loss, batch)
    if packing:
        across_examples = token_loss(model, {k: v for k, v in batch.items() if k != "attention_mask"}).detach()
        assert abs(across_examples.float() - want) > 10 * abs(got - want), "the test cannot tell masked from unmasked"
    base.set_attn_implementation("sdpa")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=0.1, atol=grad.abs().max().item() * 0.05, msg=name)


def test_varlen_attention_refuses_a_batch_without_boundaries(tiny_model, monkeypatch):
    q = torch.zeros(1, 4, 5, 8)
    with pytest.raises(RuntimeError, match="sequence boundaries"):
        attention.varlen_attention(torch.nn.Module(), q, q, q, None)


def test_the_start_check_passes_a_right_kernel_and_fails_a_wrong_one(monkeypatch):
    monkeypatch.setattr(attention, "kernel", reference_kernel)
    assert attention._check_against_sdpa(torch.device("cpu")) < attention.CHECK_TOLERANCE

    def across_sequences(q, k, v, starts, longest, scale):  # one causal sequence over the whole batch
        whole = torch.tensor([0, len(q)], dtype=torch.int32)
        return reference_kernel(q, k, v, whole, len(q), scale)

    monkeypatch.setattr(attention, "kernel", across_sequences)
    assert attention._check_against_sdpa(torch.device("cpu")) > 10 * attention.CHECK_TOLERANCE


def test_choose_keeps_sdpa_where_varlen_cannot_run_and_fp32_sdpa_for_a_cpus_bf16(monkeypatch):
    monkeypatch.delenv(attention.ENV_ATTENTION, raising=False)
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert attention.choose(torch.device("cpu"), torch.float32, {})[0] == attention.SDPA
    assert attention.choose(torch.device("cpu"), bf16, {})[0] == attention.SDPA_FP32
    assert attention.choose(cuda, torch.float32, {})[0] == attention.SDPA
    monkeypatch.setenv(attention.ENV_ATTENTION, "sdpa")
    assert attention.choose(cuda, bf16, {}) == (attention.SDPA, "LFT_ATTENTION=sdpa")


def _config(model_type: str, **overrides) -> dict:
    from transformers import AutoConfig

    return attention.config_of(AutoConfig.for_model(model_type, **overrides))  # as the trainer reads a config


# Models whose attention transformers expresses in a mask or in arguments the varlen kernel does not take: each is
# refused before the kernel is tried (on CI there is no CUDA: reaching the check would fail differently).
REFUSED = {
    "attention dropout (GPT-2)": ("gpt2", {}, "dropout"),
    "sliding window (Mistral v0.1's default)": ("mistral", {}, "a sliding window"),
    "sliding layers in a text config (Gemma 3)": ("gemma3", {}, "a sliding window"),
    "chunked layers (Llama 4 text)": ("llama4_text", {}, "layers of kind chunked_attention"),
    "soft-capped logits": ("llama", {"attn_logit_softcapping": 30.0}, "soft-capped logits"),
    "value head size (DeepSeek V3)": ("deepseek_v3", {}, "a value head size of its own"),
    # Recurrent layers, named only by a property or an alias of the config (to_dict() leaves them out): a mask of
    # ours would not stop them carrying state from one example to the next.
    "Mamba layers (Jamba)": ("jamba", {}, "layers of kind linear_attention"),
    "Mamba layers (Bamba)": ("bamba", {}, "layers of kind linear_attention"),
    "hybrid layers (Zamba)": ("zamba", {}, "layers of kind hybrid"),
    "hybrid layers (Falcon-H1)": ("falcon_h1", {}, "layers of kind hybrid"),
}


@pytest.mark.parametrize("model, extra, reason", REFUSED.values(), ids=REFUSED.keys())
def test_choose_refuses_attention_varlen_would_compute_wrongly(model, extra, reason, monkeypatch):
    monkeypatch.delenv(attention.ENV_ATTENTION, raising=False)
    config = _config(model) | extra
    chosen, why = attention.choose(torch.device("cuda"), torch.bfloat16, config)
    assert chosen == attention.SDPA and reason in why, why


def test_plain_causal_models_reach_the_kernel_check():
    for model, extra in (("llama", {}), ("qwen2", {}), ("qwen3", {}), ("mistral", {"sliding_window": None})):
        assert attention.not_plain_attention(_config(model, **extra)) is None, model


def test_the_check_runs_on_the_models_head_shape(monkeypatch):
    seen = []

    def recording(q, k, v, starts, longest, scale):
        seen.append((q.shape[1], k.shape[1], q.shape[2]))
        return reference_kernel(q, k, v, starts, longest, scale)

    monkeypatch.setattr(attention, "kernel", recording)
    assert attention._check_against_sdpa(torch.device("cpu"), 12, 4, 32) < attention.CHECK_TOLERANCE
    assert seen == [(12, 4, 32)]


def test_kernel_arguments_follow_the_torch_version():
    def newer(q, k, v, cq, ck, mq, mk, *, scale=None, window_size=(-1, -1)): ...

    def older(q, k, v, cq, ck, mq, mk, is_causal=False): ...

    assert attention._kernel_kwargs(newer, 0.125, 64) == {"window_size": (-1, 0), "scale": 0.125}
    assert attention._kernel_kwargs(older, 0.125, 64) == {"is_causal": True}  # 1/sqrt(64): the default
    with pytest.raises(RuntimeError, match="no scale argument"):
        attention._kernel_kwargs(older, 0.5, 64)
