"""Which precision and thread count a CPU trains fastest in: the matrix multiplies of one SmolLM2-135M decoder layer
at the quick start's micro-batch (4 x 112 tokens), as LoRA training runs them (forward, and backward to the inputs),
timed in fp32 and bf16 with 1 and 2 threads.

    $(scripts/env.sh)/bin/python benchmarks/cpu_matmul.py [--tokens 448] [--reps 20]

bf16 is fast only where oneDNN computes it natively (AVX512 or AMX); elsewhere PyTorch emulates it. The trainer
warns at start when that is the case (trainer/model.py, `emulated_on_cpu`); this measures by how much. The
configurations alternate, repetition by repetition, so a busy machine slows them alike. Writes
benchmarks/results/cpu_matmul-<capability>.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# (out_features, in_features) of SmolLM2-135M's linear layers: q and o, k and v, gate and up, down
SHAPES = {"q_proj": (576, 576), "k_proj": (192, 576), "gate_proj": (1536, 576), "down_proj": (576, 1536)}
# how many layers of each shape a decoder block has
PER_BLOCK = {"q_proj": 2, "k_proj": 2, "gate_proj": 2, "down_proj": 1}


def block_seconds(tokens: int, dtype: torch.dtype, weights: dict[str, torch.Tensor]) -> float:
    """One block's frozen matrix multiplies: x @ W.T forward, grad @ W backward."""
    start = time.perf_counter()
    for name, count in PER_BLOCK.items():
        w = weights[name]
        x = torch.randn(tokens, w.shape[1], dtype=dtype)
        g = torch.randn(tokens, w.shape[0], dtype=dtype)
        for _ in range(count):
            x @ w.t()
            g @ w
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=448, help="tokens per micro-batch (4 x 112: the quick start's)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--note", default="", help="what else ran on the machine, kept with the result")
    args = ap.parse_args()
    flops = sum(4 * args.tokens * o * i * PER_BLOCK[n] for n, (o, i) in SHAPES.items())
    configs = [(dtype, threads) for dtype in (torch.float32, torch.bfloat16) for threads in (1, 2)]
    weights = {d: {n: torch.randn(o, i, dtype=d) for n, (o, i) in SHAPES.items()} for d, _ in configs}
    seconds: dict[tuple[torch.dtype, int], list[float]] = {c: [] for c in configs}
    for rep in range(args.reps + 1):
        for dtype, threads in configs if rep % 2 else configs[::-1]:
            torch.set_num_threads(threads)
            took = block_seconds(args.tokens, dtype, weights[dtype])
            if rep:  # the first round warms up
                seconds[(dtype, threads)].append(took)
    fp32_1 = statistics.median(seconds[(torch.float32, 1)])
    rows = []
    for (dtype, threads), s in seconds.items():
        median = statistics.median(s)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "threads": threads,
                     "blockMs": round(median * 1e3, 2), "gflops": round(flops / median / 1e9, 1),
                     "vsFp32OneThread": round(fp32_1 / median, 2)})  # fmt: skip
        print(f"{rows[-1]['dtype']:9s} {threads} thread(s): {rows[-1]['blockMs']:8.2f} ms a block, "
              f"{rows[-1]['gflops']:6.1f} GFLOP/s, {rows[-1]['vsFp32OneThread']:.2f}x fp32 on one thread")
    capability = torch.backends.cpu.get_cpu_capability()
    result = {
        "note": args.note,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"capability {capability}, oneDNN bf16 native: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}",
        "settings": {"tokens": args.tokens, "reps": args.reps, "flopsPerBlock": flops},
        "configs": rows,
    }  # fmt: skip
    out = args.out or REPO / "benchmarks" / "results" / f"cpu_matmul-{capability.lower()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
