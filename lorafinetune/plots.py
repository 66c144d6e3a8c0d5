"""Loss curves as a PNG, for people without Grafana (drawn from a run's history of steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_loss_curves(history: list[dict[str, Any]], path: Path, title: str) -> Path:
    """history: [{"step", "trainLoss"?, "evalLoss"?}, ...] -> PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")  # no display in pods or CI
    import matplotlib.pyplot as plt

    train = [(h["step"], h["trainLoss"]) for h in history if h.get("trainLoss") is not None]
    evals = [(h["step"], h["evalLoss"]) for h in history if h.get("evalLoss") is not None]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="#4C72B0", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="#DD8452", marker="o", linewidth=1.8)
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
