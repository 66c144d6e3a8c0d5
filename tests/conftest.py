"""Shared fixtures: a tiny random Llama (built once per session) and helpers to write manifests (built with
tests/manifests.py), run the CLI, pick a free port and poll until something holds."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tiny_model import build_tiny_model, chat_rows, write_jsonl

REPO = Path(__file__).resolve().parents[1]


def pytest_collection_finish(session: pytest.Session) -> None:
    """When real-node tests will run (after -m/-k selection), start their builds now, beside the tests before them."""
    if not session.config.option.collectonly and any(i.get_closest_marker("realnode") for i in session.items):
        from tests.e2e import builds

        builds.start_in_background(Path(tempfile.mkdtemp(prefix="lorafinetune-builds-")))


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.e2e import builds

    builds.stop_background()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", chat_rows(96, seed=1))


def write_manifest(path: Path, manifest: dict) -> Path:
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorafinetune.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it; another process could still take it before use)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], Any], timeout: float = 60, what: str = "condition") -> Any:
    """Poll until `check()` returns something truthy; fail with the last value seen."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        try:
            last = check()
        except Exception as err:  # noqa: BLE001 - transient errors while a server or API object comes up
            last = err
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")
