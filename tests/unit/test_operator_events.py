"""The operator's event sender: events leave the reconcile at once, are posted in order by one thread, a failing post
stops none after it, and a full buffer drops (and counts) rather than blocking a reconcile."""

from __future__ import annotations

import threading
import time

from kubernetes.client.exceptions import ApiException

from lorafinetune.operator.events import EventSender


def _obj(name: str) -> dict:
    return {"metadata": {"name": name, "namespace": "ns", "uid": "u"}}


def test_events_are_posted_in_order_off_the_callers_thread():
    posted, threads = [], set()

    def post(obj, kind, reason, message):
        threads.add(threading.current_thread().name)
        posted.append(reason)

    sender = EventSender(post)
    sender.start()
    for reason in ("AttemptCreated", "PodsStarting", "AllPodsRunning"):
        assert sender.send(_obj("a"), "Normal", reason, "m")
    sender.stop()
    assert posted == ["AttemptCreated", "PodsStarting", "AllPodsRunning"]
    assert threads == {"lft-events"}


def test_a_slow_api_server_never_holds_the_caller_and_a_full_buffer_drops_and_counts():
    release, dropped = threading.Event(), []
    sender = EventSender(lambda *event: release.wait(5), capacity=2, on_drop=lambda: dropped.append(1))
    sender.start()
    try:
        started = time.monotonic()
        results = [sender.send(_obj(f"ft-{i}"), "Normal", "AttemptCreated", "m") for i in range(6)]
        assert time.monotonic() - started < 0.5, "send never waits for the API server"
        # The first is being posted (out of the buffer) or still in it; the buffer holds 2 more at most.
        assert results[:2] == [True, True] and results[-1] is False
        assert len(dropped) == results.count(False) >= 3
    finally:
        release.set()
        sender.stop()


def test_a_failing_post_is_skipped_and_the_next_ones_still_go(caplog):
    posted = []

    def post(obj, kind, reason, message):
        if reason == "Refused":
            raise ApiException(status=500, reason="Internal Server Error")
        posted.append(reason)

    sender = EventSender(post)
    sender.start()
    for reason in ("First", "Refused", "Third"):
        sender.send(_obj("a"), "Normal", reason, "secret-free message")
    sender.stop()
    assert posted == ["First", "Third"]
    assert "could not post event Refused about a: 500 Internal Server Error" in caplog.text
