"""What a tenant's files and endpoints cannot do to the trainer or the operator: run code from a checkpoint, write
outside a download folder, or hold a reconcile with a slow or endless /metrics answer."""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

from lorafinetune.operator.progress import fetch
from lorafinetune.s3 import S3Error, local_relative
from lorafinetune.trainer.checkpoint import restore_rng, rng_state


def test_rng_state_round_trips_through_a_tensors_only_load(tmp_path: Path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # cached gaussians are part of the state
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


class _Planted:
    """An object whose unpickling runs code: what write access to an output folder could plant in a checkpoint."""

    def __reduce__(self) -> tuple[Callable, tuple]:
        return (Path.touch, (Path("/tmp/lft-planted-by-a-checkpoint"),))


def test_a_checkpoint_file_that_carries_code_is_refused_not_run(tmp_path: Path):
    from lorafinetune.trainer.checkpoint import tensors_only
    from lorafinetune.trainer.errors import ConfigError

    witness = Path("/tmp/lft-planted-by-a-checkpoint")
    witness.unlink(missing_ok=True)
    planted = tmp_path / "rng-rank0.pt"
    torch.save({"python": _Planted()}, planted)
    refused = r"more than tensors and plain data \(Unsupported global: GLOBAL pathlib.Path\)"
    with pytest.raises(ConfigError, match=refused):
        with tensors_only(tmp_path):
            torch.load(planted, weights_only=False)  # what DeepSpeed's loader passes
    assert not witness.exists()


class _EnumByGetattr:
    """How Python 3.11.0-3.11.4 pickle an enum member (DeepSpeed's ZeroStageEnum in every ZeRO checkpoint)."""

    def __init__(self, cls: type, name: str):
        self.cls, self.name = cls, name

    def __reduce__(self) -> tuple[Callable, tuple]:
        return (getattr, (self.cls, self.name))


def test_an_enum_member_pickled_by_getattr_loads_and_nothing_else_does(tmp_path: Path):
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from lorafinetune.trainer.checkpoint import tensors_only
    from lorafinetune.trainer.errors import ConfigError

    torch.save({"zero_stage": _EnumByGetattr(ZeroStageEnum, "gradients")}, tmp_path / "optim.pt")
    with tensors_only(tmp_path):
        assert torch.load(tmp_path / "optim.pt", weights_only=False) == {"zero_stage": ZeroStageEnum.gradients}
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    torch.save({"x": _EnumByGetattr(LossScaler, "__init__")}, tmp_path / "evil.pt")  # an allowed class, not an enum
    refused = "getattr on .*LossScaler.*__init__: only enum members are allowed"
    with pytest.raises(ConfigError, match=refused), tensors_only(tmp_path):
        torch.load(tmp_path / "evil.pt", weights_only=False)


@pytest.mark.parametrize(
    ("key", "prefix", "expected"),
    [
        ("models/m/config.json", "models/m", "config.json"),
        ("models/m/a/b.bin", "models/m", "a/b.bin"),
        ("models/m", "models/m", "m"),  # the prefix names one object
        ("models/m/sub/", "models/m", None),  # a console's folder placeholder
        ("x.bin", "", "x.bin"),
    ],
)
def test_object_keys_map_to_paths_inside_the_download_folder(key: str, prefix: str, expected: str | None):
    assert local_relative(key, prefix) == expected


@pytest.mark.parametrize(
    "key",
    ["models/m/../../../home/u/.bashrc", "models/m/a/../../b", "models/m//etc/passwd", "models/m/./x",
     "models/m/a\\..\\b", "models/m/.lft-download.json"],
)  # fmt: skip
def test_object_keys_that_would_escape_or_collide_are_refused(key: str):
    with pytest.raises(S3Error, match="refusing to download") as err:
        local_relative(key, "models/m")
    assert err.value.permanent


@contextmanager
def _server(handle: Callable[[socket.socket], None]) -> Iterator[int]:
    """A TCP server on 127.0.0.1 that answers every connection with `handle`."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                try:
                    handle(conn)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()


def test_a_metrics_endpoint_that_trickles_forever_is_given_up_on_at_the_deadline():
    def trickle(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        for _ in range(100):  # a byte every 0.2 s: each read alone is well inside a 1 s socket timeout
            conn.sendall(b"#")
            time.sleep(0.2)

    with _server(trickle) as port:
        started = time.monotonic()
        assert fetch("127.0.0.1", port, previous=None, timeout=1.0) is None
        assert time.monotonic() - started < 2.0


def test_an_oversized_or_malformed_metrics_answer_means_no_progress():
    def endless(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n")
        while True:
            conn.sendall(b"lorafinetune_global_step 1\n" * 4096)

    with _server(endless) as port:
        assert fetch("127.0.0.1", port, previous=None, timeout=5.0, max_bytes=1 << 20) is None

    def garbage(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nlorafinetune_global_step\nlorafinetune_total_steps inf\n"
                     b"lorafinetune_train_loss nan\nlorafinetune_global_step 7\n\xff\xfe")  # fmt: skip

    with _server(garbage) as port:
        progress = fetch("127.0.0.1", port, previous=None)
        assert (progress.step, progress.total_steps, progress.train_loss) == (7, None, None)

    def not_found(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.0 404 Not Found\r\n\r\nlorafinetune_global_step 7\n")

    with _server(not_found) as port:
        assert fetch("127.0.0.1", port, previous=None) is None
