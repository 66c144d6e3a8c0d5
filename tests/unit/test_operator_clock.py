"""The operator's own timer: due keys are handed out once, rescheduling replaces, None forgets."""

from __future__ import annotations

import threading
import time

from lorafinetune.operator.clock import Clock


def test_due_keys_are_taken_once_and_unscheduled_ones_never():
    clock = Clock()
    clock.schedule("ns/now", 0)
    clock.schedule("ns/later", 60)
    clock.schedule("ns/forgotten", 0)
    clock.schedule("ns/forgotten", None)
    assert clock.take_due() == ["ns/now"]
    assert clock.take_due() == [], "taken keys wait for whoever ran them to schedule them again"
    assert 59 < clock.due("ns/later") <= 60 and clock.due("ns/forgotten") is None
    clock.schedule("ns/later", 0)  # an earlier time replaces the later one
    assert clock.take_due() == ["ns/later"]


def test_the_clock_runs_due_keys_and_survives_a_failing_one():
    clock, ran, done = Clock(resolution=0.01), [], threading.Event()

    def run(key: str) -> None:
        ran.append(key)
        if key == "ns/bad":
            raise RuntimeError("API server unavailable")
        done.set()

    clock.schedule("ns/bad", 0)
    clock.start(run)
    try:
        time.sleep(0.1)
        clock.schedule("ns/good", 0)
        assert done.wait(5), "a failing reconcile stopped the clock"
    finally:
        clock.stop()
    assert ran == ["ns/bad", "ns/good"]
