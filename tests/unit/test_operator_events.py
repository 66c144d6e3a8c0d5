"""The operator's event sender: events leave the reconcile at once, are posted in order by one thread, a failing post
stops none after it, a full buffer drops (and counts) rather than blocking a reconcile, and posts are paced."""

from __future__ import annotations

import threading
import time

import pytest
from kubernetes.client.exceptions import ApiException

from lorafinetune.operator.events import EventSender, TokenBucket
from lorafinetune.operator.settings import OperatorSettings


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


class _Clock:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now, self.slept = 100.0, []

    def sleep(self, seconds: float) -> None:
        self.slept.append(round(seconds, 6))
        self.now += seconds


def test_a_token_bucket_lets_a_burst_through_then_paces_and_refills_while_quiet():
    clock = _Clock()
    bucket = TokenBucket(rate=10, burst=3, clock=lambda: clock.now, sleep=clock.sleep)
    for _ in range(3):
        bucket.take()
    assert clock.slept == [], "the burst goes at once"
    bucket.take()
    bucket.take()
    assert clock.slept == [0.1, 0.1], "then one every 1/rate seconds"
    clock.now += 60  # quiet: the bucket refills, to its burst and no further
    for _ in range(3):
        bucket.take()
    assert clock.slept == [0.1, 0.1]
    bucket.take()
    assert clock.slept == [0.1, 0.1, 0.1]


@pytest.mark.parametrize(("rate", "burst"), [(0, 1), (-1, 1), (1, 0)])
def test_a_token_bucket_refuses_a_pace_that_would_never_post(rate, burst):
    with pytest.raises(ValueError, match="rate above 0 and a burst of at least 1"):
        TokenBucket(rate, burst)


def test_the_events_setting_refuses_a_pace_that_would_never_post(monkeypatch):
    monkeypatch.setenv("LFT_EVENTS_PER_SECOND", "0")
    with pytest.raises(ValueError, match="LFT_EVENTS_PER_SECOND must be more than 0, got 0.0"):
        OperatorSettings.from_env()


def test_posts_beyond_the_burst_leave_at_the_pace_and_keep_the_time_they_were_sent():
    posted: list[tuple[str, float]] = []
    sender = EventSender(lambda obj, kind, reason, message, when: posted.append((reason, time.monotonic())),
                         pace=TokenBucket(rate=20, burst=2))  # fmt: skip
    sent_at = time.monotonic()
    for i in range(6):
        sender.send(_obj("a"), "Normal", f"R{i}", "m")
    sender.start()
    sender.stop(flush_seconds=10)
    assert [reason for reason, _ in posted] == [f"R{i}" for i in range(6)]
    # two at once, then four at 20 a second: the last no sooner than 0.2 s after the first
    assert posted[-1][1] - posted[0][1] >= 0.19
    assert posted[1][1] - sent_at < 0.15


def test_stopping_says_how_many_events_the_pace_left_unposted(caplog):
    posted: list[str] = []
    sender = EventSender(lambda obj, kind, reason, message, when: posted.append(reason),
                         pace=TokenBucket(rate=1, burst=2))  # fmt: skip
    for i in range(6):
        sender.send(_obj("a"), "Normal", f"R{i}", "m")
    sender.start()
    sender.stop(flush_seconds=0.5)
    assert posted == ["R0", "R1"], "the burst, and then one a second: none more within half a second"
    assert sender.pending() == 4, "the gauge counts the one waiting for its token too"
    assert "stopping with 4 event(s) not posted" in caplog.text
