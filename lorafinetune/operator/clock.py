"""When each fine-tune is reconciled without an event: the operator's own timer.

Live runs come back every reconcile interval, or sooner when the plan asks (a backoff expiring, a TTL due); finished
runs come back only when their TTL is due, and then never again, so a cluster full of finished runs costs nothing at
rest. A kopf timer would do the ticking but puts a finalizer on every fine-tune, which makes deleting one (or its
namespace) hang while the operator is not running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("lorafinetune.operator")


class Clock:
    """Due times by fine-tune key ("namespace/name"), and a thread that hands due keys to a small worker pool."""

    def __init__(self, workers: int = 4, resolution: float = 0.25) -> None:
        self._due: dict[str, float] = {}
        self._guard = threading.Lock()
        self._workers, self._resolution = workers, resolution
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def schedule(self, key: str, after: float | None) -> None:
        """Reconcile `key` in `after` seconds; None: not until an event says otherwise."""
        with self._guard:
            if after is None:
                self._due.pop(key, None)
            else:
                self._due[key] = time.monotonic() + max(0.0, after)

    def due(self, key: str) -> float | None:
        """Seconds until `key` is due (None: not scheduled)."""
        with self._guard:
            at = self._due.get(key)
        return None if at is None else at - time.monotonic()

    def take_due(self) -> list[str]:
        """The keys due now, unscheduled: whoever runs them schedules them again."""
        now = time.monotonic()
        with self._guard:
            keys = [key for key, at in self._due.items() if at <= now]
            for key in keys:
                del self._due[key]
        return keys

    def start(self, run: Callable[[str], None]) -> None:
        def loop() -> None:
            with ThreadPoolExecutor(self._workers, thread_name_prefix="lft-clock") as pool:
                while not self._stop.wait(self._resolution):
                    for key in self.take_due():
                        pool.submit(self._run_one, run, key)

        self._stop.clear()
        self._thread = threading.Thread(target=loop, name="lft-clock", daemon=True)
        self._thread.start()

    def _run_one(self, run: Callable[[str], None], key: str) -> None:
        try:
            run(key)
        except Exception:  # noqa: BLE001 - one fine-tune's error must not stop the clock for the others
            log.exception("%s: reconcile failed; trying again at the next tick", key)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
