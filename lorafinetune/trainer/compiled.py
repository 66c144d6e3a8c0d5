"""Experimental, off by default: each decoder layer under torch.compile (`LFT_COMPILE=layers`).

The H200 step profile (benchmarks/README, "second borrowing") put 0.126 s of a 0.294 s step at the 1B shape in
memory-bound elementwise kernels between the matrix multiplies: RMSNorm's fp32 round trips, SiLU x up, RoPE, residual
adds, LoRA dropout. Compiled, a layer runs those as a few fused kernels. Whether that wins (compile time, recompiles on
varying token counts, graph breaks) is for the step profile's `compiled` arm to show; the trainer turns it on by
default only if it does. Layers are compiled in place (`nn.Module.compile`): parameters, hooks and the optimizer's
references stay as they are, and the loss path (loss.py) is left alone.
"""

from __future__ import annotations

import os

import torch

from lorafinetune.trainer.errors import ConfigError

ENV_COMPILE = "LFT_COMPILE"
LAYERS = "layers"


def compile_decoder_layers(model: torch.nn.Module, zero_stage: int) -> int:
    """Compile each decoder layer of `model` if LFT_COMPILE=layers; returns how many (0 when off)."""
    wanted = os.environ.get(ENV_COMPILE, "")
    if wanted not in ("", LAYERS):
        raise ConfigError(f"{ENV_COMPILE}={wanted!r} is not valid: unset it, or set it to {LAYERS!r}")
    if wanted != LAYERS:
        return 0
    if zero_stage == 3:  # ZeRO-3 gathers each module's weights in hooks around its call, which a graph cannot hold
        raise ConfigError(f"{ENV_COMPILE}={LAYERS} does not work with deepspeed.zeroStage 3: unset it, or use "
                          "zeroStage 0, 1 or 2")  # fmt: skip
    layers = decoder_layers(model)
    for layer in layers:
        # dynamic: packed and padded batches change the token count every step; one graph serves them all
        layer.compile(dynamic=True)
    return len(layers)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's blocks (`model.layers` of Llama, Qwen, Mistral; a multimodal model's language model's), found
    through transformers' `get_decoder()` under the PEFT wrapper. ConfigError if the model has none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ConfigError(f"{ENV_COMPILE}={LAYERS}: {type(base).__name__} has no decoder layers to compile "
                          "(get_decoder().layers); unset it")  # fmt: skip
    return list(layers)
