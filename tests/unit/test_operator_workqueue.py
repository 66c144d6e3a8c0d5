"""The operator's work queue: one run per key at a time, coalesced adds, FIFO in two lanes, delayed adds, retries with
backoff."""

from __future__ import annotations

import threading
import time

from lorafinetune.operator.workqueue import WorkQueue


def _wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_adds_coalesce_and_run_in_arrival_order():
    q, ran = WorkQueue(resolution=0.01), []
    for key in ("ns/a", "ns/b", "ns/a", "ns/c", "ns/b"):
        q.add(key, "change")
    assert q.depth() == 3, "a key is queued once however many events it gets"
    q.start(1, lambda key, source: ran.append((key, source)))
    try:
        assert _wait(lambda: len(ran) == 3)
        assert ran == [("ns/a", "change"), ("ns/b", "change"), ("ns/c", "change")]
    finally:
        q.stop()


def test_a_key_never_runs_twice_at_once_and_a_change_during_a_run_runs_it_again():
    q, running, overlaps, runs = WorkQueue(resolution=0.01), set(), [], []
    release = threading.Event()

    def run(key, source):
        if key in running:
            overlaps.append(key)
        running.add(key)
        runs.append(source)
        if len(runs) == 1:
            release.wait(5)  # the first run is slow: events arrive meanwhile
        running.discard(key)

    q.start(4, run)
    try:
        q.add("ns/a", "change")
        assert _wait(lambda: runs)
        for _ in range(5):
            q.add("ns/a", "pod-event")
        release.set()
        assert _wait(lambda: len(runs) == 2)
        time.sleep(0.1)
        assert (overlaps, runs) == ([], ["change", "requeue"]), "five events during a run: one run after it"
    finally:
        q.stop()


def test_scheduled_keys_come_back_when_due_and_can_be_cancelled():
    q, ran = WorkQueue(resolution=0.01), []
    q.schedule("ns/soon", 0.05)
    q.schedule("ns/later", 60)
    q.schedule("ns/cancelled", 0.05)
    q.schedule("ns/cancelled", None)
    assert 59 < q.due("ns/later") <= 60 and q.due("ns/cancelled") is None
    q.start(2, lambda key, source: ran.append((key, source)))
    try:
        assert _wait(lambda: ran)
        time.sleep(0.2)
        assert ran == [("ns/soon", "clock")]
        q.add("ns/later", "change")  # an event makes the tick due now
        assert _wait(lambda: len(ran) == 2) and q.due("ns/later") is None
    finally:
        q.stop()


def test_a_failing_key_backs_off_and_does_not_stop_the_others():
    q, ran = WorkQueue(resolution=0.01), []

    def run(key, source):
        ran.append((key, source))
        if key == "ns/bad":
            raise RuntimeError("API server said 500")

    q.start(1, run)
    try:
        q.add("ns/bad", "change")
        q.add("ns/good", "change")
        assert _wait(lambda: ("ns/good", "change") in ran)
        assert 0 < q.due("ns/bad") <= 1.0, "retried after the first backoff step (1 s)"
        assert _wait(lambda: ("ns/bad", "retry") in ran, timeout=3)
        # run() records the retry before it raises: the new backoff is set a moment later
        assert _wait(lambda: (q.due("ns/bad") or 0) > 1.0), "the second failure waits longer"
        assert q.due("ns/bad") <= 2.0, "twice as long"
        q.forget("ns/bad")
        assert q.due("ns/bad") is None
    finally:
        q.stop()


def test_new_fine_tunes_go_first_three_turns_to_one_and_neither_lane_starves():
    q, ran = WorkQueue(resolution=0.01), []
    for i in range(4):
        q.add(f"ns/started-{i}", "pod-event")
    for i in range(7):
        q.add(f"ns/new-{i}", "change", new=True)
    q.start(1, lambda key, source: ran.append(key))
    try:
        assert _wait(lambda: len(ran) == 11)
        assert ran == ["ns/new-0", "ns/new-1", "ns/new-2", "ns/started-0", "ns/new-3", "ns/new-4", "ns/new-5",
                       "ns/started-1", "ns/new-6", "ns/started-2", "ns/started-3"]  # fmt: skip
    finally:
        q.stop()


def test_a_key_known_new_while_waiting_moves_to_the_first_lane_once():
    ran, waits = [], []
    q = WorkQueue(resolution=0.01, on_wait=lambda seconds, lane: waits.append((seconds, lane)))
    for i in range(3):
        q.add(f"ns/other-{i}", "pod-event")
    q.add("ns/x", "pvc-event")
    time.sleep(0.05)
    q.add("ns/x", "change", new=True)
    assert q.depth() == 4
    q.start(1, lambda key, source: ran.append((key, source)))
    try:
        assert _wait(lambda: len(ran) == 4)
        time.sleep(0.05)
        assert ran[0] == ("ns/x", "pvc-event"), "it keeps what first queued it"
        assert [k for k, _ in ran].count("ns/x") == 1
        assert waits[0][0] >= 0.05, "its wait counts from when it was first queued"
        assert [lane for _, lane in waits] == ["new", "other", "other", "other"]
    finally:
        q.stop()


def test_a_new_fine_tune_changed_during_its_run_runs_again_in_the_first_lane():
    q, ran = WorkQueue(resolution=0.01), []
    release = threading.Event()

    def run(key, source):
        ran.append(key)
        if key == "ns/new":
            release.wait(5)

    q.add("ns/new", "change", new=True)
    q.start(1, run)
    try:
        assert _wait(lambda: ran == ["ns/new"])
        q.add("ns/new", "change", new=True)  # during its run
        q.add("ns/other", "pod-event")
        release.set()
        assert _wait(lambda: len(ran) == 3)
        assert ran == ["ns/new", "ns/new", "ns/other"]
    finally:
        q.stop()


def test_a_key_that_moved_up_and_is_queued_again_waits_its_turn_behind_the_others():
    """The entry a key leaves in the other lane when it moves up is never taken for a later add of that key."""
    q, ran = WorkQueue(resolution=0.01), []
    q.add("ns/x", "pvc-event")
    for i in range(3):
        q.add(f"ns/other-{i}", "pod-event")
    q.add("ns/x", "change", new=True)  # moves up, leaving its first entry behind
    q.start(1, lambda key, source: ran.append(key))
    try:
        assert _wait(lambda: ran == ["ns/x"] or len(ran) > 1)
        q.add("ns/x", "job-event")  # its run created the Job: queued again, at the back
        assert _wait(lambda: len(ran) == 5)
        time.sleep(0.05)
        assert ran == ["ns/x", "ns/other-0", "ns/other-1", "ns/other-2", "ns/x"]
    finally:
        q.stop()


def test_a_new_fine_tune_whose_reconcile_failed_is_retried_in_the_new_lane():
    q, ran = WorkQueue(resolution=0.01), []

    def run(key, source):
        ran.append((key, source))
        if (key, source) == ("ns/new", "change"):
            raise RuntimeError("429 Too Many Requests")
        if key.startswith("ns/other"):
            time.sleep(0.3)  # status-only work, still waiting when the 1 s backoff ends

    q.add("ns/new", "change", new=True)
    for i in range(6):
        q.add(f"ns/other-{i}", "pod-event")
    q.start(1, run)
    try:
        assert _wait(lambda: len(ran) == 7, timeout=10)
        # In the other lane it would have come after all six, queued before its retry was due.
        assert ran.index(("ns/new", "retry")) < 6, ran
    finally:
        q.stop()


def test_new_waiting_counts_new_fine_tunes_queued_or_running_as_new_but_the_one_asking():
    q, release, started = WorkQueue(resolution=0.01), threading.Event(), threading.Event()
    q.add("ns/new-1", "change", new=True)
    q.add("ns/old", "pod-event")
    q.add("ns/new-2", "change", new=True)
    assert q.new_waiting() == 2 and q.new_waiting(besides="ns/new-1") == 1

    def run(key, source):
        started.set()
        release.wait(5)

    q.start(1, run)  # takes ns/new-1 (the new lane first) and holds it
    try:
        assert started.wait(5)
        assert q.new_waiting() == 2, "one queued, one being reconciled as new"
        assert q.new_waiting(besides="ns/new-2") == 1
        release.set()
        assert _wait(lambda: q.depth() == 0 and q.new_waiting() == 0)
    finally:
        release.set()
        q.stop()
