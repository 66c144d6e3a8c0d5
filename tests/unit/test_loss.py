"""The shared token loss: the output layer only at target positions gives the full computation's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lorafinetune.api.spec import LoRASpec
from lorafinetune.trainer.batching import Unit, collate, make_units
from lorafinetune.trainer.data import IGNORE, Formatter
from lorafinetune.trainer.loss import TokenLoss
from lorafinetune.trainer.model import wrap_with_lora
from tests.tiny_model import chat_rows


def full_vocabulary_loss(model, batch):
    """The textbook way: logits at every position, the ignored ones dropped by the loss."""
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE, reduction="sum"
    )


# (packing, chunk_tokens, LoRA targets, ZeRO-3): the fused path (a frozen output layer), and the module path that
# an adapted output layer or ZeRO-3 takes (chunks recomputed in backward, or all targets in one piece).
CASES = {
    "fused-padded": (False, None, ["all-linear"], False),
    "fused-packed": (True, None, ["all-linear"], False),
    "fused-chunks-of-5": (False, 5, ["all-linear"], False),
    "adapted-output-layer-chunks-of-5": (False, 5, ["q_proj", "lm_head"], False),
    "partitioned-one-piece": (False, 5, ["all-linear"], True),
}


@pytest.mark.parametrize("packing, chunk_tokens, targets, partitioned", CASES.values(), ids=CASES.keys())
def test_the_loss_and_lora_gradients_equal_the_full_vocabulary_computation(
    tiny_model, tiny_tokenizer, packing, chunk_tokens, targets, partitioned
):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    model = wrap_with_lora(base, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=targets), False)
    for name, p in model.named_parameters():  # B starts at zero: give the adapter something to differentiate
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    fmt = Formatter(tiny_tokenizer, "chat", 256)
    examples = [fmt(f"x:{i}", row) for i, row in enumerate(chat_rows(6, seed=3))]
    units = make_units(examples, 256, packing) if packing else [Unit((e,)) for e in examples]
    batch = collate(units, tiny_tokenizer.pad_token_id, packing)
    trained = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert 0 < trained < batch["input_ids"].numel() - len(units), "the test needs prompt or padding positions"

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    full, full_grads = loss_and_grads(lambda: full_vocabulary_loss(model, batch))
    vocab = model.get_output_embeddings().out_features
    chunking = {"chunk_elements": chunk_tokens * vocab} if chunk_tokens else {}
    token_loss = TokenLoss(model, partitioned=partitioned, **chunking)
    assert token_loss.fused == (targets == ["all-linear"] and not partitioned)
    if chunk_tokens:
        assert trained > 3 * chunk_tokens, "the test needs several chunks"
    ours, our_grads = loss_and_grads(lambda: token_loss(model, batch))
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    assert full_grads.keys() == our_grads.keys() and full_grads
    for name, grad in full_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Outside a TokenLoss call the model is untouched: full logits, one per position.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][:1]).logits
    assert logits.shape[:2] == batch["input_ids"][:1].shape
    token_loss.remove()


def test_a_batch_without_targets_has_zero_loss(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    fmt = Formatter(tiny_tokenizer, "chat", 256)
    batch = collate([Unit((fmt("x:0", chat_rows(1)[0]),))], tiny_tokenizer.pad_token_id, False)
    batch["labels"].fill_(IGNORE)  # what a rank with no evaluation rows left runs
    with torch.no_grad():
        assert TokenLoss(model)(model, batch).item() == 0.0


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_the_fused_loss_and_its_gradient_equal_autograds_in_each_dtype(dtype, tolerance):
    """The fused function alone against F.linear + cross-entropy, with a bias, uneven chunks and a repeated target."""
    from lorafinetune.trainer.loss import _FusedLinearCrossEntropy

    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=dtype)
    weight, bias = torch.randn(50, 16, dtype=dtype) / 4, torch.randn(50, dtype=dtype)
    targets = torch.randint(0, 50, (23,))
    targets[3] = targets[4]

    reference_input = hidden.clone().requires_grad_()
    reference = F.cross_entropy(F.linear(reference_input, weight, bias).float(), targets, reduction="sum")
    (reference * 0.5).backward()
    fused_input = hidden.clone().requires_grad_()
    fused = _FusedLinearCrossEntropy.apply(fused_input, weight, bias, targets, 7)
    (fused * 0.5).backward()

    assert fused.dtype == torch.float32 and fused_input.grad.dtype == dtype
    torch.testing.assert_close(fused, reference, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(fused_input.grad.float(), reference_input.grad.float(), rtol=tolerance, atol=tolerance)
