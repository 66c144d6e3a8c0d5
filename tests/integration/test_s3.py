"""The S3 transfer layer against a real S3-compatible server (Versity S3 gateway, built from Go modules) on
127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafinetune.contract import read_termination
from lorafinetune.s3 import S3Error, S3Location, S3Store
from tests.conftest import REPO, free_port, run_cli, wait_for, write_manifest
from tests.manifests import manifest, tiny_cpu_run

pytestmark = pytest.mark.integration
ACCESS, SECRET = "lft-test-access", "lft-test-secret-key"


class S3Server:
    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.binary = subprocess.run(
            [REPO / "hack/s3/build.sh"], capture_output=True, text=True, check=True
        ).stdout.strip()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--access", ACCESS, "--secret", SECRET, "--port", f"127.0.0.1:{self.port}",
             "posix", str(self.root / "data")],
            stdout=(self.root / "server.log").open("ab"), stderr=subprocess.STDOUT,
        )  # fmt: skip

        def up() -> bool:
            import socket

            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_for(up, 30, "the S3 server")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Store:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    s = S3Store(endpoint_url=s3_server.url, attempts=2, backoff_seconds=0.2, multipart_threshold=5 << 20)
    bucket = f"b{time.time_ns()}"
    s.client.create_bucket(Bucket=bucket)
    s.bucket = bucket  # type: ignore[attr-defined]
    return s


def make_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 16}))
    (folder / "adapter_model.safetensors").write_bytes(os.urandom(12 << 20))  # > threshold: multipart upload
    (folder / "sub").mkdir()
    (folder / "sub" / "README.md").write_text("card")
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_publish_then_download_round_trip_with_cache(store: S3Store, tmp_path: Path):
    local = make_adapter(tmp_path / "adapter")
    uri = f"s3://{store.bucket}/runs/demo/adapter"
    assert store.publish_dir(local, uri) == 3
    assert store.is_complete(uri)
    cache = tmp_path / "cache"
    store.download_prefix(uri, cache)
    for name in ("adapter_config.json", "adapter_model.safetensors", "sub/README.md"):
        assert digest(cache / name) == digest(local / name), name
    assert (cache / "COMPLETE.json").is_file()
    before = (cache / "adapter_model.safetensors").stat().st_mtime_ns
    store.download_prefix(uri, cache)  # unchanged objects are not fetched again
    assert (cache / "adapter_model.safetensors").stat().st_mtime_ns == before


def test_a_published_folder_is_never_overwritten(store: S3Store, tmp_path: Path):
    uri = f"s3://{store.bucket}/adapter"
    store.publish_dir(make_adapter(tmp_path / "a"), uri)
    with pytest.raises(S3Error, match="already holds a complete upload; it is never overwritten") as err:
        store.publish_dir(make_adapter(tmp_path / "b"), uri)
    assert err.value.permanent


def test_wrong_credentials_are_a_clear_permanent_error(s3_server: S3Server, monkeypatch, tmp_path: Path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    bad = S3Store(endpoint_url=s3_server.url, attempts=3, backoff_seconds=0.1)
    with pytest.raises(S3Error, match="the S3 credentials were rejected") as err:
        bad.download_prefix("s3://anything/model", tmp_path)
    assert err.value.permanent and "not-the-secret" not in str(err.value)


def test_missing_bucket_and_missing_objects_are_permanent(store: S3Store, tmp_path: Path):
    with pytest.raises(S3Error, match="the bucket does not exist") as err:
        store.download_prefix("s3://no-such-bucket-here/model", tmp_path)
    assert err.value.kind == "bucket"
    with pytest.raises(S3Error, match="no objects under this prefix") as err:
        store.download_prefix(f"s3://{store.bucket}/nothing/here", tmp_path)
    assert err.value.permanent


def test_server_stopped_during_an_upload_fails_clearly_and_never_marks_complete(
    s3_server: S3Server, store: S3Store, tmp_path: Path
):
    local = make_adapter(tmp_path / "adapter")
    uri = f"s3://{store.bucket}/interrupted"
    with pytest.raises(S3Error) as err:
        store.publish_dir(local, uri, on_file=lambda name: s3_server.stop())  # dies after the first file
    assert not err.value.permanent, "a lost connection is worth retrying"
    s3_server.start()
    assert not store.is_complete(uri), "readers must not see a partial adapter as complete"
    assert store.publish_dir(local, uri) == 3  # the retry completes it
    assert store.is_complete(uri)


def local_s3_run(tmp_path: Path, tiny_model: Path, chat_data: Path, spec: dict) -> tuple[dict, tuple, Path]:
    """The environment, `lorafinetune run` arguments and scratch root of a local run whose output is in S3."""
    lft = manifest("tiny", tiny_cpu_run(tiny_model, chat_data, tmp_path / "x"), **spec)
    path = write_manifest(tmp_path / "m.yaml", lft)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS, "AWS_SECRET_ACCESS_KEY": SECRET,
           "LFT_CACHE_DIR": str(tmp_path / "cache")}  # fmt: skip
    scratch = tmp_path / "pvc"
    return env, ("run", str(path), "--quiet", "--pvc-root", str(scratch)), scratch


def _output_spec(store: S3Store, root: str, monkeypatch):
    """A spec whose output is `root` on the test server, with the credentials in the environment (as in a pod)."""
    from lorafinetune.api.spec import LoRAFineTuneSpec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    return LoRAFineTuneSpec.model_validate({
        "model": {"uri": "hf://a/b"}, "dataset": {"train": "file:///d.jsonl"}, "training": {"maxSteps": 1},
        "output": {"uri": root}, "s3": {"endpointUrl": store.client.meta.endpoint_url},
    })  # fmt: skip


def test_pruning_deletes_old_and_abandoned_checkpoints_marker_first(store: S3Store, tmp_path: Path, monkeypatch):
    from lorafinetune.trainer.remote import OutputMirror

    root = f"s3://{store.bucket}/run"
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "state.pt").write_bytes(b"x" * 1000)
    (folder / "COMPLETE.json").write_text("{}")
    for step in (2, 4, 6):
        store.publish_dir(folder, f"{root}/checkpoints/step-{step:08d}")
    store.upload_files(folder, f"{root}/checkpoints/step-00000001")  # abandoned by a crash mid-upload
    store.upload_files(folder, f"{root}/checkpoints/step-00000008")  # being uploaded right now by another node
    spec = _output_spec(store, root, monkeypatch)
    mirror = OutputMirror(spec, tmp_path / "run")
    assert mirror.prune_checkpoints(keep_last=2) == ["step-00000001", "step-00000002"]
    assert store.child_folders(f"{root}/checkpoints") == ["step-00000004", "step-00000006", "step-00000008"]
    assert store.complete_children(f"{root}/checkpoints") == ["step-00000004", "step-00000006"]
    assert mirror.prune_checkpoints(keep_last=2) == []


def test_an_attempt_superseded_in_s3_writes_nothing_there(store: S3Store, tmp_path: Path, monkeypatch):
    """The fence on an s3:// output: each node's scratch folder holds only its own claim, so the newest attempt
    also claims the S3 prefix, and an older one (a paused rank, a partitioned node) checks it before writing."""
    from lorafinetune.trainer.fence import Superseded
    from lorafinetune.trainer.remote import OutputMirror

    root = f"s3://{store.bucket}/fenced"
    spec = _output_spec(store, root, monkeypatch)
    old, new = OutputMirror(spec, tmp_path / "old-node"), OutputMirror(spec, tmp_path / "new-node")
    old.claim("uid-1/attempt-1")
    old.check("uid-1/attempt-1", "mirroring a checkpoint")  # its own claim: fine
    new.claim("uid-1/attempt-2")  # the next attempt starts while the old rank is paused
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")

    def publish(mirror: OutputMirror, own: str) -> None:  # as the recipe does: check the claim, then push
        mirror.check(own, "publishing the adapter")
        mirror.push(adapter, "adapter")

    with pytest.raises(Superseded, match="attempt uid-1/attempt-2 has taken over s3://"):
        publish(old, "uid-1/attempt-1")
    assert store.child_folders(root) == [], "nothing of the old attempt reached the output"
    publish(new, "uid-1/attempt-2")
    assert store.is_complete(f"{root}/adapter")


def test_training_reads_inputs_from_s3_mirrors_outputs_and_a_new_pod_resumes_from_s3(
    s3_server: S3Server, store: S3Store, tmp_path: Path, tiny_model: Path, chat_data: Path
):
    from safetensors.torch import load_file

    b = store.bucket
    store.publish_dir(tiny_model, f"s3://{b}/models/tiny")
    store.client.upload_file(str(chat_data), b, "data/train.jsonl")
    out = f"s3://{b}/runs/tiny"
    spec = {
        "model": {"uri": f"s3://{b}/models/tiny"},
        "dataset": {"train": f"s3://{b}/data/train.jsonl"},
        "output": {"uri": out},
        "s3": {"endpointUrl": s3_server.url, "credentialsSecret": "unused-locally"},
        "training": {"maxSteps": 6},
        "checkpointing": {"everySteps": 2},
    }
    env, args, scratch = local_s3_run(tmp_path, tiny_model, chat_data, spec)

    # 1. A crash after step 5: checkpoints 2 and 4 are complete in S3, no adapter there.
    proc = run_cli(*args, env={**env, "LFT_FAIL_AT_STEP": "5"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert store.complete_children(f"{out}/checkpoints") == ["step-00000002", "step-00000004"]
    assert not store.is_complete(f"{out}/adapter")

    # 2. A new pod: nothing local. It fetches checkpoint 4 from S3, resumes, and publishes the adapter there.
    import shutil

    shutil.rmtree(scratch)
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = next(scratch.rglob("node-0.log")).read_text()
    assert "fetched checkpoint step-00000004" in log and "resuming from step 4" in log
    assert store.is_complete(f"{out}/adapter")
    local = store.download_prefix(f"{out}/adapter", tmp_path / "adapter")
    tensors = load_file(local / "adapter_model.safetensors")
    assert len(tensors) == 2 * 7 * 2 and any(t.abs().sum() > 0 for n, t in tensors.items() if "lora_B" in n)
    summary = json.loads((local / "training_summary.json").read_text())
    assert summary["steps"] == 6 and summary["adapter"]["sha256"] == digest(local / "adapter_model.safetensors")
    assert summary["adapter"]["uri"] == f"{out}/adapter", "the summary names where the adapter is published"

    # 3. Running again finds the published adapter, does nothing, and reports the adapter in S3 again.
    shutil.rmtree(scratch)
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already holds a complete adapter of this spec" in next(scratch.rglob("node-0.log")).read_text()
    (record,) = [read_termination(p) for p in scratch.rglob("termination-*.json")]
    assert record.adapter is not None and record.adapter.uri == f"{out}/adapter"
    assert record.adapter.sha256 == summary["adapter"]["sha256"]


def test_two_nodes_with_their_own_scratch_checkpoint_to_s3_and_resume_from_it(
    s3_server: S3Server, store: S3Store, tmp_path: Path, tiny_model: Path, chat_data: Path
):
    """Two nodes (one rank each), each with its own scratch folder as pods have: each uploads its own shards, rank 0
    marks the checkpoint complete, old checkpoints are pruned in S3, and both nodes resume from S3."""
    out = f"s3://{store.bucket}/runs/two-nodes"
    spec = {
        "output": {"uri": out},
        "s3": {"endpointUrl": s3_server.url, "credentialsSecret": "unused-locally"},
        "training": {"maxSteps": 6},
        "checkpointing": {"everySteps": 2, "keepLast": 1},
        "resources": {"nodes": 2, "processesPerNode": 1},
    }
    env, args, scratch = local_s3_run(tmp_path, tiny_model, chat_data, spec)

    proc = run_cli(*args, env={**env, "LFT_FAIL_AT_STEP": "5"})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert store.child_folders(f"{out}/checkpoints") == ["step-00000004"], "step 2 pruned (keepLast 1)"
    keys = {o["Key"].rsplit("/", 1)[-1] for o in store._objects(S3Location.parse(f"{out}/checkpoints/step-00000004"))}
    assert {"rng-rank0.pt", "rng-rank1.pt", "COMPLETE.json"} <= keys, "node 1's shards were uploaded by node 1"
    assert [p.name for p in scratch.rglob("*.node-1")], "node 1 had a scratch folder of its own"

    # Run again with the scratch folders kept (the harder case for a local run: each node's own step-4 folder holds
    # only that node's shards). Both nodes must resume from the whole step 4 in S3.
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = next(scratch.rglob("node-1.log")).read_text()
    assert "resuming from step 4" in next(scratch.rglob("node-0.log")).read_text()
    assert "fetched checkpoint step-00000004" in log, "node 1 fetched the whole checkpoint for itself"
    assert store.is_complete(f"{out}/adapter")
    # the last step is checkpointed before the adapter is published; keepLast 1 then pruned step 4
    assert store.child_folders(f"{out}/checkpoints") == ["step-00000006"]
