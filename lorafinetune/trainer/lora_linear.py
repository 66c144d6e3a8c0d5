"""A LoRA linear layer's forward and backward in one autograd function.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate operations. On a GPU with a frozen base,
the `* scaling` and the `+` are each a pass over a tokens x out_features tensor, in forward and again in backward,
and they measured as much GPU time per step as all attention (benchmarks/README, step profile on an H200). Here the
LoRA product is accumulated into the base output by the same matrix multiply (`addmm`, beta 1, alpha scaling), and
backward folds the scaling into the rank-r products. Same parameters, same adapter files; numerically the sum is
rounded once instead of three times.

What backward keeps of a layer's input is the other half. With LoRA dropout, PEFT on a CPU keeps, per adapted layer,
the dropped-out copy of its input (for lora_A's gradient) and the dropout mask in the input's dtype: 8 bytes per
input element in fp32, for each of q, k and v although they read one tensor. This function keeps a bool mask, and
either the dropped-out copy (`keep_dropped`, the GPU's choice: no extra pass in backward) or the input itself, which
layers reading the same tensor share, redoing `input x mask x scale` in backward (one elementwise pass; the CPU's
choice, where activations are most of a rank's resident set).

Dropout draws from PyTorch's random stream, on a GPU with PyTorch's own kernels. On a CPU those are scalar loops:
drawing the mask costs 5-6 ns an element (a double per element from the Mersenne Twister) and applying a bool mask
about 1 ns (against 0.1 ns for a product with a uint8 one): together about 30 % of a quick start step in bf16. There
the mask comes from 64-bit draws cut into four 16-bit lanes (under 1 ns an element), so the dropout probability is a
multiple of 1/65536 (0.05 draws 0.050003) and the scale is that of the probability drawn, which keeps the layer
unbiased; and it is applied as uint8.

Used for plain LoRA on an unquantized nn.Linear with one active adapter (the trainer's case); anything else (DoRA,
merged or disabled adapters, several adapters, ZeRO-3, whose parameters exist whole only inside their module's own
call) keeps PEFT's forward.
"""

from __future__ import annotations

import functools
import os
import types
from typing import Any

import torch
import torch.nn.functional as F

# The benchmarks' switch: "peft" keeps PEFT's forward; "redo-dropout" redoes the dropout in backward on a GPU too
# (the memory it saves there against the time it costs).
ENV_LORA_KERNEL = "LFT_LORA_KERNEL"
PEFT, REDO_DROPOUT = "peft", "redo-dropout"


_LANES = 1 << 16  # values of one 16-bit lane


def masked_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """`x` with each element zeroed with probability about `p` and the rest scaled: (dropped-out x, bool keep-mask,
    scale), where dropped-out x = x x mask x scale and scale = 1 / the probability of keeping an element."""
    if x.device.type != "cpu":
        dropped, mask = torch.ops.aten.native_dropout(x, p, True)
        return dropped, mask, 1.0 / (1.0 - p)
    dropped_lanes = min(round(p * _LANES), _LANES - 1)
    bits = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)  # every 64-bit value
    mask = bits.view(torch.int16)[: x.numel()].view(x.shape) >= dropped_lanes - _LANES // 2
    scale = _LANES / (_LANES - dropped_lanes)
    return apply_mask(x, mask, scale), mask, scale


def apply_mask(t: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """t x mask x scale: the dropout's output from its input, or its input's gradient from its output's."""
    if t.device.type != "cpu":
        return torch.ops.aten.native_dropout_backward(t, mask, scale)
    return (t * mask.view(torch.uint8)).mul_(scale)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float, dropout: float, keep_dropped: bool) -> torch.Tensor:  # fmt: skip
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, weight, bias)
        xa = x2.to(lora_a.dtype)
        mask, keep_scale = None, 1.0
        if dropout > 0:
            xa, mask, keep_scale = masked_dropout(xa, dropout)
        h = xa @ lora_a.t()
        out = out.addmm_(h.to(out.dtype), lora_b.t().to(out.dtype), alpha=scaling)
        ctx.redo_dropout = mask is not None and not keep_dropped
        ctx.save_for_backward(weight, lora_a, lora_b, x2 if ctx.redo_dropout else xa, mask, h)
        ctx.scaling, ctx.keep_scale, ctx.x_dtype = scaling, keep_scale, x.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight, lora_a, lora_b, xa, mask, h = ctx.saved_tensors
        if ctx.redo_dropout:  # saved the input, not its dropped-out copy: the same mask and scale again
            xa = apply_mask(xa.to(lora_a.dtype), mask, ctx.keep_scale)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_h = (g @ lora_b.to(g.dtype)).mul_(ctx.scaling)  # tokens x r: the scaling costs nothing here
        grad_a = (g_h.t().to(xa.dtype) @ xa).to(lora_a.dtype) if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ h.to(g.dtype)).mul_(ctx.scaling).to(lora_b.dtype) if ctx.needs_input_grad[4] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight.to(g.dtype)
            lora_part = g_h.to(lora_a.dtype) @ lora_a
            if mask is None:
                grad_x.add_(lora_part.to(grad_x.dtype))
            else:
                grad_x.add_(apply_mask(lora_part, mask, ctx.keep_scale).to(grad_x.dtype))
            grad_x = grad_x.view(*grad_out.shape[:-1], grad_x.shape[-1]).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None, None


def _fused_forward(layer: Any, x: torch.Tensor, *args: Any, keep_dropped: bool, **kwargs: Any) -> torch.Tensor:
    adapters = layer.active_adapters
    if args or kwargs or layer.disable_adapters or layer.merged or len(adapters) != 1 or adapters[0] in getattr(
        layer, "lora_variant", {}
    ):
        return type(layer).forward(layer, x, *args, **kwargs)
    name = adapters[0]
    base, dropout = layer.get_base_layer(), layer.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0
    return _LoRALinear.apply(x, base.weight, base.bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                             layer.scaling[name], p, keep_dropped)  # fmt: skip


def fuse_lora_linears(model: torch.nn.Module, keep_dropped: bool) -> int:
    """Give every plain LoRA linear layer of `model` the fused forward; returns how many. `keep_dropped`: backward
    keeps each layer's dropped-out input rather than redoing the dropout (see above). Unset with
    LFT_LORA_KERNEL=peft."""
    kernel = os.environ.get(ENV_LORA_KERNEL)
    if kernel == PEFT:
        return 0
    keep_dropped = keep_dropped and kernel != REDO_DROPOUT
    from peft.tuners.lora.layer import Linear as LoRALinear

    fused = 0
    for module in model.modules():
        if type(module) is not LoRALinear or type(module.get_base_layer()) is not torch.nn.Linear:
            continue
        if any(p.requires_grad for p in module.get_base_layer().parameters()):  # a trained bias (lora.bias)
            continue
        if any(getattr(m, "bias", None) is not None for m in (*module.lora_A.values(), *module.lora_B.values())):
            continue
        module.forward = types.MethodType(functools.partial(_fused_forward, keep_dropped=keep_dropped), module)
        fused += 1
    return fused
