"""What the real-node tests need built: the Go tools (control plane, node, helm) and the two images; and Kueue, which
the integration tests after them need.

Each build is cached by version and locks its cache, so it can run twice at once: the second caller waits, then finds
it done. `start_in_background` runs them as soon as pytest knows real-node tests are selected, niced, beside the
tests that run first; the module fixture then calls `run` for each, which returns at once when the background build
succeeded and otherwise builds in the foreground and fails with that build's own output. On a fresh machine this
overlaps the downloads (Go modules, Debian packages, ~3.5 GB of wheels) with the CPU-bound tests before them.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

from tests.conftest import REPO

TOOLS = [str(REPO / "hack/cluster/build.sh")]  # control plane, node and helm; prints the binaries' folder, last
KUEUE = [str(REPO / "hack/kueue/build.sh")]  # its own Go module (tests/integration/test_kueue.py)
IMAGES = [str(REPO / "hack/image/build.sh")]  # prints the operator's and the trainer's image references, last
# FROM a base made here from Debian packages (no registry on these machines)
IMAGES_ENV = {"BASE": "localhost/lorafinetune-base:bookworm", "IMAGE": "localhost/lorafinetune:e2e"}

# chain -> its builds, run one after the other: (command, extra environment)
CHAINS: dict[str, list[tuple[list[str], dict[str, str]]]] = {
    "binaries": [(TOOLS, {}), (KUEUE, {})],
    "images": [(IMAGES, IMAGES_ENV)],
}

_background: list[subprocess.Popen] = []


def start_in_background(log_dir: Path) -> None:
    """Start every chain in its own session at the lowest priority, logging to log_dir/<chain>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for name, steps in CHAINS.items():
        script = " && ".join(_shell(cmd, env) for cmd, env in steps)
        with open(log_dir / f"{name}.log", "wb") as log:
            _background.append(subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True, preexec_fn=_lowest_priority))  # fmt: skip


def _lowest_priority() -> None:
    """Runs in the child after setsid. With the kernel's autogroup scheduling (on by default in desktop and cloud
    kernels) a new session is a new CPU group that gets an equal share whatever its processes' nice values, so the
    group itself is niced too; without this, builds niced to 19 took half the CPU from the quick start test."""
    os.nice(19)
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write("19")
    except OSError:
        pass  # no autogroup scheduling here: the process nice above is enough


def stop_background() -> None:
    """Stop what is still running (a session that ended early); the next build cleans up after it."""
    for proc in _background:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in _background:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    _background.clear()


def _shell(cmd: list[str], env: dict[str, str]) -> str:
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in env.items()), *map(shlex.quote, cmd)])
