"""Progress of a running fine-tune, read from rank 0's Prometheus endpoint (the same numbers Grafana shows).

The operator polls at a bounded rate (settings.progress_interval_seconds per resource), and a missing, unreachable,
slow, oversized or malformed endpoint only means "no progress yet": it never changes the phase. The endpoint is served
from inside a tenant's pod, so the whole exchange is bounded in seconds and bytes, not just each socket read.
"""

from __future__ import annotations

import math
import socket
import time
from datetime import UTC, datetime

from lorafinetune.api.status import Progress
from lorafinetune.contract import TrainerMetricNames

_FIELDS = {
    TrainerMetricNames.GLOBAL_STEP: "step",
    TrainerMetricNames.TOTAL_STEPS: "total_steps",
    TrainerMetricNames.TRAIN_LOSS: "train_loss",
    TrainerMetricNames.EVAL_LOSS: "eval_loss",
    TrainerMetricNames.TOKENS_PER_SECOND: "tokens_per_second",
    TrainerMetricNames.ETA: "eta_seconds",
}


MAX_BYTES = 1 << 20  # a trainer's page is a few kB


def parse_metrics(text: str, previous: Progress | None = None) -> Progress | None:
    """Progress from the Prometheus text format; None when the endpoint has no training series yet. Lines that do
    not parse and values that are not finite are skipped."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(" ")
        if name not in _FIELDS or not rest.split():
            continue
        try:
            value = float(rest.split()[0])
        except ValueError:
            continue
        if math.isfinite(value):
            values[_FIELDS[name]] = value
    if values.get("step", -1) < 0:
        return None
    step, total = int(values.pop("step")), values.pop("total_steps", None)
    best = previous.best_eval_loss if previous else None
    if "eval_loss" in values and values["eval_loss"] > 0:
        best = values["eval_loss"] if best is None else min(best, values["eval_loss"])
    elif "eval_loss" in values:
        values.pop("eval_loss")  # gauge still at its initial 0: no evaluation yet
    total_steps = int(total) if total and total > 0 else None
    return Progress(
        step=step,
        total_steps=total_steps,
        summary=f"{step}/{total_steps}" if total_steps else str(step),
        best_eval_loss=best,
        updated_at=datetime.now(UTC),
        **{k: round(v, 6) for k, v in values.items()},
    )


def fetch(address: str, port: int, previous: Progress | None, timeout: float = 2.0,
          max_bytes: int = MAX_BYTES) -> Progress | None:  # fmt: skip
    """GET http://address:port/metrics within `timeout` seconds in all and `max_bytes`, else None."""
    try:
        body = _get_metrics(address, port, timeout, max_bytes)
    except OSError:
        return None
    return parse_metrics(body.decode(errors="replace"), previous) if body is not None else None


def _get_metrics(address: str, port: int, timeout: float, max_bytes: int) -> bytes | None:
    """One HTTP/1.0 GET (the server closes the connection after the body, no chunking) with a deadline on the whole
    exchange: a per-read timeout alone lets an endpoint that trickles a byte at a time hold a reconcile forever."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((address, port), timeout=timeout) as sock:
        sock.sendall(f"GET /metrics HTTP/1.0\r\nHost: {address}:{port}\r\n\r\n".encode())
        data = bytearray()
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or len(data) > max_bytes:
                return None
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, sep, body = bytes(data).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split()
    return body if sep and len(status) >= 2 and status[1] == b"200" else None
