"""The fused LoRA linear layer: the same outputs and gradients as PEFT's forward, with and without dropout, whether
backward keeps the dropped-out input or redoes the dropout; less kept for backward than PEFT keeps; and PEFT's
forward wherever the fused one does not apply."""

from __future__ import annotations

import pytest
import torch

from lorafinetune.api.spec import LoRASpec
from lorafinetune.trainer import lora_linear
from lorafinetune.trainer.batching import Unit, collate
from lorafinetune.trainer.data import Formatter
from lorafinetune.trainer.loss import TokenLoss
from lorafinetune.trainer.model import wrap_with_lora
from tests.tiny_model import chat_rows


@pytest.mark.parametrize("keep_dropped", [True, False], ids=["keep-dropped", "redo-dropout"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_function_matches_the_unfused_arithmetic(dropout, with_bias, keep_dropped):
    torch.manual_seed(0)
    f64 = {"dtype": torch.float64}
    x = torch.randn(2, 5, 12, **f64, requires_grad=True)
    weight, bias = torch.randn(7, 12, **f64), torch.randn(7, **f64) if with_bias else None
    a = torch.randn(4, 12, **f64, requires_grad=True)
    b = torch.randn(7, 4, **f64, requires_grad=True)
    torch.manual_seed(1)
    out = lora_linear._LoRALinear.apply(x, weight, bias, a, b, 0.5, dropout, keep_dropped)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, a, b), grad)

    torch.manual_seed(1)  # the same draw: dropout is the first random number the function takes
    _, kept, scale = lora_linear.masked_dropout(x.detach(), dropout) if dropout else (None, 1, 1.0)
    ref = torch.nn.functional.linear(x, weight, bias) + (x * kept * scale) @ a.t() @ b.t() * 0.5
    want = torch.autograd.grad(ref, (x, a, b), grad)
    torch.testing.assert_close(out, ref)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_cpu_dropout_keeps_each_element_independently_and_is_unbiased(p):
    """The CPU's mask cuts 64-bit draws into 16-bit lanes: every lane must keep at the rate asked (a lane that lost
    its sign bit would keep everything), and x x mask x scale must average to x."""
    torch.manual_seed(0)
    x = torch.ones(1000, 4000)  # 4 M elements, 1 M per lane position
    dropped, mask, scale = lora_linear.masked_dropout(x, p)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    by_lane = mask.reshape(-1, 4).float().mean(dim=0)
    tolerance = 5 * (p * (1 - p) / 1e6) ** 0.5  # five standard deviations of a lane's keep rate
    assert (by_lane - (1 - p)).abs().max() < tolerance, by_lane
    assert abs(dropped.mean().item() - 1.0) < 5 * (p / (1 - p) / 4e6) ** 0.5
    assert abs(scale * (1 - p) - 1) < 1e-4  # the probability drawn is p to within 1/65536
    torch.testing.assert_close(dropped, x * mask * scale)
    assert not torch.equal(mask, lora_linear.masked_dropout(x, p)[1])  # a fresh draw each call


@pytest.mark.parametrize("keep_dropped", [True, False], ids=["keep-dropped", "redo-dropout"])
def test_a_model_with_fused_layers_trains_as_with_peft_layers(tiny_model, tiny_tokenizer, monkeypatch, keep_dropped):
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv(lora_linear.ENV_LORA_KERNEL, raising=False)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    model = wrap_with_lora(base, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]), False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    fmt = Formatter(tiny_tokenizer, "chat", 256)
    batch = collate([Unit((fmt(f"x:{i}", r),)) for i, r in enumerate(chat_rows(4, seed=2))], 0, False)
    token_loss = TokenLoss(model)

    def loss_and_grads():
        model.zero_grad()
        loss = token_loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    want, want_grads = loss_and_grads()
    adapted = sum(1 for n, _ in model.named_modules() if n.endswith("lora_A.default"))
    assert lora_linear.fuse_lora_linears(model, keep_dropped) == adapted > 0
    got, got_grads = loss_and_grads()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Disabled adapters (PEFT's own context manager) take PEFT's path: the base model's output.
    with model.disable_adapter(), torch.no_grad():
        adapters_off = model(input_ids=batch["input_ids"]).logits
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")(batch["input_ids"]).logits
    torch.testing.assert_close(adapters_off, plain)


def test_the_environment_keeps_peft_layers(tiny_model, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv(lora_linear.ENV_LORA_KERNEL, "peft")
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = wrap_with_lora(base, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]), False)
    assert lora_linear.fuse_lora_linears(model, keep_dropped=False) == 0


def _bytes_kept_for_backward(model, batch) -> int:
    """Bytes of the distinct tensors autograd saves during one forward (a tensor saved twice counts once)."""
    kept: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).logits.sum()
    return sum(kept.values())


def test_redoing_the_dropout_keeps_less_than_peft_with_the_same_gradients(tiny_model, tiny_tokenizer, monkeypatch):
    """With LoRA dropout, PEFT on a CPU keeps an fp32 mask and a dropped-out copy of the input per adapted layer; the
    fused layers redoing the dropout keep a bool mask and share the input itself (q, k and v read one tensor)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.delenv(lora_linear.ENV_LORA_KERNEL, raising=False)
    fmt = Formatter(tiny_tokenizer, "chat", 256)
    batch = collate([Unit((fmt(f"x:{i}", r),)) for i, r in enumerate(chat_rows(4, seed=2))], 0, False)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def model_with(kernel: str):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
        model = wrap_with_lora(base, LoRASpec(r=4, alpha=8, dropout=0.1, target_modules=["all-linear"]), False)
        if kernel == "redo-dropout-by-env":  # the benchmarks' switch overrides a GPU's choice
            with monkeypatch.context() as env:
                env.setenv(lora_linear.ENV_LORA_KERNEL, lora_linear.REDO_DROPOUT)
                lora_linear.fuse_lora_linears(model, keep_dropped=True)
        elif kernel != "peft":
            lora_linear.fuse_lora_linears(model, keep_dropped=kernel == "keep-dropped")
        return model.train()

    kept = {kernel: _bytes_kept_for_backward(model_with(kernel), inputs)
            for kernel in ("peft", "keep-dropped", "redo-dropout", "redo-dropout-by-env")}  # fmt: skip
    # Per adapted layer and input element PEFT keeps 8 bytes, the fused layer 5 (or 1 plus its share of the input).
    assert kept["redo-dropout"] < kept["keep-dropped"] < kept["peft"], kept
    assert kept["redo-dropout-by-env"] == kept["redo-dropout"]

    # Redoing the dropout in backward gives the gradients of keeping the dropped-out input: the same draws.
    grads = {}
    for kernel in ("keep-dropped", "redo-dropout"):
        model = model_with(kernel)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)  # else lora_A's gradient is zero
        torch.manual_seed(3)
        TokenLoss(model)(model, batch).backward()
        grads[kernel] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert any(g.abs().sum() > 0 for n, g in grads["redo-dropout"].items() if "lora_A" in n)
    for name, grad in grads["keep-dropped"].items():
        torch.testing.assert_close(grads["redo-dropout"][name], grad, msg=name)
