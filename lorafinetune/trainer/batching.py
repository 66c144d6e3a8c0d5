"""Deterministic batches by step: which examples a rank trains at optimizer step `s`, micro-batch `k`.

The order is a pure function of (seed, step), so resuming at step s needs no saved data-loader state, and
batch 8 x accum 1 sees exactly the same examples per optimizer step as batch 1 x accum 8:

    global batch of step s = permutation(seed, epoch)[pos * G : (pos + 1) * G],   G = micro * accum * world
    rank r, micro-batch k  = global batch[(k * world + r) * micro : ... + micro]

Packing puts several examples into one row. Each keeps its own position ids and a block-diagonal causal mask, and the
first token of each packed example is not a target (it would be "predicted" from the previous example), so a packed
row gives exactly the per-example losses of the unpacked examples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lorafinetune.trainer import attention
from lorafinetune.trainer.data import IGNORE, Example


@dataclass(frozen=True)
class Unit:
    """One row of a batch: one example, or several packed together."""

    examples: tuple[Example, ...]

    @property
    def length(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def make_units(examples: list[Example], max_len: int, packing: bool) -> list[Unit]:
    """Rows to sample from. Packing is first-fit in dataset order, so it is the same on every rank and resume."""
    if not packing:
        return [Unit((e,)) for e in examples]
    units: list[list[Example]] = []
    room: list[int] = []
    for e in examples:
        for i, free in enumerate(room):
            if len(e.input_ids) <= free:
                units[i].append(e)
                room[i] -= len(e.input_ids)
                break
        else:
            units.append([e])
            room.append(max_len - len(e.input_ids))
    return [Unit(tuple(u)) for u in units]


@dataclass(frozen=True)
class Schedule:
    """How steps map onto the data."""

    num_units: int
    micro: int
    accum: int
    world: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    @property
    def steps_per_epoch(self) -> int:
        return self.num_units // self.global_batch  # the last incomplete global batch is dropped

    def total_steps(self, epochs: float | None, max_steps: int | None) -> int:
        if max_steps is not None:
            return max_steps
        if epochs is None:  # the spec's validation requires one of the two
            raise ValueError("training.epochs or training.maxSteps must be set")
        return max(1, math.ceil(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> float:
        return step / self.steps_per_epoch

    def micro_batch(self, step: int, k: int, rank: int) -> list[int]:
        """Unit indices for optimizer step `step` (0-based), micro-batch `k`, on `rank`."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.num_units, generator=gen)
        start = pos * self.global_batch + (k * self.world + rank) * self.micro
        return perm[start : start + self.micro].tolist()


def collate(units: list[Unit], pad_id: int, packing: bool, varlen: bool = False) -> dict[str, Any]:
    """Right-padded tensors. Packed batches carry a 4-D additive mask (block-diagonal, causal) and position ids.
    With `varlen` (the model's attention is attention.VARLEN), no mask: every batch carries position ids and its
    examples' boundaries in the flattened batch, as that attention takes them."""
    width = max(u.length for u in units)
    ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    labels = torch.full((len(units), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(units), width), dtype=torch.long)
    segment = torch.full((len(units), width), -1, dtype=torch.long)  # -1 = padding
    for row, unit in enumerate(units):
        at = 0
        for seg, e in enumerate(unit.examples):
            n = len(e.input_ids)
            ids[row, at : at + n] = torch.tensor(e.input_ids)
            labels[row, at : at + n] = torch.tensor(e.labels)
            labels[row, at] = IGNORE  # never a target: nothing of this example precedes it
            positions[row, at : at + n] = torch.arange(n)
            segment[row, at : at + n] = seg
            at += n
    batch: dict[str, Any] = {"input_ids": ids, "labels": labels}
    if varlen:
        starts, longest = attention.boundaries([[len(e.input_ids) for e in u.examples] for u in units], width)
        batch |= {"position_ids": positions, "cu_seq_lens_q": starts, "cu_seq_lens_k": starts,
                  "max_length_q": longest, "max_length_k": longest}  # fmt: skip
        return batch
    if not packing:
        batch["attention_mask"] = (segment >= 0).long()
        return batch
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
    allowed = causal[None] & same
    allowed |= torch.eye(width, dtype=torch.bool)[None]  # padding rows attend to themselves: no all -inf softmax
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    batch["attention_mask"] = mask[:, None]
    batch["position_ids"] = positions
    return batch


def trained_token_count(batch: dict[str, Any]) -> int:
    """Targets in a batch after the causal shift (the loss's denominator)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
