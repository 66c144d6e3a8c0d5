"""Which examples each rank trains at each step, and packing that changes nothing but speed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lorafinetune.trainer.batching import Schedule, Unit, collate, make_units, trained_token_count
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
