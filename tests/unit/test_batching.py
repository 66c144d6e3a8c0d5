"""Which examples each rank trains at each step, and packing that changes nothing but speed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorafinetune.trainer.batching import (
    Schedule,
    Unit,
    attention_pairs_per_token,
    collate,
    make_units,
    shared_prefix_length,
    trained_token_count,
)
from lorafinetune.trainer.data import IGNORE, Example, Formatter
from lorafinetune.trainer.engine import lr_multiplier
from tests.tiny_model import chat_rows


def global_batch(s: Schedule, step: int) -> list[int]:
    return sorted(i for k in range(s.accum) for r in range(s.world) for i in s.micro_batch(step, k, r))


@pytest.mark.parametrize("micro, accum", [(8, 1), (1, 8), (2, 4), (4, 2)])
def test_every_batch_shape_sees_the_same_examples_per_step(micro, accum):
    reference = Schedule(num_units=50, micro=8, accum=1, world=2, seed=3)
    other = Schedule(num_units=50, micro=micro, accum=accum, world=2, seed=3)
    for step in range(7):  # crosses an epoch boundary (3 steps per epoch)
        assert global_batch(other, step) == global_batch(reference, step)


def test_an_epoch_visits_each_example_at_most_once_and_epochs_reshuffle():
    s = Schedule(num_units=40, micro=2, accum=2, world=2, seed=0)
    epoch0 = [i for step in range(s.steps_per_epoch) for i in global_batch(s, step)]
    epoch1 = [i for step in range(s.steps_per_epoch, 2 * s.steps_per_epoch) for i in global_batch(s, step)]
    assert len(set(epoch0)) == len(epoch0) == 40 and epoch0 != epoch1


def test_total_steps_from_epochs_or_max_steps():
    s = Schedule(num_units=100, micro=4, accum=2, world=2, seed=0)  # global batch 16 -> 6 steps per epoch
    assert (s.steps_per_epoch, s.total_steps(2.5, None), s.total_steps(None, 7)) == (6, 15, 7)


def test_packing_is_first_fit_and_respects_the_limit():
    ex = [Example([1] * n, [1] * n, "x") for n in (5, 9, 3, 7, 2)]
    units = make_units(ex, max_len=10, packing=True)
    assert [[len(e.input_ids) for e in u.examples] for u in units] == [[5, 3, 2], [9], [7]]
    assert all(u.length <= 10 for u in units)


def test_packed_batch_gives_the_same_per_example_loss_as_unpacked(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    fmt = Formatter(tiny_tokenizer, "chat", 256)
    examples = [fmt(f"x:{i}", row) for i, row in enumerate(chat_rows(6, seed=5))]
    pad = tiny_tokenizer.pad_token_id

    def per_example_loss(batch, rows_of_examples):
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        tok_loss = F.cross_entropy(
            logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE, reduction="none"
        )
        out = []
        for row, examples_in_row in enumerate(rows_of_examples):
            at = 0
            for e in examples_in_row:
                n = len(e.input_ids)
                out.append(tok_loss[row, at : at + n - 1].sum().item())  # targets at positions at+1 .. at+n-1
                at += n
        return out

    unpacked = per_example_loss(collate([Unit((e,)) for e in examples], pad, False), [[e] for e in examples])
    units = make_units(examples, max_len=256, packing=True)
    assert len(units) < len(examples), "the test needs rows that actually pack"
    packed = per_example_loss(collate(units, pad, True), [list(u.examples) for u in units])
    order = [e for u in units for e in u.examples]
    expected = [unpacked[examples.index(e)] for e in order]
    assert packed == pytest.approx(expected, rel=1e-5, abs=1e-5)
    packed_batch = collate(units, pad, True)
    assert trained_token_count(packed_batch) == sum(e.trained_tokens for e in examples)


def test_padding_is_never_a_target():
    e1, e2 = Example([5, 6, 7, 8], [IGNORE, IGNORE, 7, 8], "a"), Example([5, 6], [5, 6], "b")
    batch = collate([Unit((e1,)), Unit((e2,))], pad_id=0, packing=False)
    assert batch["labels"][1].tolist() == [IGNORE, 6, IGNORE, IGNORE]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert trained_token_count(batch) == 3


X = IGNORE  # short, for rows of labels
CHEAP_ATTENTION = 1e9  # attention_pairs_per_token of a model whose attention costs nothing next to its layers


def units_of(*examples: Example) -> list[Unit]:
    return [Unit((e,)) for e in examples]


def test_rows_that_begin_alike_become_one_row_of_their_shared_tokens_then_each_rest():
    a = Example([1, 2, 3, 4, 5, 6], [X, X, X, X, 5, 6], "a")
    b = Example([1, 2, 3, 9, 7], [X, X, X, X, 7], "b")
    batch = collate(units_of(a, b), pad_id=0, packing=False, share_prefix=CHEAP_ATTENTION)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 9, 7]]
    assert batch["labels"].tolist() == [[X, X, X, X, 5, 6, X, 7]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 3, 4]]  # each rest where it was in its own row
    allowed = (batch["attention_mask"][0, 0] == 0).int().tolist()
    assert allowed[6] == [1, 1, 1, 0, 0, 0, 1, 0]  # b's 9: the shared tokens and itself, nothing of a's
    assert allowed[5] == [1, 1, 1, 1, 1, 1, 0, 0]  # a's last token: its own row, causally
    assert allowed[1] == [1, 1, 0, 0, 0, 0, 0, 0]
    assert trained_token_count(batch) == 3 == a.trained_tokens + b.trained_tokens


def test_sharing_stops_before_the_token_before_the_first_target():
    # In one row the first token after the shared ones follows another example: it must not be a target.
    a = Example([1, 2, 3, 4, 5], [X, X, X, 4, 5], "a")
    b = Example([1, 2, 3, 4, 8], [X, X, X, X, 8], "b")
    assert shared_prefix_length(units_of(a, b), CHEAP_ATTENTION) == 2
    text = Example([1, 2, 3], [1, 2, 3], "t")  # every token trained: the second is the first predicted
    assert shared_prefix_length(units_of(text, text), CHEAP_ATTENTION) == 0


def test_rows_are_kept_apart_where_sharing_saves_nothing_or_costs_more():
    a, b = Example([1, 2, 3, 4], [X, X, 3, 4], "a"), Example([7, 2, 3, 4], [X, X, 3, 4], "b")
    assert shared_prefix_length(units_of(a, b), CHEAP_ATTENTION) == 0  # nothing in common
    assert shared_prefix_length(units_of(a), CHEAP_ATTENTION) == 0  # one row
    assert shared_prefix_length([Unit((a, a)), Unit((a,))], CHEAP_ATTENTION) == 0  # packed rows
    few = [Example([1, 2] + [5 + i] * 300, [X, X] + [5] * 300, f"{i}") for i in range(8)]
    assert shared_prefix_length(units_of(*few), CHEAP_ATTENTION) == 0  # 7 tokens fewer of 2,416: not worth it
    long = [Example([1] * 200 + [5 + i] * 400, [X] * 200 + [5] * 400, f"{i}") for i in range(4)]
    assert shared_prefix_length(units_of(*long), CHEAP_ATTENTION) == 199
    # Where attention costs something, one row of 1,803 tokens under a dense mask is dearer than 4 rows of 600.
    assert shared_prefix_length(units_of(*long), 3072.0) == 0
    assert collate(units_of(*long), 0, False, share_prefix=3072.0)["input_ids"].shape == (4, 600)
    wide = [Example([1] * 100 + [5 + i] * 300, [X] * 100 + [5] * 300, f"{i}") for i in range(8)]
    assert shared_prefix_length(units_of(*wide), CHEAP_ATTENTION) == 0  # 2,507 tokens: over SHARING_MAX_WIDTH
    assert collate(units_of(a, a), 0, False, varlen=True, share_prefix=CHEAP_ATTENTION)["input_ids"].shape == (2, 4)


def test_a_shared_prefix_row_gives_the_padded_rows_loss_and_lora_gradients(tiny_model, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    from lorafinetune.api.spec import LoRASpec
    from lorafinetune.trainer.lora_linear import fuse_lora_linears
    from lorafinetune.trainer.loss import TokenLoss
    from lorafinetune.trainer.model import wrap_with_lora

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    model = wrap_with_lora(base, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]), False)
    assert fuse_lora_linears(model, keep_dropped=False) > 0
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would leave A's gradient zero
            torch.nn.init.normal_(p, std=0.5)
    loss = TokenLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    system = {"role": "system", "content": "you are alice the nurse of paris and rome, answer with a city"}
    fmt = Formatter(tiny_tokenizer, "chat", 256)
    examples = [fmt(f"x:{i}", {"messages": [system, *row["messages"]]}) for i, row in enumerate(chat_rows(4, 7))]
    pairs = attention_pairs_per_token(base.config.to_dict())

    def loss_and_grads(batch):
        for p in params:
            p.grad = None
        value = loss(model, batch)
        value.backward()
        return value.item(), [p.grad.clone() for p in params]

    padded = collate(units_of(*examples), tiny_tokenizer.pad_token_id, False)
    shared = collate(units_of(*examples), tiny_tokenizer.pad_token_id, False, share_prefix=pairs)
    assert shared["input_ids"].shape[0] == 1 and shared["input_ids"].numel() < padded["input_ids"].numel() * 0.8
    expected_loss, expected_grads = loss_and_grads(padded)
    got_loss, got_grads = loss_and_grads(shared)
    assert got_loss == pytest.approx(expected_loss, rel=1e-5)
    for got, expected in zip(got_grads, expected_grads, strict=True):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


# 20 steps with warm-up ratio 0.05: one warm-up step, then decay over the remaining 19
@pytest.mark.parametrize(
    "kind, step, expected",
    [("cosine", 0, 0.5), ("cosine", 1, 1.0), ("cosine", 10, cosine(9 / 19)), ("linear", 10, 1 - 9 / 19),
     ("linear", 19, 1 - 18 / 19), ("constant", 15, 1.0)],
)  # fmt: skip
def test_lr_schedule_warms_up_then_decays(kind, step, expected):
    assert lr_multiplier(step, 20, 0.05, kind) == pytest.approx(expected)
