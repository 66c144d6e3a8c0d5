"""Run a LoRAFineTune manifest on this machine, with the same contract as the operator's pods.

    lorafinetune run examples/quickstart.yaml --pvc quickstart-data=examples/data

One torchrun agent per `resources.nodes`, each with `processesPerNode` ranks, rendezvousing on 127.0.0.1 over
gloo: exactly what the pods do, minus Kubernetes. `pvc://claim/path` URIs map to local folders (`--pvc CLAIM=DIR`,
or `<pvc-root>/<claim>`), the rendered config and logs go into the output folder, and a run started again with the
same output resumes from its last complete checkpoint.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lorafinetune.api.manifest import LoRAFineTune
from lorafinetune.api.uris import StorageURI, parse_uri
from lorafinetune.contract import (
    CONFIG_FILE,
    ENV_ATTEMPT,
    ENV_CACHE_DIR,
    ENV_CONFIG,
    ENV_METRICS_PORT,
    ENV_RUN_DIR,
    ENV_TERMINATION_LOG,
    ExitCode,
    read_progress,
    read_termination,
    write_json_atomic,
)
from lorafinetune.local.display import ProgressDisplay, print_summary
from lorafinetune.storage import local_path

GRACE_SECONDS = 120  # time given to ranks to write a checkpoint after Ctrl-C
# torchrun's --shutdown-timeout, as pods set it: by variable, because an older torchrun (torch 2.11's) refuses the
# flag and would not start (it ignores the variable and gives the ranks its default 30 s)
TORCHRUN_ENV = {"PET_SHUTDOWN_TIMEOUT": str(GRACE_SECONDS - 10)}


@dataclass
class LocalOptions:
    pvc_root: Path = Path("runs")
    pvc_mounts: dict[str, Path] = field(default_factory=dict)
    metrics_port: int = 0
    cache_dir: Path | None = None
    extra_env: dict[str, str] = field(default_factory=dict)


def _local_uri(uri: StorageURI, opts: LocalOptions) -> str:
    """pvc:// -> file:// under the local mount of that claim; other schemes unchanged."""
    if uri.scheme != "pvc":
        return str(uri)  # the plain string: the config is also written as YAML
    base = opts.pvc_mounts.get(uri.location, opts.pvc_root / uri.location)
    return f"file://{(base / uri.path).resolve()}"


def render_local_config(lft: LoRAFineTune, opts: LocalOptions) -> dict:
    """The trainer config for a local run: the spec with pvc:// URIs replaced by the local folders they map to."""
    spec, config = lft.spec, lft.spec.to_manifest()
    config["model"]["uri"] = _local_uri(spec.model.uri, opts)
    config["dataset"]["train"] = _local_uri(spec.dataset.train, opts)
    if spec.dataset.validation is not None:
        config["dataset"]["validation"] = _local_uri(spec.dataset.validation, opts)
    config["output"]["uri"] = _local_uri(spec.output.uri, opts)
    return {"name": lft.metadata.name, "spec": config}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_run_dir(run_dir: Path, node: int, per_node: bool) -> Path:
    """Node 0 uses `run_dir`; with an s3:// output the other nodes get scratch folders of their own, as pods do."""
    return run_dir.with_name(f"{run_dir.name}.node-{node}") if per_node and node else run_dir


def _agent_env(run_dir: Path, node: int, threads: int, opts: LocalOptions, on_cpu: bool, per_node: bool,
               attempt: str) -> dict:  # fmt: skip
    env = {
        **os.environ,
        ENV_ATTEMPT: attempt,  # one per `run`: an older run still alive on this folder can no longer publish
        ENV_CONFIG: str(run_dir / CONFIG_FILE),
        ENV_RUN_DIR: str(_node_run_dir(run_dir, node, per_node)),
        ENV_TERMINATION_LOG: str(_termination_path(run_dir, attempt, node)),
        ENV_METRICS_PORT: str(opts.metrics_port if node == 0 else 0),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        **TORCHRUN_ENV,
        **opts.extra_env,
    }
    if opts.cache_dir:
        env[ENV_CACHE_DIR] = str(opts.cache_dir)
    if on_cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_local(lft: LoRAFineTune, opts: LocalOptions, show_progress: bool = True) -> int:
    """Launch the ranks, show progress, and return the trainer's exit code (see contract.ExitCode)."""
    res = lft.spec.resources
    config = render_local_config(lft, opts)
    out_uri = parse_uri(config["spec"]["output"]["uri"], ("file", "s3"))
    # An s3:// output is mirrored from a local scratch folder, as in a pod (credentials: AWS_* in the environment).
    run_dir = local_path(out_uri) if out_uri.scheme == "file" else (
        opts.pvc_root / ".s3-scratch" / out_uri.location / out_uri.path
    ).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / CONFIG_FILE, config)
    for stale in (run_dir / "logs").glob("termination-*.json"):
        stale.unlink()

    on_cpu = res.gpus_per_node == 0
    threads = max(1, (os.cpu_count() or 1) // res.world_size) if on_cpu else 4
    port = _free_port()
    attempt = f"local-{uuid.uuid4().hex[:12]}"
    agents = []
    for node in range(res.nodes):
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            f"--nnodes={res.nodes}", f"--node-rank={node}", f"--nproc-per-node={res.procs_per_node}",
            "--master-addr=127.0.0.1", f"--master-port={port}",
            "-m", "lorafinetune.trainer",
        ]  # fmt: skip
        log = open(run_dir / "logs" / f"node-{node}.log", "ab")
        agents.append(
            subprocess.Popen(
                cmd, env=_agent_env(run_dir, node, threads, opts, on_cpu, lft.spec.output.per_node_scratch, attempt),
                stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches only us; we forward it deliberately
                preexec_fn=_stop_with(os.getpid()),
            )
        )  # fmt: skip
    display = ProgressDisplay(lft.metadata.name, enabled=show_progress)
    interrupted = False
    # SIGTERM (a scheduler's stop, `timeout`, `kill`) is a Ctrl-C: the ranks checkpoint and stop.
    previous_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        while any(a.poll() is None for a in agents):
            display.update(read_progress(run_dir))
            time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
        display.note("interrupt: asking the ranks to checkpoint and stop (Ctrl-C again to kill)")
        for a in agents:
            _signal_group(a, signal.SIGTERM)
        try:
            for a in agents:
                a.wait(timeout=GRACE_SECONDS)
        except (KeyboardInterrupt, subprocess.TimeoutExpired):
            for a in agents:
                _signal_group(a, signal.SIGKILL)
    finally:
        signal.signal(signal.SIGTERM, previous_term)
    display.update(read_progress(run_dir))
    display.close()
    codes = [a.wait() for a in agents]
    if all(c == 0 for c in codes) and not interrupted:
        print_summary(run_dir, lft.spec.output.uri)
        return ExitCode.OK
    return _report_failure(run_dir, res.nodes, interrupted, attempt)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_with(parent: int) -> Callable[[], None]:
    """preexec_fn for an agent: SIGTERM it when this process dies, however it dies (SIGKILL included), so that no
    training outlives the command that started it. Linux only; elsewhere a no-op."""

    def arrange() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl: the signal would never come
            os.kill(os.getpid(), signal.SIGTERM)

    return arrange


_PR_SET_PDEATHSIG = 1


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _termination_path(run_dir: Path, attempt: str, node: int) -> Path:
    """One file per run and node (a pod's /dev/termination-log): a run started later on the same folder, while an
    older one is still alive, must not mix its record with the older one's."""
    return run_dir / "logs" / f"termination-{attempt}-node{node}.json"


def _report_failure(run_dir: Path, nodes: int, interrupted: bool, attempt: str) -> int:
    read = (read_termination(_termination_path(run_dir, attempt, n)) for n in range(nodes))
    records = [r for r in read if r is not None]
    permanent = [r for r in records if r.permanent]
    record = (permanent or records)[0] if records else None
    if record and record.exit_code == ExitCode.INTERRUPTED or (interrupted and not permanent):
        print(f"stopped; the last complete checkpoint is in {run_dir}/checkpoints. Run the same command to resume.")
        return ExitCode.INTERRUPTED
    if record:
        print(f"training failed: {record.reason}: {record.message}", file=sys.stderr)
        code = ExitCode(record.exit_code) if record.exit_code in set(ExitCode) else ExitCode.FAILED
    else:
        code = ExitCode.FAILED
    tail = (run_dir / "logs" / "node-0.log").read_text(errors="replace").splitlines()[-25:]
    print(f"last lines of {run_dir}/logs/node-0.log:\n  " + "\n  ".join(tail), file=sys.stderr)
    hint = "fix the manifest or data; retrying will not help" if code.permanent else "run again to resume"
    print(f"exit code {int(code)} ({code.name}): {hint}", file=sys.stderr)
    return code
