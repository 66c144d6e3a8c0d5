"""The token loss that training, evaluation and the tests share: summed cross-entropy over a batch's target tokens.

A causal LM's forward projects every position onto the whole vocabulary: tokens x vocabulary logits, an fp32 copy
for the loss and as much again for their gradient. With a 128k vocabulary, 16 rows of 2,048 tokens make 67 GB of
them. Three things shrink that here, all exact:

- The output layer sees only positions whose next token is a target. In supervised fine-tuning most positions are
  prompt or padding, whose logits the loss throws away (72 % of the quick start's tokens).
- Those positions are projected and scored a chunk at a time, so at most `CHUNK_ELEMENTS` logits exist at once.
- The gradient of each chunk's loss with respect to its hidden states is computed in the forward pass, while the
  chunk's logits are at hand (softmax minus one-hot, times the output weight), and the logits are then freed:
  backward only scales the stored gradient, tokens x hidden, by the loss's. So chunking costs no recomputation: the
  output layer runs once per target, as in the textbook computation, which keeps every chunk's logits instead. This
  is the fused linear cross-entropy of Liger and others, written with plain tensor ops (CPUs and GPUs alike).

A pre-hook on the output layer takes the hidden states from the model's own forward (and lets the layer run on no
rows). The fused path needs the layer's weight whole and frozen: a plain `nn.Linear`, as PEFT leaves the output
layer unless it is named in target_modules. Any other output layer is called as a module, a chunk at a time, each
chunk's logits recomputed in backward instead of kept. Under ZeRO-3, whose hooks gather the weight only inside the
layer's own call, it is called as a module on all targets in one piece: recomputing a chunk in backward would call
the layer while its weight is partitioned (a checkpoint error), and each call gathers collectively, so ranks with
different numbers of targets would make different numbers of calls. Every rank makes exactly two calls per forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lorafinetune.contract import LOSS_CHUNK_ELEMENTS
from lorafinetune.trainer.data import IGNORE

CHUNK_ELEMENTS = LOSS_CHUNK_ELEMENTS  # 256 MiB of fp32 logits at once


class TokenLoss:
    """`TokenLoss(model)(forward, batch)`: the summed loss of `batch`'s targets; `forward` is the model, or the
    DeepSpeed engine wrapping it. `partitioned`: the output layer's weight exists whole only inside its own call
    (ZeRO-3). Not reentrant: one forward at a time per model (as training and evaluation are)."""

    def __init__(self, model: torch.nn.Module, chunk_elements: int = CHUNK_ELEMENTS, partitioned: bool = False):
        self._head = model.get_output_embeddings()
        vocab = getattr(self._head, "out_features", None) or self._head.weight.shape[0]
        self._chunk_tokens = max(1, chunk_elements // vocab) if not partitioned else 1 << 62
        self.fused = not partitioned and type(self._head) is torch.nn.Linear and not self._head.weight.requires_grad
        self._rows: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None
        self._hook = self._head.register_forward_pre_hook(self._take_target_rows)

    def _take_target_rows(self, _module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if self._rows is None:  # any other forward (generation, the adapter check, our own calls) is left alone
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
        if self.fused:
            return _FusedLinearCrossEntropy.apply(hidden, self._head.weight, self._head.bias, wanted, size)
        if len(wanted) <= size:  # one chunk (or none: the layer is still called once, on no rows)
            return self._chunk_loss(hidden, wanted)
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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), `chunk` rows at a time; the gradient with
    respect to `hidden` is computed here, chunk by chunk, and kept for backward. The weight and bias are frozen."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:  # fmt: skip
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, len(targets), chunk):
            end = min(start + chunk, len(targets))
            y = targets[start:end]
            logits = F.linear(hidden[start:end], weight, bias).float()  # the compute-dtype output is freed here
            # loss = log-sum-exp - target logit. Every step works in place on this one fp32 buffer (a chunk is
            # hundreds of MB, and each fresh buffer of that size costs page faults on a CPU): exponentials, then
            # d loss / d logits = softmax - one-hot.
            target_logit = logits.gather(1, y[:, None])
            peak = logits.amax(dim=1, keepdim=True)
            sums = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)
            total += (peak + sums.log() - target_logit).sum()
            if grad is not None:
                logits.div_(sums)[torch.arange(len(y), device=y.device), y] -= 1.0
                grad[start:end] = logits.to(weight.dtype) @ weight
            del logits  # before the next chunk's exist: one chunk's at a time, not two
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        # Scaled in fp32 (the loss scale is about 1 / tokens): a bf16 copy of the scale would be off by up to 0.4 %.
        return (grad.float() * grad_total).to(grad.dtype), None, None, None, None
