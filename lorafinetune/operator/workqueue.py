"""The operator's work queue: every reconcile, whether an event or the clock asked for it, goes through here.

- A key ("namespace/name") is queued at most once, and never processed by two workers at once: a key added while it
  is being processed runs once more afterwards (the change may have come too late for the running pass).
- First in, first out within two lanes. New fine-tunes (no Job yet) take the first lane: in a burst of applies their
  Jobs are what users wait for, while the pod and Job events of the runs just started (status patches only) can
  wait a moment. That lane gets NEW_PER_OTHER turns for each turn of the other whenever both have work, so neither
  starves. A resource that changes often cannot overtake the others: it is queued once however many events it gets.
- Delayed adds are the operator's clock: live runs come back when their plan says (a backoff expiring, a pending
  bound, a progress poll, a TTL due); a key with nothing to wait for is not scheduled at all, so finished runs cost
  nothing at rest. (A kopf timer would tick instead, but puts a finalizer on every fine-tune, which makes deleting
  one hang while the operator is not running.)
- A reconcile that raises is retried after an exponential backoff per key (1 s doubling to 60 s), so a resource
  that keeps failing cannot monopolise the workers or the API server.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

log = logging.getLogger("lorafinetune.operator")
RETRY_BASE_SECONDS, RETRY_CAP_SECONDS = 1.0, 60.0
NEW_PER_OTHER = 3  # while both lanes have work: turns of the new fine-tunes' lane per turn of the other


class _Waiting(NamedTuple):
    since: float  # monotonic time first queued
    source: str  # what queued it
    new: bool  # in the new fine-tunes' lane
    ticket: int  # which lane entry is this key's: an entry with another ticket is left over from a move


class _Due(NamedTuple):
    at: float
    source: str
    new: bool


class WorkQueue:
    def __init__(self, resolution: float = 0.1,
                 on_wait: Callable[[float, str], None] | None = None) -> None:  # fmt: skip
        self._lanes: tuple[deque[tuple[int, str]], deque[tuple[int, str]]] = (deque(), deque())  # new, the rest
        self._waiting: dict[str, _Waiting] = {}  # keys in a lane
        self._tickets = itertools.count()
        self._turn = 0  # turns the new lane had in a row while the other waited
        self._processing: dict[str, bool] = {}  # keys being reconciled, and whether they were taken as new
        self._dirty: dict[str, bool] = {}  # added while processing (whether as new): run again after
        self._due: dict[str, _Due] = {}  # delayed keys
        self._failures: dict[str, int] = {}
        self._cond = threading.Condition()
        self._resolution = resolution
        self._on_wait = on_wait or (lambda seconds, lane: None)  # how long a key waited, in which lane
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ adding

    def add(self, key: str, source: str = "", new: bool = False) -> None:
        """Reconcile `key` as soon as a worker is free. `source` (what asked) is passed to the run, for metrics;
        `new`: a fine-tune with no Job yet, which takes the first lane."""
        with self._cond:
            self._add_locked(key, source, new)

    def _add_locked(self, key: str, source: str, new: bool = False) -> None:
        self._due.pop(key, None)  # running now covers a later tick; the run schedules the next one
        if key in self._processing:
            self._dirty[key] = self._dirty.get(key, False) or new
        elif (waiting := self._waiting.get(key)) is None:
            self._enter_locked(key, _Waiting(time.monotonic(), source, new, next(self._tickets)))
            self._cond.notify()
        elif new and not waiting.new:  # known new while in the other lane: move up, keeping when it was queued
            self._enter_locked(key, waiting._replace(new=True, ticket=next(self._tickets)))

    def _enter_locked(self, key: str, waiting: _Waiting) -> None:
        self._waiting[key] = waiting
        self._lanes[0 if waiting.new else 1].append((waiting.ticket, key))

    def schedule(self, key: str, after: float | None, source: str = "clock", new: bool = False) -> None:
        """Reconcile `key` in `after` seconds (replacing an earlier schedule); None: only when an event asks."""
        with self._cond:
            if after is None:
                self._due.pop(key, None)
            else:
                self._due[key] = _Due(time.monotonic() + max(0.0, after), source, new)

    def forget(self, key: str) -> None:
        """The resource is gone: drop its schedule and its failure count (a queued run finds it gone and stops)."""
        with self._cond:
            self._due.pop(key, None)
            self._failures.pop(key, None)

    def due(self, key: str) -> float | None:
        """Seconds until `key` is due (None: not scheduled)."""
        with self._cond:
            due = self._due.get(key)
        return None if due is None else due.at - time.monotonic()

    def new_waiting(self, besides: str = "") -> int:
        """New fine-tunes waiting for a worker or being reconciled as new, but `besides`: while there are any, a
        burst of applies is still being turned into Jobs."""
        with self._cond:
            waiting = sum(w.new for key, w in self._waiting.items() if key != besides)
            return waiting + sum(new for key, new in self._processing.items() if key != besides)

    def depth(self) -> int:
        """Keys waiting for a worker."""
        with self._cond:
            return len(self._waiting)

    # ------------------------------------------------------------------ running

    def start(self, workers: int, run: Callable[[str, str], None]) -> None:
        self._stop.clear()
        self._threads = [threading.Thread(target=self._work, args=(run,), name=f"lft-worker-{i}", daemon=True)
                         for i in range(workers)]  # fmt: skip
        self._threads.append(threading.Thread(target=self._tick, name="lft-clock", daemon=True))
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)

    def _tick(self) -> None:
        while not self._stop.wait(self._resolution):
            now = time.monotonic()
            with self._cond:
                for key, due in [(k, d) for k, d in self._due.items() if d.at <= now]:
                    self._add_locked(key, due.source, due.new)

    def _next(self) -> tuple[str, str] | None:
        with self._cond:
            while (key := self._take_locked()) is None:
                if self._stop.is_set():
                    return None
                self._cond.wait(0.5)
            waiting = self._waiting.pop(key)
            self._processing[key] = waiting.new
        # Outside the lock, which every add and every worker contends for in a burst
        self._on_wait(time.monotonic() - waiting.since, "new" if waiting.new else "other")
        return key, waiting.source

    def _take_locked(self) -> str | None:
        new, other = self._lanes
        for lane in (new, other):
            while lane and not self._current_locked(*lane[0]):
                lane.popleft()  # the entry a key left behind when it moved up
        if new and (not other or self._turn < NEW_PER_OTHER):
            self._turn = self._turn + 1 if other else 0
            return new.popleft()[1]
        self._turn = 0
        return other.popleft()[1] if other else None

    def _current_locked(self, ticket: int, key: str) -> bool:
        waiting = self._waiting.get(key)
        return waiting is not None and waiting.ticket == ticket

    def _work(self, run: Callable[[str, str], None]) -> None:
        while (item := self._next()) is not None:
            key, source = item
            failed = False
            try:
                run(key, source)
            except Exception:  # noqa: BLE001 - one fine-tune's error must not stop the others
                failed = True
                with self._cond:
                    failures = self._failures[key] = self._failures.get(key, 0) + 1
                delay = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2 ** (failures - 1))
                log.exception("%s: reconcile failed (%d in a row); trying again in %.0f s", key, failures, delay)
                with self._cond:  # a new fine-tune's retry keeps its place in the new lane
                    new = self._processing[key] or self._dirty.get(key, False)
                self.schedule(key, delay, "retry", new)
            else:
                with self._cond:
                    self._failures.pop(key, None)
            finally:
                with self._cond:
                    self._processing.pop(key, None)
                    if key in self._dirty:
                        new = self._dirty.pop(key)
                        if not failed:  # a failed run waits for its retry: events must not skip the backoff
                            self._add_locked(key, "requeue", new)
