"""The memory plan (lorafinetune/plan.py), its command, and the operator's fit check (operator/fit.py)."""

from __future__ import annotations

import json

import pytest

from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.cli import main as cli
from lorafinetune.operator import fit
from lorafinetune.plan import GIB, PlanError, Shape, estimate, parse_memory
from tests.manifests import manifest

SMOLLM2_135M = {
    "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "tie_word_embeddings": True,
}  # fmt: skip
LLAMA_8B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}  # fmt: skip

LLAMA_70B = {
    "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}  # fmt: skip


# A run on one GPU whose model the `hub` fixture below serves; the expected sizes and suggestions follow from it.
ONE_GPU_RUN = {
    "model": {"uri": "hf://org/model"},
    "dataset": {"train": "file:///data/train.jsonl", "maxSeqLength": 1024},
    "training": {"maxSteps": 10, "microBatchSize": 4},
    "resources": {"nodes": 1, "gpusPerNode": 1},
    "output": {"uri": "file:///out"},
}


def spec(**override) -> LoRAFineTuneSpec:
    return LoRAFineTuneSpec.model_validate(manifest("plan", ONE_GPU_RUN, **override)["spec"])


def test_parameter_counts_are_those_the_trainer_reports_for_smollm2():
    # `lorafinetune run` on the quick start reports "trainable params 4,884,480 of 139,399,488" (README)
    plan = estimate(spec(lora={"r": 16}), SMOLLM2_135M)
    assert plan.base_parameters == 139_399_488 - 4_884_480
    assert plan.trainable_parameters == 4_884_480


def test_llama_3_8b_has_its_published_size():
    assert 8.0e9 < Shape.from_config(LLAMA_8B).base_parameters < 8.1e9  # "8.03 B"


def test_a_config_without_the_shape_is_refused_naming_what_is_missing():
    with pytest.raises(PlanError, match="no hidden_size, intermediate_size.*Llama-style"):
        estimate(spec(), {"model_type": "gpt2", "n_embd": 768, "num_hidden_layers": 12,
                          "num_attention_heads": 12, "vocab_size": 50257})  # fmt: skip


def test_activations_scale_with_tokens_and_checkpointing_keeps_only_layer_inputs():
    def acts(**override):
        return next(i.bytes for i in estimate(spec(**override), LLAMA_8B).items if i.what.startswith("activations"))

    base = acts()
    assert acts(training={"microBatchSize": 8}) == 2 * base
    assert acts(dataset={"maxSeqLength": 2048}) == 2 * base
    assert acts(training={"gradientCheckpointing": True}) < base / 10
    assert acts(lora={"dropout": 0.0}) < base  # no dropped-out copies of the inputs


def test_lora_dropout_is_counted_as_the_layers_that_run_keep_it():
    """Per token per layer, SmolLM2's 7 adapted layers read 6 x 576 + 1,536 input elements, in fp32 here. On a CPU
    the fused layers keep a bool mask per element and share the inputs themselves; PEFT's layers (ZeRO-3) keep a
    dropped-out copy and an fp32 mask; on a GPU the fused layers keep a copy and a bool mask."""
    def acts(gpus: int = 0, dropout: float = 0.05, stage: int = 2) -> int:
        plan = estimate(spec(training={"precision": "fp32"}, lora={"r": 16, "dropout": dropout},
                             resources={"nodes": 1, "gpusPerNode": gpus}, deepspeed={"zeroStage": stage}),
                        SMOLLM2_135M)  # fmt: skip
        per_token_per_layer, rest = divmod(next(i.bytes for i in plan.items if i.what.startswith("activations")),
                                           4 * 1024 * 30)  # fmt: skip
        assert rest == 0
        return per_token_per_layer

    inputs = 6 * 576 + 1536
    inputs_kept = 2 * 576 + 1536  # attention input, MLP input, MLP product (o_proj's input is SDPA's, kept anyway)
    fused_cpu = acts()
    assert acts(dropout=0.0) == fused_cpu - inputs  # no masks
    assert acts(stage=3) == fused_cpu - inputs + 8 * inputs - 4 * inputs_kept  # PEFT's: an fp32 mask and a copy
    assert acts(gpus=1) == fused_cpu - inputs + 5 * inputs - 4 * inputs_kept  # a bool mask and a copy


def test_a_cpu_in_bf16_keeps_attentions_fp32_copies():
    """On a CPU in bf16, SDPA computes in fp32 (trainer/attention.py): q, k, v and the output kept in 4 bytes, and
    o_proj's LoRA keeps its own bf16 input, no longer SDPA's output."""
    def acts(precision: str) -> int:
        plan = estimate(spec(training={"precision": precision}, lora={"r": 16, "dropout": 0.05},
                             resources={"nodes": 1, "gpusPerNode": 0}), SMOLLM2_135M)  # fmt: skip
        return next(i.bytes for i in plan.items if i.what.startswith("activations")) // (4 * 1024 * 30)

    h, i_, r, q = 576, 1536, 16, 9 * 64  # q: heads x head size, as each of q, k and v (repeated) and the output
    halved = 3 * i_ + 7 * r + (2 * h + i_)  # MLP, lora_A outputs, the inputs the fused layers keep: 2 bytes less
    assert acts("fp32") - acts("bf16") == 2 * halved - 2 * q  # attention not halved; o_proj's input added


def test_auto_precision_is_planned_as_bf16_on_gpus_and_as_fp32_on_cpus():
    """fp32, the larger of what a CPU may train in, unless the caller resolved auto for the CPU first (the command
    below does, for a local run, as the trainer will)."""
    def planned(gpus: int, precision: str) -> tuple[str, int]:
        plan = estimate(spec(training={"precision": precision}, resources={"nodes": 1, "gpusPerNode": gpus}),
                        SMOLLM2_135M)  # fmt: skip
        return plan.precision, plan.total

    assert planned(1, "auto") == planned(1, "bf16") and planned(1, "auto")[0] == "bf16"
    assert planned(0, "auto") == planned(0, "fp32") and planned(0, "auto")[0] == "fp32"
    assert planned(0, "bf16")[1] < planned(0, "auto")[1]


def test_zero3_shards_the_frozen_weights_over_the_ranks():
    def weights(**override):
        return estimate(spec(**override), LLAMA_8B).items[0].bytes

    assert weights() == Shape.from_config(LLAMA_8B).base_parameters * 2  # bf16, whole on every GPU
    sharded = [weights(resources={"nodes": n, "gpusPerNode": 8}, deepspeed={"zeroStage": 3}) for n in (1, 4)]
    assert sharded[1] < sharded[0] < weights() / 3  # a 1/ranks shard, plus the gathered layers


def test_the_logits_are_bounded_by_one_chunk_whatever_the_batch():
    def logits(**override):
        items = estimate(spec(**override), LLAMA_8B).items
        return next(i.bytes for i in items if i.what.startswith(("fused loss", "logits")))

    # Fused: one chunk of up to 2^26 fp32 logits (523 rows of 128,256), plus the bf16 output while it is copied.
    assert logits(training={"microBatchSize": 16}) == logits(training={"microBatchSize": 64}) == 523 * 128256 * (4 + 2)
    # An adapted output layer goes through the module path, which keeps a chunk's logits and their gradients.
    adapted = {"targetModules": ["q_proj", "lm_head"]}
    assert logits(training={"microBatchSize": 16}, lora=adapted) == logits(training={"microBatchSize": 64},
                                                                           lora=adapted) < 1.1 * GIB  # fmt: skip


def test_a_run_that_does_not_fit_gets_the_changes_that_would_make_it():
    plan = estimate(spec(training={"microBatchSize": 16}), LLAMA_8B, capacity=80 * GIB)
    assert plan.fits is False and plan.suggestions
    assert plan.suggestions[0].startswith("training.gradientCheckpointing: true (")
    assert "try: training.gradientCheckpointing: true" in plan.summary()
    # Every suggestion's own estimate fits.
    assert all(float(s.rsplit("(", 1)[1].split(" GiB")[0]) <= 80 for s in plan.suggestions)
    # Nothing fits a 1 GiB GPU: no suggestion, and the summary says what is needed.
    tiny = estimate(spec(), LLAMA_8B, capacity=1 * GIB)
    assert tiny.fits is False and not tiny.suggestions and "needs" in tiny.summary()


def test_when_no_single_change_is_enough_the_shortest_combination_is_suggested():
    plan = estimate(spec(resources={"nodes": 2, "gpusPerNode": 8}, training={"microBatchSize": 16},
                         dataset={"maxSeqLength": 4096}), LLAMA_8B, capacity=24 * GIB)  # fmt: skip
    assert plan.fits is False
    assert plan.suggestions[0].startswith("training.gradientCheckpointing: true and deepspeed.zeroStage: 3"), plan


def test_a_later_step_of_a_combination_keeps_the_zero3_an_earlier_one_chose():
    # offloadOptimizer needs ZeRO >= 1; applied after "zeroStage: 3" it once set the stage back to 1, so the plan
    # asked for a second node where ZeRO-3 on this one fits
    plan = estimate(spec(resources={"nodes": 1, "gpusPerNode": 8}, training={"microBatchSize": 8}),
                    LLAMA_70B, capacity=40 * GIB)  # fmt: skip
    assert plan.fits is False and len(plan.suggestions) == 1
    assert "deepspeed.zeroStage: 3" in plan.suggestions[0] and "resources.nodes" not in plan.suggestions[0], plan


def test_quantized_base_weights_take_about_half_a_byte_nf4_or_one_byte_int8_per_linear_weight():
    def weights(quantization=None):
        model = {"quantization": quantization} if quantization else {}
        items = estimate(spec(model=model), LLAMA_8B).items
        return next(i.bytes for i in items if i.what.startswith("base weights")), items

    full, _ = weights()
    nf4, items = weights("nf4")
    int8, _ = weights("int8")
    linear = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # 6.98 B weights in 4 or 8 bits
    rest = 2 * 128256 * 4096 + 65 * 4096  # embeddings, output layer and norms stay in bfloat16
    assert full == 2 * (linear + rest)
    assert nf4 == pytest.approx(0.516 * linear + 2 * rest, rel=1e-3)
    assert int8 == pytest.approx(linear + 2 * rest, rel=1e-3)
    assert any(i.what.startswith("dequantized weight") and i.bytes == 2 * 4096 * 14336 for i in items)


def test_a_model_too_big_for_one_gpu_in_16_bit_is_told_to_quantize():
    plan = estimate(spec(training={"microBatchSize": 1}), LLAMA_8B, capacity=12 * GIB)
    assert plan.fits is False
    # nf4 with the changes that keep the run's numbers, before asking for more nodes
    assert list(plan.suggestions) == ["model.quantization: nf4 (QLoRA) and training.gradientCheckpointing: true "
                                      "(8.0 GiB)"]  # fmt: skip
    quantized = spec(training={"microBatchSize": 1, "gradientCheckpointing": True}, model={"quantization": "nf4"})
    assert estimate(quantized, LLAMA_8B, 12 * GIB).fits


def test_a_quantized_run_is_never_told_to_use_zero3():
    big = spec(model={"quantization": "nf4"}, resources={"nodes": 1, "gpusPerNode": 8},
               training={"microBatchSize": 64}, dataset={"maxSeqLength": 4096})  # fmt: skip
    plan = estimate(big, LLAMA_8B, 20 * GIB)
    assert plan.fits is False and plan.suggestions
    assert not any("zeroStage: 3" in s for s in plan.suggestions), plan.suggestions


@pytest.mark.parametrize("value, expected", [("80Gi", 80 * GIB), ("80GiB", 80 * GIB), ("81559Mi", 81559 * 1024**2),
                                             ("1.5Ti", int(1.5 * 1024**4)), ("80G", 80 * 10**9)])  # fmt: skip
def test_memory_sizes(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["", "80", "eighty", "80Xi", "-1Gi", "0Gi"])
def test_bad_memory_sizes_are_refused_naming_the_field(value):
    with pytest.raises(PlanError, match=r"resources.gpuMemory .*expected a size such as 80Gi"):
        parse_memory(value, "resources.gpuMemory")


# ------------------------------------------------------------------------------------------------ the operator's check
def node(name: str, gpus: int, memory_mib: str | None, **labels: str) -> dict:
    if memory_mib is not None:
        labels["nvidia.com/gpu.memory"] = memory_mib
    return {"metadata": {"name": name, "labels": labels}, "status": {"allocatable": {"nvidia.com/gpu": str(gpus)}}}


HUB = "https://huggingface.co"


@pytest.fixture
def hub(monkeypatch):
    """The operator's config cache, filled as if the Hub had answered."""
    monkeypatch.setattr(fit, "_configs", {("org/model", "main"): (0.0, LLAMA_8B)})


def test_the_largest_labelled_gpu_that_the_node_selector_allows_decides(hub):
    big = spec(training={"microBatchSize": 16})
    nodes = [node("small", 8, "24576"), node("cpu", 0, None), node("large", 8, "81559", pool="a100")]
    reason, message = fit.wont_fit(big, nodes[:2], HUB)
    assert reason == "WontFit" and "node small (nvidia.com/gpu.memory=24576 MiB) gives 24.0 GiB" in message
    assert "create it again with training.gradientCheckpointing: true" in message
    assert fit.wont_fit(spec(), nodes, HUB) is None  # micro-batch 4 fits the 80 GB node
    pinned = spec(resources={"nodeSelector": {"pool": "h100"}}, training={"microBatchSize": 16})
    assert fit.wont_fit(pinned, nodes, HUB) is None  # no node matches: nothing to compare with, no verdict


def test_resources_gpu_memory_overrides_the_labels(hub):
    big = {"training": {"microBatchSize": 16}}
    assert fit.wont_fit(spec(**big), [node("small", 8, "24576")], HUB)[0] == "WontFit"
    assert fit.wont_fit(spec(resources={"gpuMemory": "200Gi"}, **big), [node("small", 8, "24576")], HUB) is None
    small = spec(resources={"gpuMemory": "16Gi"})
    assert "resources.gpuMemory gives 16.0 GiB" in fit.wont_fit(small, [node("large", 8, "81559")], HUB)[1]


def test_no_check_without_a_label_a_readable_config_gpus_or_a_hub(hub):
    assert fit.wont_fit(spec(training={"microBatchSize": 64}), [node("large", 8, "1024")], "") is None  # turned off
    assert fit.wont_fit(spec(training={"microBatchSize": 64}), [node("unlabelled", 8, None)], HUB) is None
    assert fit.wont_fit(spec(resources={"gpusPerNode": 0}), [node("large", 8, "1024")], HUB) is None
    other = spec(model={"uri": "pvc://models/llama"}, training={"microBatchSize": 64})
    assert fit.wont_fit(other, [node("large", 8, "1024")], HUB) is None  # the operator reads no PVC


def test_an_unreachable_hub_means_no_check_and_is_not_asked_on_every_reconcile(monkeypatch):
    monkeypatch.setattr(fit, "_configs", {})
    huge = spec(training={"microBatchSize": 64})
    assert fit.wont_fit(huge, [node("large", 8, "1024")], "http://127.0.0.1:9") is None  # the discard port
    assert fit._configs[("org/model", "main")][1] is None  # remembered as unreadable, retried after a while


# ------------------------------------------------------------------------------------------------ the command
def write(tmp_path, lft: dict, config: dict):
    import yaml

    (tmp_path / "m.yaml").write_text(yaml.safe_dump(lft))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path / "m.yaml"), str(tmp_path / "config.json")


def test_plan_command_prints_the_breakdown_and_exits_1_when_it_does_not_fit(tmp_path, capsys):
    path, config = write(tmp_path, manifest("big", ONE_GPU_RUN, training={"microBatchSize": 16}), LLAMA_8B)
    assert cli(["plan", path, "--model-config", config, "--gpu-memory", "80Gi"]) == 1
    out = capsys.readouterr().out
    assert "base weights (bfloat16, 8.03 B parameters)" in out and "DOES NOT FIT" in out
    assert "would fit: training.gradientCheckpointing: true" in out
    assert cli(["plan", path, "--model-config", config, "--gpu-memory", "200Gi"]) == 0
    assert "fits:" in capsys.readouterr().out
    assert cli(["plan", path, "--model-config", config]) == 0
    assert "no verdict: pass --gpu-memory" in capsys.readouterr().out
    assert cli(["plan", path, "--model-config", config, "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots': expected a size such as 80Gi" in capsys.readouterr().err


def test_plan_command_resolves_auto_precision_for_this_cpu_as_a_local_run_would(tmp_path, capsys):
    from lorafinetune.trainer.model import cpu_native_bf16

    native = "bf16" if cpu_native_bf16() else "fp32"
    cpu_run = {**ONE_GPU_RUN, "resources": {"nodes": 1, "gpusPerNode": 0, "processesPerNode": 1}}
    path, config = write(tmp_path, manifest("local", cpu_run), SMOLLM2_135M)
    assert cli(["plan", path, "--model-config", config]) == 0
    out = capsys.readouterr().out
    assert f"ZeRO-2, {native} (training.precision auto, on this CPU)" in out
    assert f"base weights ({'bfloat16' if native == 'bf16' else 'float32'}, " in out


def test_a_cpu_plan_counts_the_heap_holes_left_by_activations_under_the_mmap_threshold():
    """glibc keeps freed buffers under the trainer's mmap threshold (4 MiB) in its heap, which then holds about one
    more step's worth of them; larger ones are mmap'ed and given back. A GPU has no such term."""
    def items(micro: int, length: int, gpus: int = 0) -> dict[str, int]:
        plan = estimate(spec(training={"precision": "fp32", "microBatchSize": micro}, lora={"r": 16, "dropout": 0.05},
                             dataset={"maxSeqLength": length}, resources={"nodes": 1, "gpusPerNode": gpus}),
                        SMOLLM2_135M)  # fmt: skip
        return {i.what.split(" (")[0]: i.bytes for i in plan.items}

    short = items(1, 256)  # the largest saved tensor, 256 x 1,536 fp32, is 1.5 MiB: all of them in the heap
    assert short["heap holes"] == short["activations"]
    long = items(4, 512)  # 2,048 x 576 fp32 is 4.5 MiB: only the bool masks and the rank-16 outputs stay there
    per_token_per_layer = 6 * 576 + 1536 + 7 * 16 * 4 + 9 * 4  # masks, lora_A outputs, SDPA's log-sum-exp
    assert long["heap holes"] == 4 * 512 * 30 * per_token_per_layer
    assert "heap holes" not in items(4, 512, gpus=1)
