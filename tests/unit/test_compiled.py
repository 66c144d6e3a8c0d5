"""Compiled decoder layers (LFT_COMPILE=layers, experimental): which modules are compiled, a clear error for a bad
value, and the same loss and LoRA gradients as the eager layers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lorafinetune.api.spec import LoRASpec
from lorafinetune.trainer import compiled
from lorafinetune.trainer.errors import ConfigError
from lorafinetune.trainer.model import wrap_with_lora


def _lora_model(tiny_model):
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    return wrap_with_lora(base, LoRASpec(r=4, alpha=8, dropout=0.0, target_modules=["all-linear"]), False)


def test_off_unless_asked_and_a_bad_value_names_the_variable(tiny_model, monkeypatch):
    model = _lora_model(tiny_model)
    monkeypatch.delenv(compiled.ENV_COMPILE, raising=False)
    assert compiled.compile_decoder_layers(model) == 0
    monkeypatch.setenv(compiled.ENV_COMPILE, "everything")
    with pytest.raises(ConfigError, match="LFT_COMPILE='everything' is not valid: unset it, or set it to 'layers'"):
        compiled.compile_decoder_layers(model)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in model.modules())


def test_compiled_layers_give_the_eager_loss_and_lora_gradients(tiny_model, monkeypatch):
    eager, fast = _lora_model(tiny_model), _lora_model(tiny_model)
    monkeypatch.setenv(compiled.ENV_COMPILE, compiled.LAYERS)
    layers = compiled.decoder_layers(fast)
    assert compiled.compile_decoder_layers(fast) == fast.config.num_hidden_layers == len(layers)
    assert all(layer._compiled_call_impl is not None for layer in layers)
    assert fast.get_base_model().lm_head._compiled_call_impl is None, "only the decoder layers"

    ids = torch.randint(0, fast.config.vocab_size, (2, 24))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    grads = []
    for model in (eager, fast):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, "the layers ran as compiled graphs"
    (loss_e, grad_e), (loss_c, grad_c) = grads
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    assert grad_e.keys() == grad_c.keys() and grad_e
    for name in grad_e:
        torch.testing.assert_close(grad_c[name], grad_e[name], rtol=1e-4, atol=1e-5, msg=name)
