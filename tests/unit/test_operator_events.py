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

    def post(obj, kind, reason, message, when):
        threads.add(threading.current_thread().name)
        posted.append((reason, when))

    sender = EventSender(post)
    sender.start()
    for reason in ("AttemptCreated", "PodsStarting", "AllPodsRunning"):
        assert sender.send(_obj("a"), "Normal", reason, "m")
    sender.stop()
    assert [reason for reason, _ in posted] == ["AttemptCreated", "PodsStarting", "AllPodsRunning"]
    assert threads == {"lft-events"}
    assert posted[0][1] <= posted[1][1] <= posted[2][1], "stamped when sent, in order"


def test_a_slow_api_server_never_holds_the_caller_and_a_full_buffer_drops_and_counts():
    taken, release, dropped = threading.Event(), threading.Event(), []

    def post(*event):
        taken.set()
        release.wait(10)

    sender = EventSender(post, capacity=2, on_drop=lambda: dropped.append(1))
    sender.start()
    try:
        assert sender.send(_obj("ft-0"), "Normal", "AttemptCreated", "m")
        assert taken.wait(5), "the first is being posted, out of the buffer"
        started = time.monotonic()
        results = [sender.send(_obj(f"ft-{i}"), "Normal", "AttemptCreated", "m") for i in range(1, 6)]
        assert time.monotonic() - started < 2, "send never waits for the API server"
        assert results == [True, True, False, False, False], "the buffer holds 2; the rest are dropped"
        assert len(dropped) == 3
    finally:
        release.set()
        sender.stop()


def test_a_failing_post_is_skipped_and_the_next_ones_still_go(caplog):
    posted = []

    def post(obj, kind, reason, message, when):
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
