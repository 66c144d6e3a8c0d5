"""Watch-fed caches: list a kind once, then follow its watch, and keep the newest copy of every object in memory.

A reconcile reads Jobs, pods and nodes from here instead of asking the API server each time: at rest that is no
request at all, and a burst of new fine-tunes costs only the writes. The same pattern as client-go's informers,
reduced to what the operator needs: raw JSON (the client's model classes cost more CPU than the rest of a reconcile),
an index by one label, a callback per change, and `synced` once the first list is in.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from kubernetes.client.exceptions import ApiException

log = logging.getLogger("lorafinetune.operator")
TOMBSTONES = 10_000  # deletions remembered per informer; a racing write's answer comes within seconds of its deletion
WATCH_SECONDS = 240  # the server ends each watch after this; the informer resumes from the last resourceVersion


class Informer:
    """Objects of one kind, by (namespace, name), and by (namespace, `index_by(object)`): e.g. `by_label(name)`.

    `list_call(**kwargs)` is a list method of the official client (e.g. CoreV1Api.list_pod_for_all_namespaces),
    narrowed server-side by `label_selector` and `field_selector`;
    `on_change(obj)` runs on the informer's thread for every object added or changed, and deleted unless `on_delete` is
    given (deleted objects carry `metadata.deletionTimestamp` or are passed as they were last seen). Only news: a
    version the cache did not hold yet, not the echo of a write whose answer `put` stored already (the reconcile that
    wrote it planned from it), nor an unchanged object in a new list after a broken watch. Callers must not mutate
    the objects."""

    def __init__(self, name: str, list_call: Callable[..., Any], *, label_selector: str = "",
                 field_selector: str = "", index_by: Callable[[dict], str | None] | None = None,
                 on_change: Callable[[dict], None] | None = None, on_delete: Callable[[dict], None] | None = None,
                 count: Callable[[str], None] | None = None) -> None:  # fmt: skip
        self.name, self._list_call = name, list_call
        self._selectors = {"label_selector": label_selector, "field_selector": field_selector}
        self._index_by, self._count = index_by, count or (lambda verb: None)
        self._on_change, self._on_delete = on_change, on_delete
        self._objects: dict[tuple[str, str], dict] = {}
        # The last version of each recently deleted object: a write's answer that put() stores after the deletion
        # was seen must not bring the object back (it would be reconciled, and fail, forever). Oldest first.
        self._deleted_at: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._by_label: dict[tuple[str, str], dict[str, dict]] = {}
        self._guard = threading.Lock()
        self.synced = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading

    def get(self, namespace: str, name: str) -> dict | None:
        with self._guard:
            return self._objects.get((namespace, name))

    def indexed(self, namespace: str, value: str) -> list[dict]:
        """Objects whose `index_by` is `value`, in `namespace`."""
        with self._guard:
            return list(self._by_label.get((namespace, value), {}).values())

    def all(self) -> list[dict]:
        with self._guard:
            return list(self._objects.values())

    # ------------------------------------------------------------------ writing

    def put(self, obj: dict) -> bool:
        """Store an object this process just wrote (the API server's answer), so that a reconcile that runs before
        its watch event arrives does not plan the same write again. Returns whether it was news: False when the cache
        already had this version or a newer one."""
        return self._store(obj, deleted=False)

    def forget(self, obj: dict) -> None:
        """Drop an object whose deletion was seen, as the watch's DELETED event does."""
        self._store(obj, deleted=True)

    def _store(self, obj: dict, deleted: bool) -> bool:
        """An older copy never replaces a newer one, nor revives a deleted one: the watch may deliver an event from
        before a write whose answer put() stored already, and a write's answer may come after the deletion's event.
        managedFields are dropped: nothing reads them, and they are a good part of every object's size (memory with
        thousands of pods)."""
        meta = obj.get("metadata") or {}
        meta.pop("managedFields", None)
        key = (meta.get("namespace", ""), meta["name"])
        label = self._index_by(obj) if self._index_by else None
        version = _version(obj)
        with self._guard:
            old = self._objects.get(key)
            if not deleted:
                if old is not None and (held := _version(old)) and held >= version:
                    return False
                if (gone := self._deleted_at.get(key)) and gone >= version:
                    return False
                self._deleted_at.pop(key, None)  # created again since
                self._objects[key] = obj
            else:
                self._objects.pop(key, None)
                self._deleted_at.pop(key, None)
                self._deleted_at[key] = version
                if len(self._deleted_at) > TOMBSTONES:
                    self._deleted_at.popitem(last=False)
            old_label = self._index_by(old) if old and self._index_by else None
            if old_label is not None and (deleted or old_label != label):
                self._by_label.get((key[0], old_label), {}).pop(key[1], None)
            if label is not None and not deleted:
                self._by_label.setdefault((key[0], label), {})[key[1]] = obj
            return True

    # ------------------------------------------------------------------ following

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                version: str | None = self._relist()
                self.synced.set()
                delay = 1.0
                while version is not None and not self._stop.is_set():
                    version = self._watch(version)  # returns when the server ends the watch; None: relist
            except Exception as err:  # noqa: BLE001 - the API server restarting or unreachable: list again later
                log.warning("informer %s: %s; listing again in %.0f s", self.name, _brief(err), delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 30.0)

    def _relist(self) -> str:
        self._count("list")
        response = self._list_call(**self._selectors, _preload_content=False, _request_timeout=60)
        listing = json.loads(response.data)
        fresh = {(o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in listing.get("items") or []}
        with self._guard:
            gone = [o for key, o in self._objects.items() if key not in fresh]
        news = [obj for obj in fresh.values() if self._store(obj, deleted=False)]
        for obj in gone:
            self._store(obj, deleted=True)
            self._notify(obj, deleted=True)
        for obj in news:
            self._notify(obj, deleted=False)
        return listing["metadata"]["resourceVersion"]

    def _watch(self, version: str) -> str | None:
        self._count("watch")
        response = self._list_call(**self._selectors, watch=True, resource_version=version,
                                   allow_watch_bookmarks=True, timeout_seconds=WATCH_SECONDS,
                                   _preload_content=False, _request_timeout=WATCH_SECONDS + 30)  # fmt: skip
        try:
            for event in _lines(response):
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # 410 Gone: the version is too old to resume from
                    log.info("informer %s: watch ended (%s); listing again", self.name, obj.get("message", kind))
                    return None
                version = obj.get("metadata", {}).get("resourceVersion", version)
                if kind == "BOOKMARK":
                    continue
                deleted = kind == "DELETED"
                if self._store(obj, deleted=deleted):  # news, or a deletion
                    self._notify(obj, deleted=deleted)
                if self._stop.is_set():
                    break
        finally:
            response.release_conn()
        return version

    def _notify(self, obj: dict, *, deleted: bool) -> None:
        callback = (self._on_delete or self._on_change) if deleted else self._on_change
        if callback is not None:
            try:
                callback(obj)
            except Exception:  # noqa: BLE001 - a callback's error must not stop the cache
                log.exception("informer %s: change callback failed", self.name)


def by_label(label: str) -> Callable[[dict], str | None]:
    """An `index_by`: the value of one label."""
    return lambda obj: ((obj.get("metadata") or {}).get("labels") or {}).get(label)


def _lines(response: Any) -> Iterator[dict]:
    """The watch's JSON events, one a line, from a streaming urllib3 response."""
    pending = b""
    for chunk in response.stream(65536, decode_content=True):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield json.loads(line)


def _version(obj: dict) -> int:
    """The resourceVersion as a number, for "is this copy older": opaque by contract, an etcd revision in practice;
    anything else compares as 0 (so the watch's copy wins)."""
    try:
        return int(obj.get("metadata", {}).get("resourceVersion", "0"))
    except ValueError:
        return 0


def _brief(err: Exception) -> str:
    if isinstance(err, ApiException):
        return f"HTTP {err.status} {err.reason}"
    return f"{type(err).__name__}: {err}"


class PerNamespace:
    """One informer per namespace, read as one: an operator limited to a list of namespaces has a Role in each and
    no cluster-wide list, and one watch cannot span several namespaces. Objects are always looked up by namespace."""

    def __init__(self, make: Callable[[str | None], Informer], namespaces: list[str]) -> None:
        self._by_namespace: dict[str | None, Informer] = (
            {ns: make(ns) for ns in namespaces} if namespaces else {None: make(None)}
        )

    def _for(self, namespace: str) -> Informer | None:
        return self._by_namespace.get(namespace) or self._by_namespace.get(None)

    def get(self, namespace: str, name: str) -> dict | None:
        informer = self._for(namespace)
        return informer.get(namespace, name) if informer else None

    def indexed(self, namespace: str, value: str) -> list[dict]:
        informer = self._for(namespace)
        return informer.indexed(namespace, value) if informer else []

    def all(self) -> list[dict]:
        return [obj for informer in self._by_namespace.values() for obj in informer.all()]

    def put(self, obj: dict) -> None:
        if informer := self._for(obj["metadata"].get("namespace", "")):
            informer.put(obj)

    @property
    def parts(self) -> list[Informer]:
        return list(self._by_namespace.values())


def wait_synced(informers: list[Informer], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in informers)
