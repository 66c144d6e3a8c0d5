"""What torchrun does to the trainer's ranks in a pod, with real torchrun and stand-in ranks at the process boundary
(tests/trainer/stand_in_rank.py): how long the ranks get to checkpoint after SIGTERM, and which exit code the
operator acts on. torchrun runs with the environment the operator gives the pod (builders.build_job) or the local
runner gives its agents."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.local.runner import TORCHRUN_ENV
from lorafinetune.operator.builders import Owner, build_job
from lorafinetune.operator.settings import OperatorSettings
from lorafinetune.operator.status import observe_attempt
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.multiprocess
SPEC = LoRAFineTuneSpec.model_validate({
    "model": {"uri": "hf://org/model"}, "dataset": {"train": "pvc://data/train.jsonl"},
    "resources": {"gpusPerNode": 0}, "output": {"uri": "pvc://out/run"},
})  # fmt: skip


def pod_env() -> dict[str, str]:
    job = build_job(Owner("t", "ns", "uid"), SPEC, 1, OperatorSettings())
    env = job["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e["value"] for e in env if "value" in e and e["name"].startswith("PET_SHUTDOWN")}


def torchrun(tmp_path: Path, **env: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "tests.trainer.stand_in_rank"]  # fmt: skip
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "LFT_TERMINATION_LOG": str(tmp_path / "termination.json"),
                "STAND_IN_OUT": str(tmp_path / "rank"), **env}  # fmt: skip
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_after_ready(proc: subprocess.Popen, tmp_path: Path) -> float:
    """SIGTERM to torchrun (what the kubelet sends the container's first process) once both ranks run; returns
    the seconds until torchrun exited."""
    deadline = time.time() + 90
    while not all((tmp_path / f"rank.ready-{r}").exists() for r in (0, 1)):
        assert time.time() < deadline and proc.poll() is None, "the stand-in ranks did not start"
        time.sleep(0.2)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    return time.monotonic() - started


@pytest.mark.parametrize("launcher", ["pod", "local-runner", "torchrun-default"])
def test_after_sigterm_the_ranks_get_the_grace_period_not_30_seconds(tmp_path: Path, launcher: str):
    env = {"pod": pod_env(), "local-runner": TORCHRUN_ENV, "torchrun-default": {}}[launcher]
    given = launcher != "torchrun-default"
    assert not given or int(env["PET_SHUTDOWN_TIMEOUT"]) > 100
    # Each rank needs 45 s after SIGTERM to finish its step and save.
    elapsed = stop_after_ready(torchrun(tmp_path, STAND_IN="slow-stop", STOP_SECONDS="45", **env), tmp_path)
    saved = sorted(p.name for p in tmp_path.glob("rank.saved-*"))
    if given:
        assert saved == ["rank.saved-0", "rank.saved-1"] and elapsed >= 45
    else:  # what pods did before: torchrun kills ranks that are still saving after 30 s
        assert saved == [] and elapsed < 45


def test_a_permanent_trainer_error_stays_permanent_although_torchrun_exits_1(tmp_path: Path):
    proc = torchrun(tmp_path, STAND_IN="data-error")
    assert proc.wait(timeout=120) == 1  # the container's exit code in a pod
    terminated = {"exitCode": 1, "reason": "Error", "message": (tmp_path / "termination.json").read_text()}
    statuses = [{"name": "trainer", "state": {"terminated": terminated}}]
    pod = {"metadata": {"name": "t-a1-0"}, "status": {"phase": "Failed", "containerStatuses": statuses}}
    outcome = observe_attempt({"spec": {"parallelism": 1}}, [pod])  # fmt: skip
    assert (outcome.reason, outcome.exit_code, outcome.permanent) == ("DataError", 3, True)
