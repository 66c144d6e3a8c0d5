"""Variable-length attention on a GPU: every example of a batch attends only to itself, with no mask.

A packed row (several examples end to end) otherwise needs a block-diagonal 4-D additive mask: batch x width x width
values built on the host every micro-batch (64 MiB fp32 for 16 rows of 1,024), copied to the GPU, and it sends
SDPA to a kernel that reads it. Here a batch instead carries the boundaries of its examples in the flattened batch
(`cu_seq_lens_q`, as flash attention's varlen kernels take them), and attention runs on PyTorch's own flash varlen
kernel (`torch.nn.attention.varlen`). Padded batches take the same path: a row's padding is one more sequence,
whose outputs no loss reads. Used on CUDA when this torch has the kernel and it agrees with SDPA on this device
(`choose`); otherwise attention stays SDPA with masks.

On a CPU in bf16 or fp16, SDPA runs in fp32 (`SDPA_FP32`): PyTorch's CPU flash attention computes its backward in
half precision at about 0.6x the speed of fp32 (15 against 9-10 ms per SmolLM2 layer for 4 x 112 tokens, on an
AMD EPYC with AVX512-BF16), and the casts of query, key and value cost little next to it. Only the output is rounded
to the model's dtype.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

VARLEN = "lft_varlen"  # the attention implementations' names, as transformers' `attn_implementation` takes them
SDPA_FP32 = "lft_sdpa_fp32"
SDPA = "sdpa"
# Largest difference from SDPA, relative to the largest value, that the start check accepts: bf16 kernels differ by
# about 1e-2 in gradients; attention across sequences (a wrong mask) differs by about 1.
CHECK_TOLERANCE = 0.05
ENV_ATTENTION = "LFT_ATTENTION"  # "sdpa" forces masks (benchmarks compare the two); unset: choose()


def boundaries(lengths_per_row: list[list[int]], width: int) -> tuple[torch.Tensor, int]:
    """Cumulative start offsets of every sequence in a batch flattened row after row (each row's padding after its
    examples counts as one more sequence), and the longest sequence."""
    starts, longest, at = [0], 0, 0
    for lengths in lengths_per_row:
        row_end = at + width
        for n in lengths:
            at += n
            starts.append(at)
            longest = max(longest, n)
        if at < row_end:
            longest = max(longest, row_end - at)
            at = row_end
            starts.append(at)
    return torch.tensor(starts, dtype=torch.int32), longest


@functools.cache
def _parameters(fn: Callable[..., Any]) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def _kernel_kwargs(kernel: Callable[..., Any], scale: float | None, head_dim: int) -> dict[str, Any]:
    """torch 2.10 took `is_causal`, later versions a window ((-1, 0) is causal); a version without `scale` has the
    default 1/sqrt(head_dim) only."""
    params = _parameters(kernel)
    kw: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None and abs(scale - head_dim**-0.5) > 1e-6 * scale:
        raise RuntimeError(f"this torch's varlen attention has no scale argument; the model scales by {scale}")
    return kw


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, longest: int,
                  scale: float | None) -> torch.Tensor:  # fmt: skip
    """(tokens, heads, head_dim) each, key and value with the model's key/value heads."""
    from torch.nn.attention.varlen import varlen_attn

    kw = _kernel_kwargs(varlen_attn, scale, q.shape[-1])
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        if "enable_gqa" in _parameters(varlen_attn):
            kw["enable_gqa"] = True
        else:  # an older torch: copies of the key/value heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return varlen_attn(q, k, v, starts, starts, longest, longest, **kw)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' attention-function interface: query (batch, heads, seq, head_dim), key and value with the
    model's key/value heads; returns (batch, seq, heads, head_dim) as its SDPA function does."""
    starts, longest = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if starts is None or longest is None:
        raise RuntimeError(f"attention {VARLEN!r} needs the batch's sequence boundaries (batching.collate varlen=True)")
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap") or not getattr(module, "is_causal", True):
        raise RuntimeError(f"attention {VARLEN!r} is causal only, without dropout, sliding window or soft-capping")
    batch, heads, seq, _ = query.shape

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(batch * seq, t.shape[1], t.shape[-1])

    out = kernel(flat(query), flat(key), flat(value), starts, int(longest), scaling)
    return out.view(batch, seq, heads, out.shape[-1]), None


kernel: Callable[..., torch.Tensor] = _flash_varlen  # the unit tests put a reference kernel here (no CUDA on CI)


def sdpa_in_fp32(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, None]:  # fmt: skip
    """transformers' SDPA function on fp32 copies of half-precision inputs; the output in the inputs' dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():  # SDPA takes a mask in the query's dtype
        attention_mask = attention_mask.float()
    out, _ = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), None


def register(name: str) -> None:
    """Make `name` (VARLEN or SDPA_FP32) one transformers' `from_pretrained(attn_implementation=...)` accepts. VARLEN
    has no mask function, so transformers builds no attention mask for it; SDPA_FP32 has SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if name == VARLEN:
        AttentionInterface.register(VARLEN, varlen_attention)
    else:
        AttentionInterface.register(SDPA_FP32, sdpa_in_fp32)
        AttentionMaskInterface.register(SDPA_FP32, sdpa_mask)


def config_of(config: Any) -> dict[str, Any]:
    """A model's config as a dict for choose() and not_plain_attention(), the language model's `layer_types`
    included where a config computes it (Jamba, Bamba) or names it otherwise (Zamba, Falcon-H1: recurrent layers)
    instead of storing it, which to_dict() would leave out."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    out = config.to_dict()
    if (kinds := getattr(text, "layer_types", None)) is not None:
        (out.get("text_config") or out)["layer_types"] = list(kinds)
    return out


def choose(device: torch.device, dtype: torch.dtype, model_config: dict[str, Any]) -> tuple[str, str]:
    """(implementation, why): VARLEN on a GPU whose torch has the kernel and where it agrees with SDPA on a small
    case of the model's own head shape (forward and backward, two sequences), for a model whose attention is plain
    causal attention over whole sequences; SDPA_FP32 on a CPU in half precision; else SDPA."""
    if os.environ.get(ENV_ATTENTION, "") == SDPA:
        return SDPA, f"{ENV_ATTENTION}={SDPA}"
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return SDPA_FP32, "SDPA in fp32: a CPU's half-precision attention backward is slower"
    if device.type != "cuda":
        return SDPA, "varlen attention runs on CUDA only"
    if dtype not in (torch.bfloat16, torch.float16):
        return SDPA, f"varlen attention needs bf16 or fp16, not {dtype}"
    if why := not_plain_attention(model_config):
        return SDPA, f"the model's attention has {why}"
    text = model_config.get("text_config") or model_config  # a multimodal model's language model
    heads = text["num_attention_heads"]
    shape = (heads, text.get("num_key_value_heads") or heads, text.get("head_dim") or text["hidden_size"] // heads)
    try:
        error = _check_against_sdpa(device, *shape)
    except Exception as err:  # noqa: BLE001 (any failure of the kernel means: use the masks)
        return SDPA, f"varlen attention failed its check ({type(err).__name__}: {err})"
    if error > CHECK_TOLERANCE:
        return SDPA, f"varlen attention differs from SDPA by {error:.3g} on its check"
    return VARLEN, f"varlen attention agrees with SDPA (largest difference {error:.2g})"


def not_plain_attention(config: dict[str, Any]) -> str | None:
    """What in a model's config (or its language model's, `text_config`) makes its attention more than causal
    attention over each whole sequence with one head size and the usual scale (all of which transformers would
    express in a mask or in arguments varlen attention does not take), or None."""
    if (text := config.get("text_config")) and (why := not_plain_attention(text)):
        return why
    if any(config.get(k) for k in ("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob")):
        return "dropout"
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        return "a sliding window"
    if other := sorted(set(config.get("layer_types") or ()) - {"full_attention"}):
        return f"layers of kind {', '.join(other)}"
    if config.get("use_bidirectional_attention"):
        return "bidirectional layers"
    for key, why in (("attn_logit_softcapping", "soft-capped logits"), ("query_pre_attn_scalar", "its own scale"),
                     ("v_head_dim", "a value head size of its own"), ("kv_lora_rank", "compressed keys and values")):
        if config.get(key):
            return why
    return None


def _check_against_sdpa(device: torch.device, heads: int = 8, kv_heads: int = 2, dim: int = 64) -> float:
    """Largest relative difference of outputs and input gradients, bf16, sequences of 37 and 91 tokens."""
    import torch.nn.functional as F

    gen = torch.Generator(device="cpu").manual_seed(0)
    lengths = (37, 91)
    total = sum(lengths)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, torch.bfloat16).requires_grad_()

    q, k, v = rand(1, heads, total, dim), rand(1, kv_heads, total, dim), rand(1, kv_heads, total, dim)
    starts, longest = boundaries([list(lengths)], total)
    module = torch.nn.Module()
    out, _ = varlen_attention(module, q, k, v, None, None, cu_seq_lens_q=starts.to(device), max_length_q=longest)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref_parts, at = [], 0
    for n in lengths:  # in fp32, from the same bf16 inputs
        q32, k32, v32 = (t[:, :, at : at + n].float() for t in (q, k, v))
        groups = heads // kv_heads
        ref_parts.append(F.scaled_dot_product_attention(
            q32, k32.repeat_interleave(groups, 1), v32.repeat_interleave(groups, 1), is_causal=True))  # fmt: skip
        at += n
    ref = torch.cat(ref_parts, dim=2).transpose(1, 2)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        a, b = a.detach().float(), b.detach().float()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))

    return max([rel(out, ref)] + [rel(a, b) for a, b in zip(grads, ref_grads, strict=True)])
