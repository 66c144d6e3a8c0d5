"""The informer's store (pure logic; the list/watch itself runs against the real API server in the integration tests,
where every reconcile reads from it)."""

from __future__ import annotations

import json
from types import SimpleNamespace

from lorafinetune.operator.informer import Informer, PerNamespace, by_label


def obj(name, version, owner=None, namespace="ns"):
    labels = {"lorafinetune.io/name": owner} if owner else {}
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": str(version), "labels": labels}}


def informer():
    return Informer("pods", lambda **_: None, index_by=by_label("lorafinetune.io/name"))


def test_objects_are_found_by_name_and_by_their_owner_label():
    i = informer()
    i.put(obj("a-0", 1, owner="a"))
    i.put(obj("a-1", 2, owner="a"))
    i.put(obj("b-0", 3, owner="b"))
    assert i.get("ns", "a-1")["metadata"]["resourceVersion"] == "2"
    assert sorted(o["metadata"]["name"] for o in i.indexed("ns", "a")) == ["a-0", "a-1"]
    assert i.indexed("other", "a") == [] and i.get("other", "a-0") is None
    i.forget(obj("a-0", 4, owner="a"))
    assert [o["metadata"]["name"] for o in i.indexed("ns", "a")] == ["a-1"] and i.get("ns", "a-0") is None


def test_a_relabelled_object_moves_between_owners():
    i = informer()
    i.put(obj("x", 1, owner="a"))
    i.put(obj("x", 2, owner="b"))
    assert i.indexed("ns", "a") == [] and [o["metadata"]["name"] for o in i.indexed("ns", "b")] == ["x"]


def test_an_older_copy_never_replaces_a_newer_one_and_only_a_newer_one_is_news():
    # The answer to our own write is stored first; the watch then delivers events from before it.
    i = informer()
    assert i.put(obj("a-0", 10, owner="a")), "news"
    assert not i.put(obj("a-0", 9, owner="a"))
    assert i.get("ns", "a-0")["metadata"]["resourceVersion"] == "10"
    assert not i.put(obj("a-0", 10, owner="a")), "the watch's echo of our own write is not news"
    assert i.put(obj("a-0", 11, owner="a"))
    i.forget(obj("a-0", 9, owner="a"))  # a deletion always wins
    assert i.get("ns", "a-0") is None


def test_per_namespace_informers_read_as_one():
    made = {}

    def make(ns):
        made[ns] = Informer(f"jobs in {ns}", lambda **_: None, index_by=by_label("lorafinetune.io/name"))
        return made[ns]

    both = PerNamespace(make, ["team-a", "team-b"])
    both.put(obj("a-a1", 1, owner="a", namespace="team-a"))
    both.put(obj("b-a1", 1, owner="b", namespace="team-b"))
    both.put(obj("c-a1", 1, owner="c", namespace="elsewhere"))  # not watched: dropped
    assert [o["metadata"]["name"] for o in both.indexed("team-b", "b")] == ["b-a1"]
    assert sorted(o["metadata"]["name"] for o in both.all()) == ["a-a1", "b-a1"]
    assert len(both.parts) == 2 and made["team-a"].get("team-a", "a-a1") is not None


def test_a_claim_that_appears_wakes_the_runs_held_back_for_it_once():
    from lorafinetune.operator import handlers

    handlers._WAITING_FOR_PVC[("ns1", "data")] = {"ns1/a", "ns1/b"}
    handlers._wake_waiting_for({"metadata": {"namespace": "ns2", "name": "data"}})  # another namespace's claim
    assert handlers.QUEUE.depth() == 0
    handlers._wake_waiting_for({"metadata": {"namespace": "ns1", "name": "data"}})
    handlers._wake_waiting_for({"metadata": {"namespace": "ns1", "name": "data"}})  # its next change: nobody left
    assert handlers.QUEUE.depth() == 2 and ("ns1", "data") not in handlers._WAITING_FOR_PVC


def test_events_are_indexed_by_the_job_they_are_about_and_the_newest_message_wins():
    from lorafinetune.operator.kube import newest_message

    def event(name, job_uid, when, message, version):
        meta = {"name": name, "namespace": "ns", "resourceVersion": str(version)}
        return {"metadata": meta, "involvedObject": {"kind": "Job", "uid": job_uid}, "lastTimestamp": when,
                "message": message}  # fmt: skip

    i = Informer("events", lambda **_: None, index_by=lambda e: e["involvedObject"].get("uid"))
    i.put(event("e1", "job-1", "2026-11-28T10:00:05Z", "exceeded quota: old", 1))
    i.put(event("e2", "job-1", "2026-11-28T10:00:09Z", "exceeded quota: new", 2))
    i.put(event("e3", "job-2", "2026-11-28T10:00:20Z", "denied by webhook", 3))
    assert newest_message(i.indexed("ns", "job-1")) == "exceeded quota: new"
    assert newest_message(i.indexed("ns", "job-3")) == "", "a Job of the same name deleted earlier had other events"


def test_versions_that_are_not_numbers_always_count_as_news():
    # resourceVersion is opaque by contract: without an order, the watch's copy wins
    i = informer()
    i.put({"metadata": {"name": "x", "namespace": "ns", "resourceVersion": "opaque-1"}})
    assert i.put({"metadata": {"name": "x", "namespace": "ns", "resourceVersion": "opaque-2"}})
    assert i.get("ns", "x")["metadata"]["resourceVersion"] == "opaque-2"


def test_a_deleted_object_is_not_revived_by_an_older_copy_but_may_be_created_again():
    # A reconcile's status patch is answered (version 11) after the watch already delivered the deletion (12).
    i = informer()
    i.put(obj("a-0", 10, owner="a"))
    i.forget(obj("a-0", 12, owner="a"))
    assert not i.put(obj("a-0", 11, owner="a"))
    assert i.get("ns", "a-0") is None and i.indexed("ns", "a") == []
    assert i.put(obj("a-0", 13, owner="a")), "a new object of the same name"
    assert i.get("ns", "a-0")["metadata"]["resourceVersion"] == "13"


class Answers:
    """An Informer's list call answered as the API server would, in JSON: a listing, or a watch's events, one a line
    (only the list and watch themselves run against the real API server, in the integration tests)."""

    def __init__(self):
        self.items, self.events = [], []

    def __call__(self, watch=False, **_):
        if watch:
            lines, self.events = b"".join(json.dumps(e).encode() + b"\n" for e in self.events), []
            return SimpleNamespace(stream=lambda *_, **__: iter([lines]), release_conn=lambda: None)
        return SimpleNamespace(data=json.dumps({"metadata": {"resourceVersion": "1"}, "items": self.items}).encode())


def test_a_fine_tune_is_reconciled_on_news_only_and_forgotten_when_deleted(monkeypatch):
    from lorafinetune.operator import handlers
    from lorafinetune.operator.workqueue import WorkQueue

    def body(version):
        meta = {"name": "echo", "namespace": "ns", "uid": "u1", "resourceVersion": str(version)}
        return {"metadata": meta, "spec": {}, "status": {"attempt": 1} if version > 1 else {}}

    answers = Answers()
    fine_tunes = Informer("lorafinetunes", answers, on_change=handlers._on_fine_tune,
                          on_delete=handlers._on_fine_tune_deleted)  # fmt: skip

    def queued_after(step):
        monkeypatch.setattr(handlers, "QUEUE", WorkQueue())
        step()
        return handlers.QUEUE.depth()

    def watch(kind, version):
        answers.events = [{"type": kind, "object": body(version)}]
        return lambda: fine_tunes._watch("1")

    answers.items = [body(1)]
    assert queued_after(fine_tunes._relist) == 1, "the first list: every fine-tune"
    assert handlers._FIRST_SEEN.pop("u1", None) is not None, "a fine-tune without an attempt is timed to its Job"
    fine_tunes.put(body(2))  # the reconcile stores the API server's answer to its status patch
    assert queued_after(watch("MODIFIED", 2)) == 0, "its echo: the reconcile planned from this very version"
    answers.items = [body(2)]
    assert queued_after(fine_tunes._relist) == 0, "listing again after a broken watch: nothing changed"
    assert queued_after(watch("MODIFIED", 3)) == 1, "a change made by anyone else"
    handlers.QUEUE.schedule("ns/echo", 60)
    watch("DELETED", 4)()
    assert handlers.QUEUE.due("ns/echo") is None and fine_tunes.get("ns", "echo") is None, "deleted: forgotten"
    answers.items = []
    assert queued_after(watch("ADDED", 5)) == 1 and queued_after(fine_tunes._relist) == 0
    assert fine_tunes.get("ns", "echo") is None, "gone from a new list: dropped, and no reconcile for it"


def test_callbacks_hear_of_news_and_deletions_not_of_echoes_or_unchanged_objects_listed_again():
    answers, heard = Answers(), []
    i = Informer("jobs", answers, on_change=lambda o: heard.append((o["metadata"]["name"],
                                                                    o["metadata"]["resourceVersion"])))  # fmt: skip
    answers.items = [obj("a-1", 1, owner="a"), obj("b-1", 2, owner="b")]
    i._relist()
    assert sorted(heard) == [("a-1", "1"), ("b-1", "2")], "the first list: everything"
    heard.clear()
    i.put(obj("c-1", 3, owner="c"))  # the operator's own create, stored from the API server's answer
    answers.events = [{"type": "ADDED", "object": obj("c-1", 3, owner="c")},
                      {"type": "MODIFIED", "object": obj("a-1", 4, owner="a")}]  # fmt: skip
    i._watch("2")
    assert heard == [("a-1", "4")], "the echo of the operator's own create is no news"
    heard.clear()
    answers.items = [obj("a-1", 4, owner="a"), obj("c-1", 5, owner="c")]  # b-1 deleted while no watch ran
    i._relist()
    assert sorted(heard) == [("b-1", "2"), ("c-1", "5")], "listed again: only what changed, and what is gone"
    assert i.get("ns", "b-1") is None
