"""Compiled decoder layers (LFT_COMPILE=layers, experimental): which modules are compiled, clear errors where it
cannot run, and the same loss and LoRA gradients as the eager layers, from whole-layer graphs."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafinetune.api.spec import LoRASpec
from lorafinetune.trainer import compiled
from lorafinetune.trainer.errors import ConfigError
from lorafinetune.trainer.lora_linear import fuse_lora_linears
from lorafinetune.trainer.model import wrap_with_lora


def _lora_model(tiny_model, checkpointing: bool = False, fused: bool = False):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    model = wrap_with_lora(base, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]), checkpointing)
    if fused:  # the trainer's LoRA forward (lora_linear.py), as a CPU run has it
        assert fuse_lora_linears(model, keep_dropped=False) > 0
    return model.train()  # gradient checkpointing acts only in training mode (no dropout to tell the modes apart)


def test_off_unless_asked_and_clear_errors_where_it_cannot_run(tiny_model, monkeypatch):
    model = _lora_model(tiny_model)
    monkeypatch.delenv(compiled.ENV_COMPILE, raising=False)
    assert compiled.compile_decoder_layers(model, 2) == 0
    monkeypatch.setenv(compiled.ENV_COMPILE, "everything")
    with pytest.raises(ConfigError, match="LFT_COMPILE='everything' is not valid: unset it, or set it to 'layers'"):
        compiled.compile_decoder_layers(model, 2)
    monkeypatch.setenv(compiled.ENV_COMPILE, compiled.LAYERS)
    with pytest.raises(ConfigError, match="does not work with deepspeed.zeroStage 3"):
        compiled.compile_decoder_layers(model, 3)
    with pytest.raises(ConfigError, match="Linear has no decoder layers to compile"):
        compiled.decoder_layers(torch.nn.Linear(2, 2))
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())


@pytest.mark.parametrize("checkpointing_and_fused", [False, True], ids=["plain", "checkpointing-and-fused-lora"])
def test_compiled_layers_give_the_eager_loss_and_lora_gradients(tiny_model, monkeypatch, checkpointing_and_fused):
    """Beside the plain layers: with gradient checkpointing (the layer's forward runs inside a non-reentrant
    checkpoint, traced into the graph) and the fused LoRA layers' autograd function in the graph, as a GPU run with
    gradientCheckpointing has them (one case: each compilation costs half a minute here)."""
    eager, fast = (_lora_model(tiny_model, checkpointing_and_fused, checkpointing_and_fused) for _ in range(2))
    monkeypatch.setenv(compiled.ENV_COMPILE, compiled.LAYERS)
    layers = compiled.decoder_layers(fast)
    assert layers == list(fast.get_base_model().model.layers)
    assert compiled.compile_decoder_layers(fast, 2) == fast.config.num_hidden_layers
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert fast.get_base_model().lm_head._compiled_call_impl is None, "only the decoder layers"
    assert all(layer.training and layer.gradient_checkpointing == checkpointing_and_fused for layer in layers)

    ids = torch.randint(0, fast.config.vocab_size, (2, 24))
    counters = torch._dynamo.utils.counters
    torch._dynamo.reset()  # a graph cached by an earlier test would not count again
    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    grads = []
    for model in (eager, fast):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert counters["stats"]["unique_graphs"] > graphs, "the layers ran as compiled graphs"
    assert sum(counters["graph_break"].values()) == breaks, f"whole layers, no graph breaks: {counters['graph_break']}"
    (loss_e, grad_e), (loss_c, grad_c) = grads
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grad_e.keys() == grad_c.keys() and grad_e
    for name in grad_e:
        torch.testing.assert_close(grad_c[name], grad_e[name], rtol=1e-4, atol=1e-5, msg=name)
