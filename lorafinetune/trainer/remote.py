"""Where the trainer's inputs and outputs live when they are on S3.

Inputs (model prefix, dataset files) are downloaded once into the cache, per node, under a file lock so the local
ranks share one copy. Outputs stay in the local run folder (the contract's LFT_RUN_DIR, scratch space in the pod)
and are mirrored to `spec.output.uri`: each complete checkpoint right after it is written (on several nodes, each
node uploads its own shards and rank 0 then writes the marker), the adapter when it is published, always with
COMPLETE.json last; checkpoints beyond `checkpointing.keepLast` are deleted, marker first. A run whose local folder is
empty (a new pod) resumes from the newest complete checkpoint in S3.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from pathlib import Path

from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.api.uris import StorageURI
from lorafinetune.contract import ADAPTER_DIR, ATTEMPT_FILE, CHECKPOINTS_DIR, COMPLETE_MARKER, MERGED_DIR
from lorafinetune.s3 import S3Error, S3Store
from lorafinetune.storage import StorageError, local_path
from lorafinetune.trainer import fence
from lorafinetune.trainer.errors import ConfigError, DataError, ModelError, TrainerError

PULLED_MARKER = ".from-s3"  # a local checkpoint downloaded whole from S3 (not one node's own shards)


def _store(spec: LoRAFineTuneSpec) -> S3Store:
    s3 = spec.s3
    return S3Store(endpoint_url=s3.endpoint_url if s3 else None, region=s3.region if s3 else None)


def _error(err: S3Error, kind: type[TrainerError]) -> TrainerError:
    return kind(str(err)) if err.permanent else TrainerError(str(err))


def fetch_input(spec: LoRAFineTuneSpec, uri: StorageURI, cache: Path, is_model: bool) -> Path:
    """A local path for a model folder or a dataset file, downloading s3:// URIs into the cache first."""
    if uri.scheme != "s3":
        try:
            return local_path(uri)
        except StorageError as err:
            raise ConfigError(str(err)) from None
    target = cache / "s3" / hashlib.sha256(uri.encode()).hexdigest()[:16]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the other local ranks wait and reuse it
        try:
            if is_model:
                return _store(spec).download_prefix(uri, target)
            return _store(spec).download_file(uri, target / Path(uri.path).name)
        except S3Error as err:
            raise _error(err, ModelError if is_model else DataError) from None


class OutputMirror:
    """Mirrors checkpoints and the adapter from the local run folder to an s3:// output (no-op otherwise)."""

    def __init__(self, spec: LoRAFineTuneSpec, run_dir: Path):
        self.remote = spec.output.uri.rstrip("/") if spec.output.per_node_scratch else ""  # "": not S3
        self.run_dir = run_dir
        self.store = _store(spec) if self.remote else None
        # Several nodes, each with its own scratch folder: a local checkpoint holds one node's shards only, so S3 is
        # the only place a checkpoint is whole, and every node resumes from the same S3 checkpoint.
        self.s3_is_truth = bool(self.remote) and spec.resources.nodes > 1

    # Fencing (fence.py) where the output is: each node's scratch folder holds only its own claim, so the attempt
    # also claims the S3 prefix, and checks that claim before each irreversible write there.
    def claim(self, own: str | None) -> None:
        if (store := self.store) is not None and own:
            try:
                store.write_json(f"{self.remote}/{ATTEMPT_FILE}", fence.claim_record(own))
            except S3Error as err:
                raise _error(err, ConfigError) from None

    def check(self, own: str | None, what: str) -> None:
        if (store := self.store) is None or not own:
            return
        try:
            holder = (store.read_json(f"{self.remote}/{ATTEMPT_FILE}") or {}).get("token")
        except S3Error as err:
            raise _error(err, ConfigError) from None
        fence.check_holder(holder, own, what, self.remote)

    def published_marker(self) -> dict | None:
        if (store := self.store) is None:
            return None
        try:
            return store.read_json(f"{self.remote}/{ADAPTER_DIR}/{COMPLETE_MARKER}")
        except S3Error as err:
            raise _error(err, ConfigError) from None

    def pull_latest_checkpoint(self) -> str | None:
        """Download the newest complete remote checkpoint when the local folder does not have it (single node: when
        the local folder has no complete checkpoint at all). Every local rank calls this; a file lock makes the first
        one download and the others find it done."""
        if (store := self.store) is None:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / ".pull.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._pull(store)

    def _pull(self, store: S3Store) -> str | None:
        local_root = self.run_dir / CHECKPOINTS_DIR
        if not self.s3_is_truth and any(local_root.glob(f"*/{COMPLETE_MARKER}")):
            return None
        try:
            names = store.complete_children(f"{self.remote}/{CHECKPOINTS_DIR}")
        except S3Error as err:
            raise _error(err, ConfigError) from None
        if self.s3_is_truth:  # keep only a whole copy of the newest S3 checkpoint; the rest is one node's shards
            for p in (p for p in local_root.glob("*") if p.is_dir()):
                if not (names and p.name == names[-1] and (p / PULLED_MARKER).exists()):
                    shutil.rmtree(p, ignore_errors=True)
        if not names or (local_root / names[-1] / COMPLETE_MARKER).exists():
            return None
        final = local_root / names[-1]
        staging = final.with_name(final.name + ".partial")  # never picked for resume until renamed
        shutil.rmtree(staging, ignore_errors=True)
        try:
            store.download_prefix(f"{self.remote}/{CHECKPOINTS_DIR}/{names[-1]}", staging)
            (staging / PULLED_MARKER).touch()
        except S3Error as err:
            if err.kind == "object":  # pruned while we listed (an older attempt still saving): retrying helps
                raise TrainerError(f"checkpoint {names[-1]} disappeared while downloading it: {err}") from None
            raise _error(err, ConfigError) from None
        os.replace(staging, final)
        return names[-1]

    def push(self, local: Path, relative: str) -> None:
        """Publish a folder that exists whole in this run folder (the adapter; single-node checkpoints)."""
        if (store := self.store) is None:
            return
        try:
            store.publish_dir(local, f"{self.remote}/{relative}")
        except S3Error as err:
            if err.kind == "exists" and relative.startswith((CHECKPOINTS_DIR, MERGED_DIR)):
                return  # the same step or merged model, mirrored by an attempt that then failed: identical on resume
            raise _error(err, ConfigError) from None

    # A multi-node checkpoint is spread over the nodes' scratch folders: each node uploads its own shards, then,
    # after a barrier, rank 0 marks the prefix complete.
    def push_shards(self, local: Path, relative: str) -> None:
        if (store := self.store) is None:
            return
        try:
            if not store.is_complete(f"{self.remote}/{relative}"):  # else mirrored by an earlier attempt
                store.upload_files(local, f"{self.remote}/{relative}")
        except S3Error as err:
            raise _error(err, ConfigError) from None

    def mark_complete(self, local: Path, relative: str) -> None:
        if (store := self.store) is None:
            return
        try:
            if not store.is_complete(f"{self.remote}/{relative}"):
                store.mark_complete(local, f"{self.remote}/{relative}")
        except S3Error as err:
            raise _error(err, ConfigError) from None

    def prune_checkpoints(self, keep_last: int) -> list[str]:
        """Delete remote checkpoints older than the newest `keep_last` complete ones (as the local folder does),
        and older incomplete ones left by a crash mid-upload. Best effort: credentials without delete rights or a
        bucket with object lock must not fail a run, so errors are printed, not raised. Returns the names deleted."""
        if (store := self.store) is None:
            return []
        root = f"{self.remote}/{CHECKPOINTS_DIR}"
        deleted: list[str] = []
        try:
            complete = store.complete_children(root)
            if len(complete) <= keep_last:
                return []
            oldest_kept = complete[-keep_last]
            for name in (n for n in store.child_folders(root) if n < oldest_kept):
                store.delete_folder(f"{root}/{name}")
                deleted.append(name)
        except S3Error as err:
            print(f"warning: could not prune old checkpoints in {root} (training goes on): {err}", flush=True)
        return deleted
