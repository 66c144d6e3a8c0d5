"""The loss path alone: an output layer and cross-entropy over a micro-batch's target positions, forward and
backward, three ways side by side in one run.

    $(scripts/env.sh)/bin/python benchmarks/loss_path.py                       # CPU, fp32
    python3 benchmarks/loss_path.py --device cuda --out $OUT/loss_path-cuda.json  # in benchmarks/gpu_check.sh, bf16

Every arm gets the same hidden states (requiring grad, as under LoRA), frozen output weight and targets:

- `one-piece` (the baseline): the logits of every target at once, then F.cross_entropy; autograd keeps the fp32
  log-softmax for backward. HF Trainer does this over every position, targets or not.
- `chunked-recompute`: the trainer before 2026-11-28: chunks of LOSS_CHUNK_ELEMENTS logits, each chunk's output
  layer run again in backward (torch.utils.checkpoint), so that only one chunk's logits exist at a time.
- `fused`: the trainer now (lorafinetune/trainer/loss.py): the same chunks, each chunk's gradient computed in the
  forward pass, so the output layer runs once.

Reported per shape and arm: seconds per forward + backward (median over rounds; arms alternate, each round in a fresh
process) and the peak memory above the inputs (GPU: `max_memory_allocated`; CPU: the peak resident set from the
first pass on, VmHWM after resetting it, less the resident set then, with glibc's mmap threshold at 128 KiB so that
freed buffers leave it). Writes benchmarks/results/loss_path[-cuda].json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = ("one-piece", "chunked-recompute", "fused")
# name: (hidden size, vocabulary, targets on CPU, targets on a GPU)
SHAPES = {
    "smollm2-135m": (576, 49152, 4096, 16384),
    "llama-3.2-1b": (2048, 128256, 1024, 16384),
}


def one_pass(arm: str, hidden, weight, targets, chunk_elements: int):
    """One forward and backward; returns the loss."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    from lorafinetune.trainer.loss import _FusedLinearCrossEntropy

    def score(h, y):
        return F.cross_entropy(F.linear(h, weight).float(), y, reduction="sum")

    x = hidden.detach().requires_grad_()
    chunk = max(1, chunk_elements // weight.shape[0])
    if arm == "one-piece":
        loss = score(x, targets)
    elif arm == "chunked-recompute":
        loss = sum(checkpoint(score, x[s : s + chunk], targets[s : s + chunk], use_reentrant=False)
                   for s in range(0, len(targets), chunk))  # fmt: skip
    else:
        loss = _FusedLinearCrossEntropy.apply(x, weight, None, targets, chunk)
    loss.backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return loss.detach()


def worker(arm: str, shape: str, device: str, reps: int) -> dict:
    """Run in a fresh process: one warm-up pass, then `reps` timed ones."""
    import torch

    from lorafinetune.contract import LOSS_CHUNK_ELEMENTS

    hidden_size, vocab, cpu_tokens, gpu_tokens = SHAPES[shape]
    tokens = gpu_tokens if device == "cuda" else cpu_tokens
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, dtype=dtype, device=device)
    weight = torch.randn(vocab, hidden_size, dtype=dtype, device=device).div_(hidden_size**0.5)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets the peak resident set (VmHWM) to the current one
        before = _status_bytes("VmRSS")
    loss = one_pass(arm, hidden, weight, targets, LOSS_CHUNK_ELEMENTS)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        one_pass(arm, hidden, weight, targets, LOSS_CHUNK_ELEMENTS)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _status_bytes("VmHWM")
    return {"seconds": statistics.median(times), "peakAboveInputsMiB": round((peak - before) / 2**20),
            "loss": round(loss.item() / tokens, 4), "tokens": tokens}  # fmt: skip


def _status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (its peak) from /proc/self/status, in bytes."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def machine(device: str) -> str:
    import torch

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({where})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2, help="timed passes per process, after one warm-up")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/loss_path[-cuda].json")
    parser.add_argument("--worker", nargs=2, metavar=("ARM", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.device, args.reps)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    runs: dict[str, dict[str, list[dict]]] = {s: {a: [] for a in args.arms} for s in args.shapes}
    for r in range(args.rounds):
        for shape in args.shapes:
            for arm in args.arms:
                out = subprocess.run([sys.executable, __file__, "--device", args.device, "--reps", str(args.reps),
                                      "--worker", arm, shape], env=env, capture_output=True, text=True)  # fmt: skip
                if out.returncode != 0:
                    raise SystemExit(f"{shape} {arm} failed:\n{out.stderr[-3000:]}")
                runs[shape][arm].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r + 1} {shape:13s} {arm:18s} {runs[shape][arm][-1]}", flush=True)

    results = {}
    for shape, by_arm in runs.items():
        base = statistics.median(x["seconds"] for x in by_arm.get("one-piece", []) or [{"seconds": float("nan")}])
        results[shape] = {
            arm: {"secondsPerPass": round(statistics.median(x["seconds"] for x in xs), 3),
                  "vsOnePiece": round(base / statistics.median(x["seconds"] for x in xs), 2),
                  "peakAboveInputsMiB": max(x["peakAboveInputsMiB"] for x in xs),
                  "lossPerToken": xs[0]["loss"], "targets": xs[0]["tokens"]}  # fmt: skip
            for arm, xs in by_arm.items()
        }
    out = {"machine": machine(args.device), "commit": _commit(), "rounds": args.rounds, "repsPerRound": args.reps,
           "results": results, "runs": runs}  # fmt: skip
    path = args.out or REPO / "benchmarks" / "results" / f"loss_path{'-cuda' if args.device == 'cuda' else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _commit() -> str:
    found = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


if __name__ == "__main__":
    main()
