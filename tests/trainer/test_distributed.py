"""Real multi-process training: 2 ranks over gloo on CPU, DeepSpeed ZeRO 0-3, PEFT LoRA, a tiny random Llama.

Each run goes through `lorafinetune run`, exactly as a user's would (torchrun agents, the trainer, the adapter check).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafinetune.contract import (
    CONFIG_FILE,
    ENV_CONFIG,
    ENV_LOSS_CHUNK,
    ENV_RUN_DIR,
    ENV_TERMINATION_LOG,
    ExitCode,
    read_termination,
)
from tests.conftest import REPO, free_port, run_cli, write_manifest
from tests.manifests import manifest, tiny_cpu_run
from tests.tiny_model import chat_rows, write_jsonl

pytestmark = pytest.mark.multiprocess


def train(tmp: Path, model_dir: Path, data: Path, name: str, env: dict | None = None, **spec) -> tuple:
    """Run one manifest; returns (process, output folder)."""
    out = tmp / name
    path = write_manifest(tmp / f"{name}.yaml", manifest("tiny", tiny_cpu_run(model_dir, data, out), **spec))
    proc = run_cli("run", str(path), "--quiet", env={**os.environ, **(env or {})})
    return proc, out


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def summary(out: Path) -> dict:
    return json.loads((out / "adapter" / "training_summary.json").read_text())


STAGES = {
    "zero0": {"zeroStage": 0},
    "zero1": {"zeroStage": 1},
    "zero2": {"zeroStage": 2},
    "zero3": {"zeroStage": 3},
    "zero2-offload-optimizer": {"zeroStage": 2, "offloadOptimizer": True},
    "zero3-offload-all": {"zeroStage": 3, "offloadOptimizer": True, "offloadParams": True},
    "zero2-chunked-loss": {"zeroStage": 2},
}
# Targets scored about 3 at a time, each chunk's gradient fused into its forward (trainer/loss.py), against ZeRO-3's
# logits kept whole: the same adapter.
STAGE_ENV = {"zero2-chunked-loss": {ENV_LOSS_CHUNK: str(3 * 400)}}  # the tiny vocabulary: <= 400


@pytest.fixture(scope="module")
def stage_run(tmp_path_factory, tiny_model, chat_data):
    """`stage_run(stage)` -> (process, output): each stage trains once, when first asked for, so the per-stage tests
    and the comparison share the runs and each passes alone too."""
    runs: dict[str, tuple] = {}

    def run(stage: str) -> tuple:
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(stage)
            runs[stage] = train(tmp, tiny_model, chat_data, stage, env=STAGE_ENV.get(stage), deepspeed=STAGES[stage])
        return runs[stage]

    return run


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_zero_stage_trains_and_saves_a_loadable_adapter(stage, stage_run, tiny_model):
    proc, out = stage_run(stage)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary(out)
    assert s["finalEvalLoss"] < s["initialEvalLoss"], s["history"]
    tensors = adapter_tensors(out)
    # 2 layers x 7 linear modules (q, k, v, o, gate, up, down), each with lora_A and lora_B, none empty
    assert len(tensors) == 2 * 7 * 2 and all(t.numel() > 0 for t in tensors.values())
    assert any(t.abs().sum() > 0 for n, t in tensors.items() if "lora_B" in n), "lora_B never left zero"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(out / "adapter"))


def test_zero_stages_agree_on_the_adapter(stage_run):
    outputs = {}
    for stage in STAGES:
        proc, outputs[stage] = stage_run(stage)
        assert proc.returncode == 0, f"{stage}: {proc.stdout}{proc.stderr}"
    reference = adapter_tensors(outputs["zero0"])
    for stage, out in outputs.items():
        other = adapter_tensors(out)
        for name, tensor in reference.items():
            torch.testing.assert_close(other[name], tensor, rtol=1e-4, atol=1e-5, msg=f"{stage}: {name}")


def test_finished_output_is_not_trained_again(tmp_path, tiny_model, chat_data):
    proc, out = train(tmp_path, tiny_model, chat_data, "once", training={"maxSteps": 2})
    assert proc.returncode == 0, proc.stderr
    before = (out / "adapter" / "adapter_model.safetensors").read_bytes()
    proc, _ = train(tmp_path, tiny_model, chat_data, "once", training={"maxSteps": 2})
    assert proc.returncode == 0
    assert "already holds a complete adapter of this spec" in (out / "logs" / "node-0.log").read_text()
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    # ... and reports the published adapter again (a pod lost after publishing: the retry sets status.adapter)
    (record,) = [read_termination(p) for p in (out / "logs").glob("termination-*.json")]
    assert record.reason == "Completed" and record.adapter.sha256 == summary(out)["adapter"]["sha256"]
    # Another spec on the same output: refused, and the published adapter stays as it was.
    proc, _ = train(tmp_path, tiny_model, chat_data, "once", training={"maxSteps": 3})
    assert proc.returncode == ExitCode.INVALID_CONFIG
    assert "already holds an adapter trained with a different spec (changed: training)" in proc.stderr
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == before
    # A rank other than 0 records the refusal too: when it exits first, torchrun stops rank 0, perhaps before rank 0
    # wrote anything, and without a record the launcher sees only torchrun's 1 and would retry.
    record_path = tmp_path / "rank-1-termination.json"
    env = {**os.environ, "RANK": "1", "CUDA_VISIBLE_DEVICES": "", ENV_CONFIG: str(out / CONFIG_FILE),
           ENV_RUN_DIR: str(out), ENV_TERMINATION_LOG: str(record_path)}  # fmt: skip
    rank_1 = subprocess.run([sys.executable, "-m", "lorafinetune.trainer"], env=env, cwd=REPO, timeout=120)
    assert rank_1.returncode == ExitCode.INVALID_CONFIG
    refused = read_termination(record_path)
    assert refused.exit_code == ExitCode.INVALID_CONFIG and refused.reason == "OutputHoldsAnotherAdapter"


def test_crash_and_resume_gives_the_same_adapter_as_an_uninterrupted_run(tmp_path, tiny_model, chat_data):
    spec = {"training": {"maxSteps": 6}, "checkpointing": {"everySteps": 2}, "lora": {"dropout": 0.1}}
    proc, straight = train(tmp_path, tiny_model, chat_data, "straight", **spec)
    assert proc.returncode == 0, proc.stderr

    # 1. Crash on rank 0 after step 5: checkpoint 4 is complete, step 5 is lost.
    proc, resumed = train(tmp_path, tiny_model, chat_data, "resumed", env={"LFT_FAIL_AT_STEP": "5"}, **spec)
    assert proc.returncode == ExitCode.FAILED, proc.stdout + proc.stderr
    assert not (resumed / "adapter").exists()
    ckpts = sorted(p.name for p in (resumed / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]
    # 2. Debris a crash mid-save could leave: never picked for resume.
    (resumed / "checkpoints" / "step-00000006.partial").mkdir()  # an older release's staging name
    (resumed / "checkpoints" / "step-00000006.partial-0123456789ab").mkdir()  # another attempt's
    (resumed / "checkpoints" / "step-00000008").mkdir()  # no COMPLETE.json

    proc, _ = train(tmp_path, tiny_model, chat_data, "resumed", **spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from step 4" in (resumed / "logs" / "node-0.log").read_text()
    assert not list((resumed / "checkpoints").glob("*.partial*")), "staging debris outlived the next save"
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resume"
    assert [h.get("trainLoss") for h in summary(straight)["history"]] == [
        h.get("trainLoss") for h in summary(resumed)["history"]
    ]


def test_resume_with_another_world_size_is_refused_clearly(tmp_path, tiny_model, chat_data):
    spec = {"training": {"maxSteps": 4}, "checkpointing": {"everySteps": 2}}
    proc, out = train(tmp_path, tiny_model, chat_data, "ws", env={"LFT_FAIL_AT_STEP": "3"}, **spec)
    assert proc.returncode == ExitCode.FAILED
    proc, _ = train(tmp_path, tiny_model, chat_data, "ws", resources={"processesPerNode": 1}, **spec)
    assert proc.returncode == ExitCode.INVALID_CONFIG
    assert "written by 2 processes but this run has 1" in proc.stderr
    assert (out / "checkpoints" / "step-00000002" / "COMPLETE.json").is_file(), "a refused resume must keep data"


def test_batch_8_accum_1_equals_batch_1_accum_8_on_variable_length_data(tmp_path, tiny_model, chat_data):
    common = {"training": {"maxSteps": 3, "learningRate": 0.02}, "dataset": {"maxSeqLength": 64}}
    runs = {}
    for micro, accum in ((8, 1), (1, 8)):
        training = {**common["training"], "microBatchSize": micro, "gradientAccumulationSteps": accum}
        spec = {**common, "training": training}
        proc, out = train(tmp_path, tiny_model, chat_data, f"b{micro}x{accum}", **spec)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs[(micro, accum)] = out
    a, b = adapter_tensors(runs[(8, 1)]), adapter_tensors(runs[(1, 8)])
    for name in a:
        # Equal up to fp32 summation order, which differs between CPUs' kernels (AVX2 against AVX512: 2.8e-6 at most
        # in a tensor whose largest element is 0.04); a wrong loss normalisation is off by whole updates (~lr).
        atol = 1e-4 * a[name].abs().max().item()
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=atol, msg=name)
    la = [h.get("trainLoss") for h in summary(runs[(8, 1)])["history"] if "trainLoss" in h]
    lb = [h.get("trainLoss") for h in summary(runs[(1, 8)])["history"] if "trainLoss" in h]
    assert la == pytest.approx(lb, rel=1e-4)


def test_rows_sharing_a_system_prompt_train_it_once_per_micro_batch_and_give_the_same_adapter(tmp_path, tiny_model):
    system = {"role": "system", "content": "you are alice the nurse of paris, answer in the fewest words"}
    rows = [{"messages": [system, *row["messages"]]} for row in chat_rows(64, seed=3)]
    data = write_jsonl(tmp_path / "system-prompt.jsonl", rows)
    spec = {"training": {"maxSteps": 3, "microBatchSize": 4}, "dataset": {"maxSeqLength": 96}}
    runs = {}
    for share in (True, False):
        dataset = {**spec["dataset"], "sharePrefix": share}
        proc, runs[share] = train(tmp_path, tiny_model, data, f"share-{share}", **{**spec, "dataset": dataset})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        log = (runs[share] / "logs" / "node-0.log").read_text()
        assert ("prefix sharing: on" if share else "prefix sharing: off (dataset.sharePrefix is false)") in log
    shared, separate = summary(runs[True]), summary(runs[False])
    assert shared["inputTokens"] == separate["inputTokens"]
    assert shared["computedTokens"] < 0.8 * shared["inputTokens"] < separate["computedTokens"], (shared, separate)
    a, b = adapter_tensors(runs[True]), adapter_tensors(runs[False])
    for name in a:  # without LoRA dropout the same computation, in another summation order
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-4 * b[name].abs().max().item(), msg=name)
    def eval_losses(s: dict) -> list[float]:
        return [h["evalLoss"] for h in s["history"] if "evalLoss" in h]

    assert len(eval_losses(shared)) == 3 and eval_losses(shared) == pytest.approx(eval_losses(separate), rel=1e-4)


def test_bad_data_fails_permanently_naming_file_and_line(tmp_path, tiny_model, chat_data):
    data = tmp_path / "bad.jsonl"
    lines = chat_data.read_text().splitlines()
    lines[4] = '{"messages": "not a list"}'
    data.write_text("\n".join(lines) + "\n")
    proc, out = train(tmp_path, tiny_model, data, "bad")
    assert proc.returncode == ExitCode.DATA_ERROR, proc.stdout + proc.stderr
    assert f"{data}:5: format 'chat' needs a non-empty list field 'messages'" in proc.stderr
    assert "retrying will not help" in proc.stderr
    assert not (out / "adapter").exists()


def wait_until_training(runner: subprocess.Popen, out: Path, step: int, timeout: float = 180) -> None:
    """Until the run in `out` reports `step` (progress.json), failing if it ends or stalls first."""
    deadline, reached = time.time() + timeout, 0
    while reached < step and time.time() < deadline and runner.poll() is None:
        time.sleep(0.2)
        try:
            reached = json.loads((out / "progress.json").read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    assert runner.poll() is None and reached >= step, "the run did not start training"


# Steps of the runs the tests interrupt (150 take ~6 s at full speed; the signal comes after step 2 or 3).
LONG_RUN = 300


def _sigint_as_in_a_terminal() -> None:
    """A shell that starts a job in the background sets SIGINT to ignored, and the child inherits it (then Python
    installs no KeyboardInterrupt handler): `make test` run with `&` or nohup would test an ignored Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_checkpoints_and_running_again_resumes(tmp_path, tiny_model, chat_data):
    out = tmp_path / "long"
    spec = {"training": {"maxSteps": LONG_RUN}, "checkpointing": {"everySteps": 1000},
            "evaluation": {"everySteps": 1000}}
    path = write_manifest(tmp_path / "long.yaml", manifest("tiny", tiny_cpu_run(tiny_model, chat_data, out), **spec))
    port = free_port()
    runner = subprocess.Popen(
        [sys.executable, "-m", "lorafinetune.cli", "run", str(path), "--quiet", "--metrics-port", str(port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=_sigint_as_in_a_terminal,
    )  # fmt: skip
    try:
        wait_until_training(runner, out, step=3)
        # Rank 0 serves Prometheus metrics while training.
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        values = {
            line.split()[0]: float(line.split()[1]) for line in metrics.splitlines() if line and line[0] != "#"
        }
        assert values["lorafinetune_global_step"] >= 3 and values["lorafinetune_total_steps"] == LONG_RUN
        assert values["lorafinetune_train_loss"] > 0 and values["lorafinetune_tokens_total"] > 0
        assert values["lorafinetune_world_size"] == 2
        runner.send_signal(signal.SIGINT)
        output, _ = runner.communicate(timeout=150)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == ExitCode.INTERRUPTED, output
    assert "Run the same command to resume" in output
    saved = [p for p in (out / "checkpoints").iterdir() if (p / "COMPLETE.json").is_file()]
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("-")[1]) < LONG_RUN
    stopped_at = int(saved[0].name.split("-")[1])

    proc = run_cli("run", str(path), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"resuming from step {stopped_at}" in (out / "logs" / "node-0.log").read_text()
    assert summary(out)["steps"] == LONG_RUN


def _trainer_pids(run_dir: Path) -> list[int]:
    """Live processes of a local run (torchrun agents and ranks carry its folder in their environment)."""
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if str(run_dir).encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_stopping_the_run_command_stops_its_training_with_a_checkpoint(sig, tmp_path, tiny_model, chat_data):
    """What a scheduler, `timeout` or an OOM killer does to `lorafinetune run`: SIGTERM is a Ctrl-C; after SIGKILL
    the agents still get SIGTERM (they die with their parent), so no training outlives the command."""
    out = tmp_path / "long"
    spec = {"training": {"maxSteps": LONG_RUN}, "checkpointing": {"everySteps": 1000},
            "evaluation": {"everySteps": 1000}}
    path = write_manifest(tmp_path / "long.yaml", manifest("tiny", tiny_cpu_run(tiny_model, chat_data, out), **spec))
    runner = subprocess.Popen([sys.executable, "-m", "lorafinetune.cli", "run", str(path), "--quiet"], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_until_training(runner, out, step=2)
        assert _trainer_pids(out), "no training process found"
        runner.send_signal(sig)
        output, _ = runner.communicate(timeout=150)
        deadline = time.time() + 150
        while _trainer_pids(out) and time.time() < deadline:
            time.sleep(0.5)
        assert not _trainer_pids(out), "training outlived the run command"
    finally:
        if runner.poll() is None:
            runner.kill()
        for pid in _trainer_pids(out):
            os.kill(pid, signal.SIGKILL)
    if sig == signal.SIGTERM:
        assert runner.returncode == ExitCode.INTERRUPTED, output
        assert "Run the same command to resume" in output
    saved = [p for p in (out / "checkpoints").iterdir() if (p / "COMPLETE.json").is_file()]
    assert len(saved) == 1 and 2 <= int(saved[0].name.split("-")[1]) < LONG_RUN, "no checkpoint on the way out"


def test_early_stopping_ends_the_run_when_eval_loss_stops_improving(tmp_path, tiny_model, chat_data):
    # minDelta far above any possible gain: the first evaluation after step 0 counts as "no improvement"
    spec = {"evaluation": {"everySteps": 1, "earlyStopping": {"patience": 1, "minDelta": 100.0}}}
    proc, out = train(tmp_path, tiny_model, chat_data, "early", **spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary(out)
    assert (s["steps"], s["totalSteps"]) == (1, 4)
    assert "early stopping at step 1" in (out / "logs" / "node-0.log").read_text()


def test_offline_hub_model_fails_permanently_with_a_clear_error(tmp_path, tiny_model, chat_data):
    env = {"HF_HUB_OFFLINE": "1"}
    proc, out = train(tmp_path, tiny_model, chat_data, "hub", env=env, model={"uri": "hf://HuggingFaceTB/SmolLM2-135M"})
    assert proc.returncode == ExitCode.MODEL_ERROR, proc.stdout + proc.stderr
    assert "could not load 'HuggingFaceTB/SmolLM2-135M' from the Hugging Face Hub" in proc.stderr
    assert "use pvc:// or file:// instead" in proc.stderr


def test_a_paused_run_that_wakes_after_a_newer_one_took_over_publishes_nothing(tmp_path, tiny_model, chat_data):
    """A frozen node's ranks (here: SIGSTOP) that come back after the next attempt started must not save over it."""
    out = tmp_path / "shared"
    spec = {"training": {"maxSteps": 24}, "checkpointing": {"everySteps": 4}, "evaluation": {"everySteps": 1000}}
    path = write_manifest(tmp_path / "shared.yaml", manifest("tiny", tiny_cpu_run(tiny_model, chat_data, out), **spec))
    old = subprocess.Popen([sys.executable, "-m", "lorafinetune.cli", "run", str(path), "--quiet"], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    frozen: list[int] = []
    try:
        wait_until_training(old, out, step=1)
        frozen = [old.pid, *_trainer_pids(out)]
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        new = run_cli("run", str(path), "--quiet")  # the next attempt, on the same folder
        assert new.returncode == 0, new.stdout + new.stderr
        adapter = (out / "adapter" / "adapter_model.safetensors").read_bytes()
        checkpoints = _complete_checkpoints(out)
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        output, _ = old.communicate(timeout=150)
    finally:
        for pid in frozen:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        if old.poll() is None:
            old.kill()
    assert old.returncode == ExitCode.FAILED, output
    assert "has taken over" in output
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == adapter, "the stale run overwrote it"
    assert _complete_checkpoints(out) == checkpoints, "the stale run changed the checkpoints"
    # Frozen mid-save, its ranks may finish writing shards into a .partial folder on waking: never marked complete,
    # so never resumed from, and removed by the next save.
    assert not list((out / "checkpoints").glob("*.partial*/COMPLETE.json")), "the stale run completed a checkpoint"


def _complete_checkpoints(out: Path) -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.read_text()) for p in (out / "checkpoints").glob("step-????????/COMPLETE.json"))


def test_a_failure_after_the_last_step_resumes_there_instead_of_training_again(tmp_path, tiny_model, chat_data):
    spec = {"training": {"maxSteps": 6}, "checkpointing": {"everySteps": 4}}
    # Rank 0 dies right after the last step (as when verifying or publishing the adapter fails).
    proc, out = train(tmp_path, tiny_model, chat_data, "tail", env={"LFT_FAIL_AT_STEP": "6"}, **spec)
    assert proc.returncode != 0 and not (out / "adapter").exists()
    assert (out / "checkpoints" / "step-00000006" / "COMPLETE.json").is_file(), "the last step was not checkpointed"
    proc = run_cli("run", str(tmp_path / "tail.yaml"), "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / "logs" / "node-0.log").read_text()
    assert "resuming from step 6" in log
    assert summary(out)["steps"] == 6


def test_auto_precision_trains_in_what_this_cpu_computes_natively_and_never_mixes_two_precisions(
    tmp_path, tiny_model, chat_data
):  # fmt: skip
    """training.precision auto resolves per device. Results trained in the other precision, written by hand, are
    another spec's: the checkpoint is refused and kept, then resumed once that precision is written again, and the
    adapter is not taken for this spec's. (Results auto trained in another precision on other nodes:
    tests/unit/test_fingerprint.py.)"""
    from lorafinetune.trainer.model import cpu_native_bf16

    native, other = ("bf16", "fp32") if cpu_native_bf16() else ("fp32", "bf16")
    spec = {"training": {"maxSteps": 4, "precision": other}, "checkpointing": {"everySteps": 2}}
    proc, out = train(tmp_path, tiny_model, chat_data, "precision", env={"LFT_FAIL_AT_STEP": "3"}, **spec)
    assert proc.returncode == ExitCode.FAILED, proc.stdout + proc.stderr
    marker = out / "checkpoints" / "step-00000002" / "COMPLETE.json"
    assert json.loads(marker.read_text())["precision"] == other
    before = marker.read_text()

    auto = {**spec, "training": {**spec["training"], "precision": "auto"}}
    proc, _ = train(tmp_path, tiny_model, chat_data, "precision", **auto)
    assert proc.returncode == ExitCode.INVALID_CONFIG, proc.stdout + proc.stderr
    assert f"training.precision auto: {native} on this CPU" in (out / "logs" / "node-0.log").read_text()
    assert "was made with a different spec (changed: training)" in proc.stderr
    assert marker.read_text() == before, "the checkpoint is kept as it was"

    proc, _ = train(tmp_path, tiny_model, chat_data, "precision", **spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from step 2" in (out / "logs" / "node-0.log").read_text()
    assert json.loads((out / "adapter" / "COMPLETE.json").read_text())["writtenPrecision"] == other
    proc, _ = train(tmp_path, tiny_model, chat_data, "precision", **auto)
    assert proc.returncode == ExitCode.INVALID_CONFIG, proc.stdout + proc.stderr
    assert "already holds an adapter trained with a different spec (changed: training)" in proc.stderr


def _hub_cache(root: Path, repo: str, model_dir: Path, commits: list[str], main: str) -> Path:
    """A Hugging Face cache as huggingface_hub lays it out (models--org--name/{refs,snapshots}), holding the tiny
    model at each commit, with the branch `main` naming one of them: what an earlier download leaves offline."""
    cache = root / "hub"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    for commit in commits:
        shutil.copytree(model_dir, repo_dir / "snapshots" / commit, dirs_exist_ok=True)
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(main)
    return cache


def test_a_hub_model_is_pinned_to_one_commit_for_the_whole_run_and_recorded(tmp_path, tiny_model, chat_data):
    first, pushed = "1" * 40, "2" * 40
    cache = _hub_cache(tmp_path, "test-org/tiny", tiny_model, [first, pushed], main=first)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    spec = {"model": {"uri": "hf://test-org/tiny"}, "training": {"maxSteps": 4}, "checkpointing": {"everySteps": 2}}
    proc, out = train(tmp_path, tiny_model, chat_data, "pinned", env={**env, "LFT_FAIL_AT_STEP": "3"}, **spec)
    assert proc.returncode == ExitCode.FAILED, proc.stdout + proc.stderr
    # Someone pushes to main while the run waits for its retry: the retry must still train on what it started on.
    (cache / "models--test-org--tiny" / "refs" / "main").write_text(pushed)
    proc, _ = train(tmp_path, tiny_model, chat_data, "pinned", env=env, **spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from step 2" in (out / "logs" / "node-0.log").read_text()
    assert summary(out)["baseModel"]["revision"] == first
    assert f"(commit `{first}`)" in (out / "adapter" / "README.md").read_text()
    (record,) = [json.loads(p.read_text()) for p in (out / "logs").glob("termination-*-node0.json")
                 if json.loads(p.read_text())["exitCode"] == 0]  # fmt: skip
    assert record["adapter"]["baseModelRevision"] == first, "what the operator puts in status.adapter"

    # A fresh run on the same URI takes what main names now.
    proc, fresh = train(tmp_path, tiny_model, chat_data, "fresh", env=env, **spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary(fresh)["baseModel"]["revision"] == pushed


def test_merge_adapter_writes_a_model_plain_transformers_loads_with_the_adapters_behaviour(
    tmp_path, tiny_model, chat_data, tiny_tokenizer
):  # fmt: skip
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # bf16 compute on the CPU: model.dtype auto then merges into bfloat16, as on a GPU
    spec = {"training": {"maxSteps": 3, "learningRate": 0.05, "precision": "bf16"}, "output": {"mergeAdapter": True}}
    proc, out = train(tmp_path, tiny_model, chat_data, "merged", **spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged_dir = out / "merged"
    assert (merged_dir / "model.safetensors").is_file() and (merged_dir / "tokenizer.json").is_file()
    assert summary(out)["mergedModel"] == {"uri": str(merged_dir), "dtype": "bfloat16"}
    assert summary(out)["adapter"]["mergedUri"] == str(merged_dir)
    assert json.loads((out / "adapter" / "COMPLETE.json").read_text())["mergedUri"] == str(merged_dir)
    assert str(merged_dir) in (out / "adapter" / "README.md").read_text()
    assert not (merged_dir / "README.md").exists(), "PEFT's adapter card would call the merged model an adapter"

    probe = tiny_tokenizer("the merged model answers like the adapter", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_dir)  # no PEFT
        assert merged.dtype == torch.bfloat16
        base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        plain = base(input_ids=probe).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter")(input_ids=probe).logits
        got = merged.float()(input_ids=probe).logits
    assert (adapted - plain).abs().max() > 0.05, "the adapter must change the logits for this check to mean anything"
    assert (got - adapted).abs().max() < 0.05 * adapted.abs().max(), "bf16 rounding only"


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_base_trains_an_adapter_for_the_unquantized_model(tmp_path, tiny_model, chat_data, quantization):
    """QLoRA: the frozen base loaded in 4 or 8 bits (bitsandbytes, on the CPU here), LoRA trained over it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    spec = {"model": {"quantization": quantization}, "training": {"maxSteps": 6}, "evaluation": {"everySteps": 6}}
    proc, out = train(tmp_path, tiny_model, chat_data, quantization, **spec)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary(out)
    assert s["finalEvalLoss"] < s["initialEvalLoss"], s["history"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    decoder_linears = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    assert s["quantizedLinearLayers"] == len(decoder_linears) > 0
    assert s["totalParameters"] == sum(p.numel() for p in base.parameters()) + s["trainableParameters"]
    PeftModel.from_pretrained(base, str(out / "adapter"))  # the adapter applies to the unquantized base
