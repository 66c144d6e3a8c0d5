"""Atomic, resumable checkpoints.

Layout under <run>/checkpoints/:
    step-00000040/            complete: DeepSpeed state (adapter weights, optimizer, scheduler; frozen base weights
        ds/ ...               are excluded), one RNG file per rank, and COMPLETE.json, written last
        rng-rank0.pt ...
        COMPLETE.json
    step-00000060.partial-<attempt>/  being written, or left by a crash: never resumed from, removed on the next save

The folder is renamed from `.partial-<attempt>` only after every rank has written its part (a barrier), so a partial
checkpoint is never picked. Each attempt stages into its own folder: a rank of an older attempt that wakes up
mid-save (a frozen process, a partitioned node) finishes writing into that attempt's folder, which nobody completes,
and never into a newer attempt's staging of the same step. Resuming needs the same world size: ZeRO shards optimizer
state per rank.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist

from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.contract import CHECKPOINTS_DIR, COMPLETE_MARKER, write_json_atomic
from lorafinetune.trainer import fence
from lorafinetune.trainer.errors import ConfigError
from lorafinetune.trainer.fingerprint import changed_sections, picked_where, trained_in_other_precision

_NAME = re.compile(r"^step-(\d{8})$")
DS_TAG = "ds"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    meta: dict[str, Any]


def complete_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first. A folder without its marker (or a .partial one) does not count."""
    root = run_dir / CHECKPOINTS_DIR
    found = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _NAME.match(p.name)
        marker = p / COMPLETE_MARKER
        if m and marker.is_file():
            try:
                meta = json.loads(marker.read_text())
            except json.JSONDecodeError:
                continue
            found.append(Checkpoint(p, int(m.group(1)), meta))
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path, world_size: int, fingerprint: dict[str, Any], spec: LoRAFineTuneSpec,
                      written_precision: str) -> Checkpoint | None:  # fmt: skip
    """The newest complete checkpoint, if it can be resumed by this run; a clear error if it cannot. `spec`: this
    run's, training.precision auto resolved for this device; `written_precision`: the manifest's."""
    done = complete_checkpoints(run_dir)
    if not done:
        return None
    last = done[-1]
    if last.meta.get("worldSize") != world_size:
        raise ConfigError(
            f"checkpoint {last.path} was written by {last.meta.get('worldSize')} processes but this run has "
            f"{world_size}; ZeRO optimizer state is sharded per process. Keep resources.nodes x processesPerNode "
            f"as before, or write to a new output.uri to start over"
        )
    stored, stored_written = last.meta.get("fingerprint", {}), last.meta.get("writtenPrecision")
    changed = changed_sections(stored, fingerprint)
    if changed == ["training"]:
        trained = trained_in_other_precision(stored, spec, written_precision, stored_written)
        if trained:
            raise ConfigError(
                f"checkpoint {last.path} was trained in {trained} ({picked_where(stored_written)}), but "
                f"training.precision auto picks {spec.training.precision} here; resuming would mix two precisions. "
                f"Write training.precision: {trained} to resume it (on a cluster: create the LoRAFineTune again "
                f"with it; training is immutable), or use a new output.uri to start over"
            )
    if changed:
        raise ConfigError(
            f"checkpoint {last.path} was made with a different spec (changed: {', '.join(changed)}); resuming "
            f"would mix two trainings. Restore those fields, or write to a new output.uri to start over"
        )
    return last


def rng_state() -> dict[str, Any]:
    """Each generator's state as tensors and plain numbers only, so that it loads with weights_only=True."""
    version, internal, gauss = random.getstate()
    # legacy=True (the default) returns the Mersenne Twister tuple; the stubs type the dict form too
    name, keys, pos, has_gauss, cached_gaussian = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "hasGauss": int(has_gauss), "cachedGaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip


def restore_rng(state: dict[str, Any]) -> None:
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["hasGauss"],
                         npy["cachedGaussian"]))  # fmt: skip
    torch.set_rng_state(state["torch"])


def save(
    engine: Any, run_dir: Path, step: int, rank: int, meta: dict[str, Any], keep_last: int, leader: bool,
    attempt: str | None = None,
) -> Path:  # fmt: skip
    """Every rank must call this (DeepSpeed saves its shards collectively). Returns the complete folder.

    `leader` is the one rank that manages this run folder: rank 0 when all nodes share it (a PVC), each node's
    local rank 0 when every node has its own (scratch mirrored to S3; each then holds that node's shards only).
    `attempt`: this attempt's fencing token; the leader writes nothing once a newer attempt holds the folder."""
    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:08d}"
    staging = staging_dir(root, step, attempt)
    if leader:
        fence.check(run_dir, attempt, f"saving checkpoint step {step}")
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-save
        staging.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(str(staging), tag=DS_TAG, save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(), staging / f"rng-rank{rank}.pt")
    dist.barrier()  # sync point: every rank's files are on disk before the marker says "complete"
    if leader:
        fence.check(run_dir, attempt, f"completing checkpoint step {step}")  # the shards took a while: again
        write_json_atomic(staging / COMPLETE_MARKER, {**meta, "step": step, "savedAt": datetime.now(UTC).isoformat()})
        if final.exists():  # same step saved before a crash (e.g. by an attempt that then failed)
            shutil.rmtree(final)
        os.replace(staging, final)
        for old in complete_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old.path, ignore_errors=True)
        for stale in root.glob("step-*.partial*"):  # other attempts' (and older releases') staging
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    return final


def staging_dir(root: Path, step: int, attempt: str | None) -> Path:
    """Where `attempt` writes checkpoint `step` before completing it (tokens hold '/': named by a digest)."""
    own = hashlib.sha256(attempt.encode()).hexdigest()[:12] if attempt else "local"
    return root / f"step-{step:08d}.partial-{own}"


def load(engine: Any, ckpt: Checkpoint, rank: int) -> None:
    """Restore adapter weights, optimizer, scheduler and this rank's RNG streams (every rank calls this)."""
    with tensors_only(ckpt.path):
        path, _ = engine.load_checkpoint(str(ckpt.path), tag=DS_TAG, load_module_strict=False)
        if path is None:
            raise ConfigError(f"DeepSpeed could not read checkpoint {ckpt.path}")
        restore_rng(torch.load(ckpt.path / f"rng-rank{rank}.pt", weights_only=True))


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


@contextmanager
def tensors_only(where: Path) -> Iterator[None]:
    """Every torch.load inside reads tensors and plain data only, DeepSpeed's own loads included (they pass
    weights_only=False, which the environment variable overrides): unpickling an arbitrary object can run code, and
    an output folder can be written by whoever can write its volume or bucket, in a pod that holds credentials."""
    previous = os.environ.get(_FORCE_WEIGHTS_ONLY)
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_classes()):
            yield
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported (global: GLOBAL [\w.]+|operand \d+)|getattr on .*?allowed", str(err))
        raise ConfigError(
            f"checkpoint {where} holds more than tensors and plain data ({found[0] if found else 'an object'}); it is "
            f"refused, since loading it could run code. Delete that checkpoint folder to resume from an earlier one, "
            f"or write to a new output.uri to start over"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(_FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[_FORCE_WEIGHTS_ONLY] = previous


def _deepspeed_checkpoint_classes() -> list[Any]:
    """The plain data classes DeepSpeed pickles beside the tensors of its ZeRO optimizer state (found by loading every
    ZeRO stage's checkpoint under tensors_only; tests/trainer resumes each stage). None defines code that runs when
    unpickled: an enum, a dataclass and the loss scalers' attribute bags (DynamicLossScaler: fp16 runs, GPU only).
    Python 3.11.0 to 3.11.4 (Debian 12's 3.11.2, in the image built FROM a Debian base) pickle an enum member as
    getattr(EnumClass, name), so `builtins.getattr` resolves to _enum_member, which allows exactly that."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, (_enum_member, "builtins.getattr")]


def _enum_member(cls: Any, name: str) -> Any:
    """getattr as a checkpoint may use it: a member of an enum that is itself allowed (the unpickler only hands us
    classes it resolved from its allowlist), nothing else."""
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and name in cls.__members__:
        return cls[name]
    raise pickle.UnpicklingError(f"getattr on {cls!r}.{name}: only enum members are allowed")
