"""The progress poller (pure logic with threads; the reads themselves run against real trainer pods in
tests/e2e/test_real_pods.py): a trainer that never answers must not hold up the caller."""

from __future__ import annotations

import itertools
import threading
import time

from lorafinetune.api.status import Progress
from lorafinetune.operator.progress import Poller


def _until(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_hanging_endpoint_never_blocks_the_caller_and_one_read_per_key_runs_at_a_time():
    release, reads, fresh = threading.Event(), [], []

    def fetch(address, port, previous):
        reads.append(address)
        release.wait(10)  # an endpoint that answers only when released
        return Progress(step=3, summary="3")

    poller = Poller(2, interval=0.0, port=9090, on_fresh=fresh.append, fetch=fetch)
    started = time.monotonic()
    poller.follow("ns/a", "10.0.0.1", None)
    poller.follow("ns/a", "10.0.0.1", None)  # followed already: not a second read
    assert time.monotonic() - started < 0.5, "the caller waited for the endpoint"
    assert _until(lambda: reads) and poller.take("ns/a") is None
    time.sleep(0.2)
    assert reads == ["10.0.0.1"], "one read at a time, however short the interval"
    release.set()
    assert _until(lambda: fresh)
    assert fresh[0] == "ns/a" and poller.take("ns/a").step == 3
    poller.drop("ns/a")


def test_a_followed_run_is_read_every_interval_without_being_asked_until_dropped():
    reads, fresh = [], []

    def fetch(address, port, previous):
        reads.append((address, time.monotonic()))
        # the endpoint comes up only at the third read (a trainer loading its model): no read must stop the clock
        return Progress(step=len(reads), summary="") if len(reads) >= 3 else None

    poller = Poller(1, interval=0.2, port=9090, on_fresh=fresh.append, fetch=fetch)
    poller.follow("ns/a", "10.0.0.1", None)
    assert _until(lambda: len(reads) >= 4), "read again and again with nobody asking"
    times = [t for _, t in reads]
    assert all(b - a >= 0.19 for a, b in itertools.pairwise(times)), f"spaced by the interval: {times}"
    assert times[2] - times[1] >= 0.39, f"the second read in a row that brought nothing waits twice as long: {times}"
    assert fresh[:2] == ["ns/a", "ns/a"] and poller.take("ns/a").step >= 3
    poller.follow("ns/a", "10.0.0.9", None)  # the next attempt's pod: read there from the next turn
    assert _until(lambda: reads[-1][0] == "10.0.0.9")
    poller.drop("ns/a")
    time.sleep(0.3)
    count = len(reads)
    time.sleep(0.5)
    assert len(reads) == count, "no read after the run stopped running"
    assert poller.take("ns/a") is None


def test_each_run_has_its_own_schedule():
    reads = []
    poller = Poller(2, interval=60.0, port=9090, on_fresh=lambda key: None,
                    fetch=lambda address, port, previous: reads.append(address))  # fmt: skip
    poller.follow("ns/a", "10.0.0.1", None)
    poller.follow("ns/b", "10.0.0.2", None)
    assert _until(lambda: len(reads) == 2)
    poller.follow("ns/a", "10.0.0.1", None)  # within the interval: nothing
    time.sleep(0.2)
    assert sorted(reads) == ["10.0.0.1", "10.0.0.2"]
    poller.drop("ns/a")
    poller.follow("ns/a", "10.0.0.1", None)  # running again (a new attempt): read again at once
    assert _until(lambda: len(reads) == 3) and sorted(reads) == ["10.0.0.1", "10.0.0.1", "10.0.0.2"]
