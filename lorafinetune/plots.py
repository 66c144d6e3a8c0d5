"""Loss curves as a PNG, for people without Grafana: from a run's training_summary.json or from Prometheus.

    lorafinetune plot --summary runs/.../adapter/training_summary.json -o loss.png
    lorafinetune plot --prometheus http://prometheus:9090 --finetune llama --namespace team-a -o loss.png
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from lorafinetune.contract import TrainerMetricNames


def plot_loss_curves(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """history: [{"step", "trainLoss"?, "evalLoss"?}, ...] -> PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods or CI
    import matplotlib.pyplot as plt

    train = [(h["step"], h["trainLoss"]) for h in history if h.get("trainLoss") is not None]
    evals = [(h["step"], h["evalLoss"]) for h in history if h.get("evalLoss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", color="#4C72B0", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), label="eval loss", color="#DD8452", marker="o", linewidth=1.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per trained token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def history_from_summary(path: Path) -> tuple[str, list[dict[str, Any]]]:
    summary = json.loads(path.read_text())
    return summary["name"], summary["history"]


def _query_range(base: str, expr: str, since_s: float, step_s: float) -> dict[float, float]:
    now = time.time()
    params = urllib.parse.urlencode({"query": expr, "start": now - since_s, "end": now, "step": step_s})
    with urllib.request.urlopen(f"{base.rstrip('/')}/api/v1/query_range?{params}", timeout=30) as resp:
        result = json.load(resp)["data"]["result"]
    return {float(t): float(v) for series in result[:1] for t, v in series["values"]}


def history_from_prometheus(base: str, finetune: str, namespace: str | None, since_s: float = 6 * 3600,
                            step_s: float = 15) -> list[dict[str, Any]]:  # fmt: skip
    """Loss by optimizer step, from the trainer's gauges sampled over time (the last sample of each step wins)."""
    sel = f'finetune="{finetune}"' + (f', namespace="{namespace}"' if namespace else "")
    steps = _query_range(base, f"max({TrainerMetricNames.GLOBAL_STEP}{{{sel}}})", since_s, step_s)
    train = _query_range(base, f"max({TrainerMetricNames.TRAIN_LOSS}{{{sel}}})", since_s, step_s)
    evals = _query_range(base, f"max({TrainerMetricNames.EVAL_LOSS}{{{sel}}})", since_s, step_s)
    by_step: dict[int, dict[str, Any]] = {}
    for t, step in sorted(steps.items()):
        entry = by_step.setdefault(int(step), {"step": int(step)})
        if t in train:
            entry["trainLoss"] = train[t]
        if evals.get(t, 0) > 0:  # 0 until the first evaluation
            entry["evalLoss"] = evals[t]
    return [by_step[k] for k in sorted(by_step)]
