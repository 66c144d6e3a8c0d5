"""Fencing between attempts: a paused old rank that wakes after a newer attempt claimed the folder writes nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from lorafinetune.trainer import fence
from tests.conftest import REPO

# The old attempt: claims the folder, is paused (SIGSTOP, as a frozen node or a debugger would), and when it wakes
# tries to publish, as checkpoint.save does before its COMPLETE marker.
OLD_RANK = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from lorafinetune.trainer import fence
    run = Path(sys.argv[1])
    fence.claim(run, "attempt-1")
    os.kill(os.getpid(), signal.SIGSTOP)
    try:
        fence.check(run, "attempt-1", "completing checkpoint step 10")
    except fence.Superseded as err:
        print(err)
        sys.exit(1)
    (run / "COMPLETE.json").write_text("written by a stale attempt")
""")


@pytest.mark.parametrize("round_", range(20))
def test_a_paused_old_rank_cannot_publish_after_a_new_attempt_started(tmp_path, round_):
    old = subprocess.Popen([sys.executable, "-c", OLD_RANK, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                           text=True)  # fmt: skip
    _, status = os.waitpid(old.pid, os.WUNTRACED)  # until it has claimed and stopped itself
    assert os.WIFSTOPPED(status)
    fence.claim(tmp_path, "attempt-2")  # the new attempt starts meanwhile
    os.kill(old.pid, signal.SIGCONT)
    out, _ = old.communicate(timeout=60)
    assert old.returncode == 1 and "attempt attempt-2 has taken over" in out
    assert not (tmp_path / "COMPLETE.json").exists()
    fence.check(tmp_path, "attempt-2", "the new attempt's own save")  # the owner itself is not refused


def test_no_token_means_no_fencing(tmp_path):
    fence.claim(tmp_path, None)
    assert not (tmp_path / "attempt.json").exists()
    fence.check(tmp_path, None, "anything")
    fence.claim(tmp_path, "a")
    with pytest.raises(fence.Superseded, match=r"not saving: attempt a has taken over"):
        fence.check(tmp_path, "b", "saving")


def test_a_write_that_failed_because_a_newer_attempt_took_over_is_reported_as_that(tmp_path, monkeypatch):
    """Paused between a claim check and the write it guarded, an old rank wakes to find its staging folder removed by
    the newer attempt: the FileNotFoundError it meets is reported as Superseded (seen in a full test run), while the
    same error with the claim still held stays what it is."""
    from lorafinetune.api.spec import LoRAFineTuneSpec
    from lorafinetune.contract import ENV_ATTEMPT
    from lorafinetune.trainer.__main__ import _superseded_or_none
    from lorafinetune.trainer.recipe import LoRAFineTuneRecipe
    from tests.manifests import tiny_cpu_run

    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv(ENV_ATTEMPT, "attempt-1")
    spec = LoRAFineTuneSpec.model_validate(tiny_cpu_run(tmp_path, tmp_path / "train.jsonl", run))
    recipe = LoRAFineTuneRecipe("tiny", spec, run)
    staging = run / "checkpoints/step-00000004.partial-0123456789ab"
    failure = FileNotFoundError(2, "No such file or directory", str(staging))
    assert _superseded_or_none(recipe, failure) is None, "failing before any claim (a read-only PVC) is no take-over"
    fence.claim(run, "attempt-1")
    assert _superseded_or_none(recipe, failure) is None, "a failure of the folder's owner is not a take-over"

    fence.claim(run, "attempt-2")
    superseded = _superseded_or_none(recipe, failure)
    assert isinstance(superseded, fence.Superseded)
    assert "attempt attempt-2 has taken over" in str(superseded)
    assert "FileNotFoundError" in str(superseded) and "step-00000004.partial-0123456789ab" in str(superseded)


def test_each_attempt_stages_a_checkpoint_in_its_own_folder_that_never_counts_as_complete(tmp_path):
    """A stale rank finishing its shards on waking must land in its own attempt's folder, not in a newer attempt's
    staging of the same step (which that attempt would then mark complete: a checkpoint of two trainings)."""
    from lorafinetune.trainer.checkpoint import complete_checkpoints, staging_dir

    root = tmp_path / "checkpoints"
    old, new = staging_dir(root, 8, "uid-1/1"), staging_dir(root, 8, "uid-1/2")
    assert old != new and old.parent == new.parent == root, "the token's '/' must not make a subfolder"
    for folder in (old, new):
        folder.mkdir(parents=True)
        (folder / "COMPLETE.json").write_text('{"step": 8}')
    assert complete_checkpoints(tmp_path) == [], "a staging folder is never resumed from, marker or not"
