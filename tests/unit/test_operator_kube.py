"""The operator's API requests against an API server that accepts the connection and never answers (a half-open
connection after a restart or a partition): each request gives up after its timeout, so the reconcile fails and is
retried, instead of holding a worker for as long as the kernel keeps the socket."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import urllib3
from kubernetes import client

from lorafinetune.operator import kube


@pytest.fixture
def silent_api_server(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])  # read nothing, answer nothing
            except TimeoutError:
                continue
            except OSError:  # closed at the end of the test
                return

    threading.Thread(target=accept, daemon=True).start()
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{listener.getsockname()[1]}"
    monkeypatch.setattr(kube, "_SHARED", client.ApiClient(configuration))
    monkeypatch.setattr(kube, "REQUEST_TIMEOUT", (1, 1))
    monkeypatch.setattr(kube, "EVENT_TIMEOUT", (1, 1))
    yield
    stop.set()
    time.sleep(0.3)  # the accept loop sees it
    for conn in held:
        conn.close()
    listener.close()


@pytest.mark.parametrize("request_", ["create", "patch_status", "delete", "post_event", "pvc_exists"])
def test_a_request_to_an_api_server_that_never_answers_gives_up(silent_api_server, request_):
    owner = {"metadata": {"name": "ft", "namespace": "ns", "uid": "u"}}
    calls = {
        "create": lambda: kube.create({"kind": "Job", "metadata": {"name": "ft-a1", "namespace": "ns"}}),
        "patch_status": lambda: kube.patch_status("ns", "ft", "1", {"phase": "Running"}),
        "delete": lambda: kube.delete("Job", "ns", "ft-a1"),
        "post_event": lambda: kube.post_event(owner, "Normal", "AttemptCreated", "m"),
        "pvc_exists": lambda: kube.pvc_exists("ns", "data"),
    }
    started = time.monotonic()
    # A GET or DELETE is tried once more by urllib3 (idempotent), then raises MaxRetryError.
    with pytest.raises((urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.MaxRetryError)):
        calls[request_]()
    assert time.monotonic() - started < 10
