"""Kubernetes Events are posted from their own thread, as client-go's event broadcaster does: a reconcile hands an
event over and goes on. In a burst of new fine-tunes each brings two or three events; posted inline, they held the
reconcile workers (and the API server) while the next fine-tunes waited for their Jobs. One thread posts them in the
order given, so one object's events stay in order and they never take more than one request slot of the API server.
They are also paced (a token bucket, as client-go's rate limiter paces a controller's requests): a burst of applies
brings two events per fine-tune, which posted as fast as the API server answers were a third of its writes while the
Jobs users wait for were being created. Beyond a small burst, they leave at the rate given; each keeps the time it was
sent.

Best effort: the status already says what an event says. A post that fails is logged and skipped; when the buffer is
full (the API server far behind) new events are dropped and counted (lorafinetune_operator_events_dropped_total).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException

log = logging.getLogger("lorafinetune.operator")
Post = Callable[[dict[str, Any], str, str, str, datetime], None]  # (object, type, reason, message, when)
EVENT_BURST = 25  # events posted at once after a quiet spell before the pace applies (client-go's spam filter's)
WARN_EVERY_DROPS = 1000  # a full buffer logs its first drop and then one line per this many, not one per event


class TokenBucket:
    """`rate` takes a second, up to `burst` at once after a quiet spell."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        if not rate > 0 or burst < 1:
            raise ValueError(f"a token bucket needs a rate above 0 and a burst of at least 1, got {rate} and {burst}")
        self._rate, self._burst, self._clock, self._sleep = rate, burst, clock, sleep
        self._tokens, self._at = float(burst), clock()

    def take(self) -> None:
        """Take one token, waiting until there is one."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            self._sleep((1 - self._tokens) / self._rate)
            self._tokens, self._at = 1.0, self._clock()
        self._tokens -= 1


class EventSender:
    def __init__(self, post: Post, capacity: int = 5000, on_drop: Callable[[], None] | None = None,
                 pace: TokenBucket | None = None) -> None:  # fmt: skip
        self._post = post
        self._pace = pace
        self._pending: queue.Queue[tuple[dict[str, Any], str, str, str, datetime] | None] = queue.Queue(capacity)
        self._on_drop = on_drop or (lambda: None)
        self._dropped = 0
        self._unposted = 0  # accepted and not yet tried
        self._count_guard = threading.Lock()  # reconcile workers send at once
        self._thread: threading.Thread | None = None

    def send(self, obj: dict[str, Any], kind: str, reason: str, message: str) -> bool:
        """Queue an event about `obj`, stamped now; False if the buffer was full and it was dropped."""
        try:
            with self._count_guard:
                self._pending.put_nowait((obj, kind, reason, message, datetime.now(UTC)))
                self._unposted += 1
        except queue.Full:
            self._on_drop()
            self._dropped += 1
            if self._dropped % WARN_EVERY_DROPS == 1:
                log.warning("event buffer full (the API server is far behind): %d event(s) dropped so far, the latest "
                            "%s about %s", self._dropped, reason, obj["metadata"].get("name"))  # fmt: skip
            return False
        return True

    def pending(self) -> int:
        """Events accepted and not yet posted, the one waiting for its token included."""
        return self._unposted

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lft-events", daemon=True)
        self._thread.start()

    def stop(self, flush_seconds: float = 5.0) -> None:
        """Post what is queued, for up to `flush_seconds` (at the pace), then stop; say how many were left."""
        if self._thread is None:
            return
        try:
            self._pending.put(None, timeout=flush_seconds)
            self._thread.join(timeout=flush_seconds)
        except queue.Full:
            pass  # the daemon thread goes with the process
        if self._thread.is_alive() and (left := self._unposted):
            log.warning("stopping with %d event(s) not posted (LFT_EVENTS_PER_SECOND paces them)", left)
        self._thread = None

    def _run(self) -> None:
        while (item := self._pending.get()) is not None:
            obj, kind, reason, message, when = item
            if self._pace is not None:
                self._pace.take()
            try:
                self._post(obj, kind, reason, message, when)
            except Exception as err:  # noqa: BLE001 - one failed post must not stop the ones after it
                why = f"{err.status} {err.reason}" if isinstance(err, ApiException) else repr(err)  # no response body
                log.warning("could not post event %s about %s: %s", reason, obj["metadata"].get("name"), why)
            with self._count_guard:
                self._unposted -= 1
