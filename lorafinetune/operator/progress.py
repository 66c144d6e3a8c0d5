"""Progress of a running fine-tune, read from rank 0's Prometheus endpoint (the same numbers Grafana shows).

The operator polls at a bounded rate (settings.progress_interval_seconds per resource) with a short timeout, and a
missing or unreachable endpoint only means "no progress yet": it never changes the phase.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from datetime import UTC, datetime

from lorafinetune.api.status import Progress

_FIELDS = {
    "lorafinetune_global_step": "step",
    "lorafinetune_total_steps": "total_steps",
    "lorafinetune_train_loss": "train_loss",
    "lorafinetune_eval_loss": "eval_loss",
    "lorafinetune_tokens_per_second": "tokens_per_second",
    "lorafinetune_eta_seconds": "eta_seconds",
}


def parse_metrics(text: str, previous: Progress | None = None) -> Progress | None:
    """Progress from the Prometheus text format; None when the endpoint has no training series yet."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        if name in _FIELDS:
            values[_FIELDS[name]] = float(rest.split()[0])
    if "step" not in values:
        return None
    step, total = int(values.pop("step")), values.pop("total_steps", None)
    best = previous.best_eval_loss if previous else None
    if "eval_loss" in values and values["eval_loss"] > 0:
        best = values["eval_loss"] if best is None else min(best, values["eval_loss"])
    elif "eval_loss" in values:
        values.pop("eval_loss")  # gauge still at its initial 0: no evaluation yet
    return Progress(
        step=step,
        total_steps=int(total) if total else None,
        summary=f"{step}/{int(total)}" if total else str(step),
        best_eval_loss=best,
        updated_at=datetime.now(UTC),
        **{k: round(v, 6) for k, v in values.items()},
    )


def fetch(address: str, port: int, previous: Progress | None, timeout: float = 2.0) -> Progress | None:
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=timeout) as resp:
            return parse_metrics(resp.read().decode(), previous)
    except (urllib.error.URLError, OSError, ValueError):
        return None
