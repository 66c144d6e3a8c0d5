"""The progress poller (pure logic with threads; the reads themselves run against real trainer pods in
tests/e2e/test_real_pods.py): a trainer that never answers must not hold up the caller."""

from __future__ import annotations

import threading
import time

from lorafinetune.api.status import Progress
from lorafinetune.operator.progress import Poller


def test_a_hanging_endpoint_never_blocks_the_caller_and_one_read_per_key_runs_at_a_time():
    release, reads, fresh = threading.Event(), [], []

    def fetch(address, port, previous):
        reads.append(address)
        release.wait(10)  # an endpoint that answers only when released
        return Progress(step=3, summary="3")

    poller = Poller(2, interval=0.0, port=9090, on_fresh=fresh.append, fetch=fetch)
    started = time.monotonic()
    poller.request("ns/a", "10.0.0.1", None)
    poller.request("ns/a", "10.0.0.1", None)  # under way already: not a second read
    assert time.monotonic() - started < 0.5, "the caller waited for the endpoint"
    assert poller.take("ns/a") is None
    release.set()
    deadline = time.monotonic() + 5
    while not fresh and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fresh == ["ns/a"] and reads == ["10.0.0.1"]
    assert poller.take("ns/a").step == 3 and poller.take("ns/a") is None, "taken once"


def test_reads_of_one_key_are_spaced_by_the_interval():
    reads = []
    poller = Poller(1, interval=60.0, port=9090, on_fresh=lambda key: None,
                    fetch=lambda address, port, previous: reads.append(address))  # fmt: skip
    poller.request("ns/a", "10.0.0.1", None)
    deadline = time.monotonic() + 5
    while not reads and time.monotonic() < deadline:
        time.sleep(0.01)
    poller.request("ns/a", "10.0.0.1", None)  # within the interval
    poller.request("ns/b", "10.0.0.2", None)  # another fine-tune: its own schedule
    time.sleep(0.2)
    assert sorted(reads) == ["10.0.0.1", "10.0.0.2"]
    poller.forget("ns/a")
    poller.request("ns/a", "10.0.0.1", None)  # re-created: read again at once
    time.sleep(0.2)
    assert sorted(reads) == ["10.0.0.1", "10.0.0.1", "10.0.0.2"]
