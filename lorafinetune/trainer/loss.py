"""The token loss that training, evaluation and the tests share: summed cross-entropy over a batch's target tokens.

A causal LM's forward projects every position onto the whole vocabulary: tokens x vocabulary logits, an fp32 copy
for the loss and as much again for their gradient. With a 128k vocabulary, 16 rows of 2,048 tokens make 67 GB of
them. Two things shrink that here, both exact:

- The output layer sees only positions whose next token is a target. In supervised fine-tuning most positions are
  prompt or padding, whose logits the loss throws away (72 % of the quick start's tokens).
- Those positions are projected and scored a chunk at a time, so at most `CHUNK_ELEMENTS` logits exist at once. Each
  chunk's logits are recomputed in the backward pass instead of kept (one more output-layer forward per chunk), so
  this is done only where the logits would exceed one chunk.

A pre-hook on the output layer takes the hidden states from the model's own forward (and lets the layer run on no
rows); the layer is then called as a module, so ZeRO-3's hooks gather its weight as usual. Under ZeRO-3 the trainer
scores all targets in one chunk: recomputing a chunk in backward would call the layer while its weight is
partitioned (a checkpoint error), and each call gathers collectively, so ranks with different numbers of targets
would make different numbers of calls. Every rank makes exactly two calls per forward either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorafinetune.contract import LOSS_CHUNK_ELEMENTS
from lorafinetune.trainer.data import IGNORE

CHUNK_ELEMENTS = LOSS_CHUNK_ELEMENTS  # 256 MiB of fp32 logits (about 1 GiB with the loss's buffers and gradients)


class TokenLoss:
    """`TokenLoss(model)(forward, batch)`: the summed loss of `batch`'s targets; `forward` is the model, or the
    DeepSpeed engine wrapping it. Not reentrant: one forward at a time per model (as training and evaluation are)."""

    def __init__(self, model: torch.nn.Module, chunk_elements: int = CHUNK_ELEMENTS):
        self._head = model.get_output_embeddings()
        vocab = getattr(self._head, "out_features", None) or self._head.weight.shape[0]
        self._chunk_tokens = max(1, chunk_elements // vocab)
        self._rows: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._hook = self._head.register_forward_pre_hook(self._take_target_rows)

    def _take_target_rows(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._rows is None:  # any other forward (generation, the adapter check, our own chunks) is left alone
            return None
        self._hidden = args[0][self._rows]
        return (self._hidden[:0], *args[1:])

    def __call__(self, forward: Callable[..., Any], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"]
        targets = labels[:, 1:]
        # Position t predicts token t + 1: keep the positions whose next token is a target (row-major, as below).
        rows = torch.zeros_like(labels, dtype=torch.bool)
        rows[:, :-1] = targets != IGNORE
        self._rows = rows
        try:
            forward(**{k: v for k, v in batch.items() if k != "labels"})
            hidden = self._hidden
        finally:
            self._rows, self._hidden = None, None
        if hidden is None:
            raise RuntimeError("the model's forward did not call its output layer")
        wanted = targets[targets != IGNORE]
        size = self._chunk_tokens
        if len(wanted) <= size:  # one chunk (or none: the layer is still called once, on no rows)
            return self._chunk_loss(hidden, wanted)
        # Kept logits would be several chunks' worth: recompute each chunk's in backward instead of keeping it.
        recompute = torch.is_grad_enabled() and hidden.requires_grad
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, len(wanted), size):
            h, y = hidden[start : start + size], wanted[start : start + size]
            total = total + (checkpoint(self._chunk_loss, h, y, use_reentrant=False) if recompute
                             else self._chunk_loss(h, y))  # fmt: skip
        return total

    def _chunk_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self._head(hidden).float(), targets, reduction="sum")

    def remove(self) -> None:
        self._hook.remove()
