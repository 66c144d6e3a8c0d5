"""What a manifest that leaves training.precision unset gets on this CPU: `auto` (the default since session 30) against
bf16 (the default before), on the quick start's manifest, model and data, through `lorafinetune run` as a user runs
it (2 ranks x 1 thread), a few optimizer steps each, fresh outputs, one arm after the other.

    $(scripts/env.sh)/bin/python benchmarks/precision_auto.py [--steps 3]

Reported per arm, from the training summary: the precision trained in, seconds of optimizer steps, non-padding
tokens/s, wall-clock seconds of the whole run (start-up and the evaluations included) and rank 0's peak resident set;
the ratio of auto to bf16. Writes benchmarks/results/precision_auto-<capability>.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("LFT_BENCH_DIR", "/tmp/lft-bench-precision"))
ARMS = {"bf16 (the default before)": "bf16", "auto (the default now)": None}


def manifest(precision: str | None, steps: int, out: Path) -> dict:
    lft = yaml.safe_load((REPO / "examples/quickstart.yaml").read_text())
    spec = lft["spec"]
    spec["training"].pop("precision")  # unset, as in a manifest that does not choose
    if precision:
        spec["training"]["precision"] = precision
    spec["training"]["maxSteps"] = steps
    spec["evaluation"] = {"everySteps": 1000}  # the first and last evaluations only
    spec["checkpointing"] = {"everySteps": 1000, "keepLast": 1}
    spec["output"]["uri"] = f"file://{out}"
    return lft


def run_arm(name: str, precision: str | None, steps: int) -> dict:
    slug = name.split()[0]
    out = WORK / f"out-{slug}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    path = WORK / f"{slug}.yaml"
    path.write_text(yaml.safe_dump(manifest(precision, steps, out)))
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lorafinetune.cli", "run", str(path), "--quiet",
                           "--pvc", f"quickstart-data={REPO / 'examples/data'}"], cwd=REPO)  # fmt: skip
    wall = time.monotonic() - start
    if done.returncode != 0:
        return {"arm": name, "failed": done.returncode, "log": str(out / "logs" / "node-0.log")}
    s = json.loads((out / "adapter" / "training_summary.json").read_text())
    log = (out / "logs" / "node-0.log").read_text().splitlines()
    return {
        "arm": name,
        "precision": s["spec"]["training"]["precision"],
        "steps": s["steps"],
        "trainSeconds": s["trainSeconds"],
        "tokensPerSecond": s["tokensPerSecond"],
        "wallSeconds": round(wall, 1),
        "peakRssMiB": s["peakRssBytes"] // 2**20,
        "said": [line for line in log if line.startswith(("warning:", "training.precision auto"))],
    }


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (info.read_text().splitlines() if info.is_file() else [])
             if line.startswith("model name")]  # fmt: skip
    return names[0] if names else platform.machine()


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per arm")
    ap.add_argument("--out", type=Path, help="result file (default: results/precision_auto-<capability>.json)")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    capability = torch.backends.cpu.get_cpu_capability()
    caps = torch.cpu.get_capabilities()
    results = [run_arm(name, precision, args.steps) for name, precision in ARMS.items()]
    for r in results:
        print(json.dumps(r), flush=True)
    before, now = results
    ratios = {}
    if "failed" not in before and "failed" not in now:
        ratios = {"tokensPerSecond": round(now["tokensPerSecond"] / before["tokensPerSecond"], 2),
                  "wallSeconds": round(before["wallSeconds"] / now["wallSeconds"], 2)}  # fmt: skip
    result = {
        "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"capability {capability}, avx512_bf16 {bool(caps.get('avx512_bf16'))}, "
                   f"amx_bf16 {bool(caps.get('amx_bf16'))}",
        "command": " ".join(["benchmarks/precision_auto.py", *sys.argv[1:]]),
        "arms": results,
        "autoVsBf16": ratios,
    }
    out = args.out or REPO / f"benchmarks/results/precision_auto-{capability.lower()}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"auto vs bf16: {ratios} -> {out}")


if __name__ == "__main__":
    main()
