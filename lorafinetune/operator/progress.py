"""Progress of a running fine-tune, read from rank 0's Prometheus endpoint (the same numbers Grafana shows).

The operator reads it every settings.progress_interval_seconds while the fine-tune runs, and a missing, unreachable,
slow, oversized or malformed endpoint only means "no progress yet": it never changes the phase. The endpoint is served
from inside a tenant's pod, so the whole exchange is bounded in seconds and bytes, not just each socket read, and it
runs on the Poller's own threads: a reconcile never waits on a trainer.
"""

from __future__ import annotations

import heapq
import itertools
import math
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
MAX_BACKOFF = 4  # an endpoint that keeps bringing nothing is read every 4 intervals at most (1 minute by default)


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


class Poller:
    """Reads the progress of the running fine-tunes it is told to `follow`, every `interval` seconds each (less often
    while an endpoint brings nothing), on threads of its own, until told to `drop` them. It keeps its own clock: a
    running fine-tune needs no reconcile to have its progress read, only one when a read brought something
    (`on_fresh(key)`, then `take`). An endpoint that hangs (a partitioned node, a policy dropping packets) holds one
    thread for up to the fetch's timeout, never a reconcile worker: with hundreds of runs it is their progress that
    gets staler, not every other fine-tune's reconcile."""

    def __init__(self, threads: int, interval: float, port: int, on_fresh: Callable[[str], None],
                 fetch: Callable[[str, int, Progress | None], Progress | None] = fetch) -> None:  # fmt: skip
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lft-progress")
        self._interval, self._port, self._on_fresh, self._fetch = interval, port, on_fresh, fetch
        self._guard = threading.Condition()
        self._followed: dict[str, _Target] = {}
        self._due: list[tuple[float, int, str]] = []  # (when, the target's serial, key): a heap
        self._serial = itertools.count()
        self._fresh: dict[str, Progress] = {}
        self._clock: threading.Thread | None = None

    def take(self, key: str) -> Progress | None:
        """The newest progress read for `key` and not taken yet."""
        with self._guard:
            return self._fresh.pop(key, None)

    def follow(self, key: str, address: str, previous: Progress | None) -> None:
        """Read `key`'s progress at `address` now and every `interval` after; a new address (a new attempt's pod)
        is read from the next turn. `previous`: the progress the status holds (the best eval loss carries on)."""
        with self._guard:
            if (target := self._followed.get(key)) is not None:
                target.address = address
                return
            target = self._followed[key] = _Target(address, previous, next(self._serial))
            heapq.heappush(self._due, (time.monotonic(), target.serial, key))
            if self._clock is None:
                self._clock = threading.Thread(target=self._run, name="lft-progress-clock", daemon=True)
                self._clock.start()
            self._guard.notify()

    def drop(self, key: str) -> None:
        """No more reads of `key` (the run stopped running, or is gone); a read under way is discarded."""
        with self._guard:
            self._followed.pop(key, None)
            self._fresh.pop(key, None)

    def _run(self) -> None:
        while True:
            with self._guard:
                while not self._due or self._due[0][0] > time.monotonic():
                    self._guard.wait(self._due[0][0] - time.monotonic() if self._due else None)
                _, serial, key = heapq.heappop(self._due)
                target = self._followed.get(key)
                if target is None or target.serial != serial:  # dropped (and maybe followed again since)
                    continue
                address, previous = target.address, target.previous
            self._pool.submit(self._read, key, serial, address, previous)

    def _read(self, key: str, serial: int, address: str, previous: Progress | None) -> None:
        started, fresh = time.monotonic(), None
        try:
            fresh = self._fetch(address, self._port, previous)
        finally:
            with self._guard:  # the next read of this key is due an interval after this one began, never sooner
                target = self._followed.get(key)
                current = target is not None and target.serial == serial
                if current:
                    assert target is not None
                    # An endpoint with nothing to say yet (a trainer still loading its model, a node that drops
                    # packets) is asked less and less often, up to every MAX_BACKOFF intervals.
                    target.misses = 0 if fresh is not None else target.misses + 1
                    wait = self._interval * min(2 ** max(target.misses - 1, 0), MAX_BACKOFF)
                    heapq.heappush(self._due, (started + wait, serial, key))
                    self._guard.notify()
                    if fresh is not None:
                        target.previous = self._fresh[key] = fresh
        if fresh is not None and current:
            self._on_fresh(key)


@dataclass
class _Target:
    address: str
    previous: Progress | None
    serial: int  # a key dropped and followed again is a new target: the old one's reads and turns are discarded
    misses: int = 0  # reads in a row that brought nothing
