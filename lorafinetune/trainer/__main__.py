"""Trainer entry point, one process per GPU (or CPU slot), started by torchrun:

    LFT_CONFIG=config.json LFT_RUN_DIR=/output/run torchrun --nproc-per-node 2 -m lorafinetune.trainer

The exit code tells the launcher whether a retry can help (see lorafinetune.contract.ExitCode).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
import traceback
from pathlib import Path

from lorafinetune.api.status import AdapterRef
from lorafinetune.contract import (
    ADAPTER_DIR,
    ENV_CONFIG,
    ENV_FAIL_AT_STEP,
    ENV_RUN_DIR,
    ENV_TERMINATION_LOG,
    ExitCode,
    TerminationRecord,
)


def main() -> int:
    config_path, run_dir = os.environ.get(ENV_CONFIG), os.environ.get(ENV_RUN_DIR)
    if not config_path or not run_dir:
        print(f"the trainer needs {ENV_CONFIG} and {ENV_RUN_DIR} in its environment", file=sys.stderr)
        return ExitCode.INVALID_CONFIG
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "" or not _has_cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
        from lorafinetune.trainer.heap import release_freed_buffers

        release_freed_buffers()  # the resident set follows the live tensors, as the memory plan counts them

    from lorafinetune.api.spec import LoRAFineTuneSpec
    from lorafinetune.trainer.errors import TrainerError
    from lorafinetune.trainer.fingerprint import (
        changed_sections,
        picked_where,
        spec_fingerprint,
        trained_in_other_precision,
    )
    from lorafinetune.trainer.model import with_concrete_precision
    from lorafinetune.trainer.output import adapter_of, published_adapter
    from lorafinetune.trainer.recipe import LoRAFineTuneRecipe

    config = json.loads(Path(config_path).read_text())
    written = LoRAFineTuneSpec.model_validate(config["spec"])  # as the manifest says it; the recipe resolves it too
    run = Path(run_dir)
    rank = int(os.environ.get("RANK", "0"))
    on_gpu = written.resources.gpus_per_node > 0 and _has_cuda()
    try:  # training.precision auto becomes what this device computes natively, before anything is compared with it
        spec = with_concrete_precision(written, on_gpu, int(os.environ.get("LOCAL_RANK", "0")))
    except TrainerError as unusable:  # a GPU this rank cannot have
        print(f"[rank {rank}] {type(unusable).__name__}: {unusable}", file=sys.stderr, flush=True)
        _write_termination(unusable.exit_code, type(unusable).__name__, str(unusable))
        return unusable.exit_code
    if spec is not written and rank == 0:
        print(f"training.precision auto: {spec.training.precision} on this {'GPU' if on_gpu else 'CPU'}", flush=True)
    from lorafinetune.trainer.remote import OutputMirror

    mirror = OutputMirror(spec, run)
    # An s3:// output is published once its marker is in S3: a scratch folder's own may predate a push that failed.
    published = mirror.published_marker() if mirror.remote else published_adapter(run)
    if published is not None:  # never retrain over, or overwrite, a published adapter
        stored = published.get("fingerprint", {})
        changed = changed_sections(stored, spec_fingerprint(spec))
        # auto may have picked another precision where the adapter was trained: the same spec, as written
        stored_written, precision = published.get("writtenPrecision"), written.training.precision
        trained = (trained_in_other_precision(stored, spec, precision, stored_written)
                   if changed == ["training"] else None)  # fmt: skip
        if changed and not trained:
            message = (f"{run} already holds an adapter trained with a different spec (changed: "
                       f"{', '.join(changed)}); it is left untouched. Use a new output.uri to train again")
            if rank == 0:
                print(message, file=sys.stderr)
            # Every rank records it: the first rank to exit makes torchrun stop the others, rank 0 perhaps before
            # it wrote anything, and without a record the launcher only sees torchrun's 1 (a retry).
            _write_termination(ExitCode.INVALID_CONFIG, "OutputHoldsAnotherAdapter", message)
            return ExitCode.INVALID_CONFIG
        if rank == 0:
            how = f" (trained in {trained}, {picked_where(stored_written)})" if trained else ""
            print(f"{run} already holds a complete adapter of this spec{how}; nothing to do")
            # A retry after the adapter was published (the pod lost before it reported): report it again.
            adapter = adapter_of(published)
            if adapter is not None and mirror.remote:  # an older trainer's marker names the scratch folder
                adapter = adapter.model_copy(update={"uri": f"{mirror.remote}/{ADAPTER_DIR}"})
            _write_termination(ExitCode.OK, "Completed", "the adapter was already published", adapter)
        return ExitCode.OK
    started = time.time()
    recipe = LoRAFineTuneRecipe(config["name"], written, run)
    crash_after = int(os.environ.get(ENV_FAIL_AT_STEP, "0") or 0)
    if crash_after and rank == 0:
        recipe.after_step.append(lambda step: _crash(step, crash_after))
    try:
        recipe.setup()
        recipe.train()
        adapter = recipe.save_adapter(started)
        recipe.cleanup()
        if adapter is not None:  # rank 0: the operator copies this into status.adapter
            _write_termination(ExitCode.OK, "Completed", "the adapter is published", adapter=adapter)
        return ExitCode.OK
    except Exception as raised:
        if isinstance(raised, TrainerError):
            err: TrainerError | None = raised
        else:
            traceback.print_exc()  # on every rank: the failure itself, whatever it turns out to have been caused by
            err = _superseded_or_none(recipe, raised)
        if err is None:
            _write_termination(ExitCode.FAILED, type(raised).__name__, str(raised))
            return ExitCode.FAILED
        if rank == 0 or err.exit_code.permanent:
            print(f"[rank {rank}] {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            _write_termination(err.exit_code, type(err).__name__, str(err))
        if err.exit_code == ExitCode.INTERRUPTED:
            recipe.cleanup()
        return err.exit_code


def _superseded_or_none(recipe, raised: Exception):  # noqa: ANN001, ANN202 (the trainer's modules load lazily here)
    """An unexpected failure of a rank whose attempt a newer one has taken over is that take-over (the newer attempt
    removed what this one was writing to), reported as such, with the failure it caused."""
    superseded = recipe.superseded()
    if superseded is not None:
        superseded.args = (f"{superseded} (it made this attempt fail with {type(raised).__name__}: {raised})",)
    return superseded


def _crash(step: int, at: int) -> None:
    """Fault injection for tests (ENV_FAIL_AT_STEP): a crash right after the step, not a clean exit."""
    if step == at:
        os._exit(ExitCode.FAILED)


def _write_termination(code: ExitCode, reason: str, message: str, adapter: AdapterRef | None = None) -> None:
    """Kubernetes surfaces this file as the container's termination message; the local runner reads it too.

    The first record wins: every rank of a node shares the file, and once one rank fails with the cause (a data
    error, a superseded attempt), its peers fail too, with "connection closed by peer", which must not replace it."""
    path = os.environ.get(ENV_TERMINATION_LOG)
    if path:
        record = TerminationRecord(exit_code=int(code), reason=reason, message=message[-3000:], adapter=adapter)
        try:
            with open(path, "a+") as f:  # the kubelet creates the file empty; locally it may not exist yet
                fcntl.flock(f, fcntl.LOCK_EX)
                if f.seek(0, os.SEEK_END) == 0:
                    f.write(record.dumps())
        except OSError:
            pass  # never let reporting a failure hide the failure


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
