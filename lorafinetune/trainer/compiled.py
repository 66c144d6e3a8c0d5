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


def compile_decoder_layers(model: torch.nn.Module) -> int:
    """Compile each decoder layer of `model` if LFT_COMPILE=layers; returns how many (0 when off)."""
    wanted = os.environ.get(ENV_COMPILE, "")
    if wanted not in ("", LAYERS):
        raise ConfigError(f"{ENV_COMPILE}={wanted!r} is not valid: unset it, or set it to {LAYERS!r}")
    if wanted != LAYERS:
        return 0
    layers = decoder_layers(model)
    for layer in layers:
        # dynamic: packed and padded batches change the token count every step; one graph serves them all
        layer.compile(dynamic=True)
    return len(layers)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's repeated blocks: its longest ModuleList whose entries are all of one class (Llama's, Qwen's and
    Mistral's `model.layers`); none if it has no such list."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = list(module)
    return best
