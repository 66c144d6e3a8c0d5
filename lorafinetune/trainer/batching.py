"""Deterministic batches by step: which examples a rank trains at optimizer step `s`, micro-batch `k`.

The order is a pure function of (seed, step), so resuming at step s needs no saved data-loader state, and
batch 8 x accum 1 sees exactly the same examples per optimizer step as batch 1 x accum 8:

    global batch of step s = permutation(seed, epoch)[pos * G : (pos + 1) * G],   G = micro * accum * world
    rank r, micro-batch k  = global batch[(k * world + r) * micro : ... + micro]

Packing puts several examples into one row. Each keeps its own position ids and a block-diagonal causal mask, and the
first token of each packed example is not a target (it would be "predicted" from the previous example), so a packed
row gives exactly the per-example losses of the unpacked examples.

Prefix sharing turns a micro-batch of rows that begin alike (a system prompt, an instruction template) into one row:
the shared tokens once, then each example's remaining tokens with the positions they had, attending to the shared
tokens and to themselves (a tree-shaped causal mask). Every example's attention and loss are what they were in its
own row; the shared tokens are computed once instead of once per row, and their gradient sums every row's. Only
dropout differs (LoRA's, and the model's own if it has any): it draws one mask for the shared tokens where separate
rows would draw one each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lorafinetune.plan import Shape
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


# A shared-prefix row must cost at most this share of the padded batch it replaces (see shared_prefix_length), and be
# at most this long: its dense mask is width^2 floats, 16 MiB in fp32 at 2,048 (attention in fp32 on a CPU in bf16
# keeps an fp32 copy per layer for backward).
SHARING_MAX_COST = 0.9
SHARING_MAX_WIDTH = 2048
SHARED = -2  # the segment of the tokens a shared-prefix row's examples share


def attention_pairs_per_token(config: dict[str, Any]) -> float:
    """How many (query, key) pairs of attention cost as much as one token through a decoder block's linear layers:
    2 x their weights FLOPs per token against 4 x heads x head size per pair (scores, then the weighted values).
    About 3,000 for SmolLM2-135M, 15,000 for Llama-3.2-1B."""
    shape = Shape.from_config(config)
    return 2 * shape.block_linear_parameters / (4 * shape.heads * shape.head_dim)


def shared_prefix_length(units: list[Unit], pairs_per_token: float) -> int:
    """How many leading tokens a micro-batch of single examples can share in one row (0: none, keep the rows).

    The tokens all its examples begin with, stopping before each example's first target and the token before it:
    the first token after the shared ones must not be a target, because in the shared row it follows another
    example's last token. Shared only where the row costs at most SHARING_MAX_COST of the padded batch, counting
    a token's linear layers and, for attention, every (query, key) pair under the mask (the mask is dense, so a
    long shared row pays quadratically: long rows with a short common prefix stay separate)."""
    if len(units) < 2 or any(len(u.examples) != 1 for u in units):
        return 0
    examples = [u.examples[0] for u in units]
    limit = min(_first_target(e) for e in examples) - 1
    first, n = examples[0].input_ids, 0
    while n < limit and all(e.input_ids[n] == first[n] for e in examples[1:]):
        n += 1
    if n == 0:
        return 0
    width = max(len(e.input_ids) for e in examples)
    merged = sum(len(e.input_ids) for e in examples) - (len(examples) - 1) * n
    if merged > SHARING_MAX_WIDTH:
        return 0
    cost_padded = len(examples) * (width + width * width / pairs_per_token)
    cost_merged = merged + merged * merged / pairs_per_token
    return n if cost_merged <= SHARING_MAX_COST * cost_padded else 0


def _first_target(e: Example) -> int:
    """The first token the loss predicts (the first token of a row never is, whatever its label)."""
    return next((i for i, label in enumerate(e.labels) if i and label != IGNORE), len(e.labels))


def collate(units: list[Unit], pad_id: int, packing: bool, varlen: bool = False,
            share_prefix: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Right-padded tensors. Packed batches carry a 4-D additive mask (block-diagonal, causal) and position ids.
    With `varlen` (the model's attention is attention.VARLEN), no mask: every batch carries position ids and its
    examples' boundaries in the flattened batch, as that attention takes them. With `share_prefix` (the model's
    attention_pairs_per_token; masks only, not varlen), unpacked rows that begin alike become one shared-prefix
    row where that is cheaper (shared_prefix_length)."""
    if share_prefix is not None and not varlen and not packing:
        if shared := shared_prefix_length(units, share_prefix):
            return _collate_shared([u.examples[0] for u in units], shared)
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
    batch["attention_mask"] = _additive(allowed)
    batch["position_ids"] = positions
    return batch


def _collate_shared(examples: list[Example], shared: int) -> dict[str, Any]:
    """One row: the first `shared` tokens (the same in every example), then each example's rest, in order."""
    ids, labels = list(examples[0].input_ids[:shared]), [IGNORE] * shared
    positions, segment = list(range(shared)), [SHARED] * shared
    for seg, e in enumerate(examples):
        n = len(e.input_ids)
        ids += e.input_ids[shared:]
        labels += e.labels[shared:]  # its first is no target (shared_prefix_length)
        positions += range(shared, n)
        segment += [seg] * (n - shared)
    seg = torch.tensor(segment)
    width = len(ids)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
    allowed = causal & ((seg[None, :] == SHARED) | (seg[:, None] == seg[None, :]))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]), "attention_mask": _additive(allowed[None])}  # fmt: skip


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """(batch, 1, width, width) fp32: 0 where attention is allowed, the most negative float elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None]


def trained_token_count(batch: dict[str, Any]) -> int:
    """Targets in a batch after the causal shift (the loss's denominator)."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
