"""Fencing: only the newest attempt may publish into a run folder.

An attempt claims the folder when it starts (its token in ATTEMPT_FILE) and checks the claim right before each
irreversible step: replacing a checkpoint, marking one complete, pruning old ones, publishing the adapter. A rank of an
older attempt that wakes up after a newer one started (a partitioned node whose pods were given up, a process that
was paused) finds another token there and stops without writing.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from lorafinetune.contract import ATTEMPT_FILE, ENV_ATTEMPT, write_json_atomic
from lorafinetune.trainer.errors import TrainerError


class Superseded(TrainerError):
    """A newer attempt owns the run folder: this one must not write to it (exit FAILED: this attempt is over)."""

    holder: str | None = None  # the attempt that holds the claim now; None when there is no claim at all


def token() -> str | None:
    return os.environ.get(ENV_ATTEMPT) or None


def claim(run_dir: Path, own: str | None) -> None:
    """Make `own` the folder's attempt (the newest one to start wins)."""
    if own:
        write_json_atomic(run_dir / ATTEMPT_FILE, claim_record(own))


def claim_record(own: str) -> dict:
    return {"token": own, "claimedAt": datetime.now(UTC).isoformat()}


def check(run_dir: Path, own: str | None, what: str) -> None:
    """Raise Superseded unless the folder still belongs to `own` (no token: fencing is off)."""
    if not own:
        return
    try:
        holder = json.loads((run_dir / ATTEMPT_FILE).read_text()).get("token")
    except (FileNotFoundError, json.JSONDecodeError):
        holder = None
    check_holder(holder, own, what, str(run_dir))


def check_holder(holder: str | None, own: str | None, what: str, where: str) -> None:
    """The same check for a claim read from elsewhere (an s3:// output: trainer/remote.py)."""
    if own and holder != own:
        err = Superseded(
            f"not {what}: attempt {holder or '(unknown)'} has taken over {where} since this attempt ({own}) started"
        )
        err.holder = holder
        raise err
