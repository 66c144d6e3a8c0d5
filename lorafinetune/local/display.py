"""Terminal output of local runs: a one-line progress bar while training and a summary table at the end."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pydantic import ValidationError

from lorafinetune.api.status import Progress
from lorafinetune.contract import ADAPTER_DIR, LOSS_PLOT_FILE, SUMMARY_FILE, read_summary


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


class ProgressDisplay:
    """Redraws one line on a terminal; prints a line per step change (at most every 5 s) elsewhere (CI logs)."""

    def __init__(self, name: str, enabled: bool = True, width: int = 24):
        self.name, self.enabled, self.width = name, enabled, width
        self.tty = sys.stdout.isatty()
        self.last_step: int | None = None
        self.last_print = 0.0
        self.started = time.time()

    def line(self, p: Progress) -> str:
        total = p.total_steps or 1
        done = int(self.width * p.step / total)
        bar = "#" * done + "." * (self.width - done)
        return (
            f"{self.name} [{bar}] step {p.step}/{total}  loss {_num(p.train_loss)}  eval {_num(p.eval_loss)}  "
            f"{_num(p.tokens_per_second, '.0f')} tok/s  ETA {_fmt_seconds(p.eta_seconds)}"
        )

    def update(self, progress: Progress | None) -> None:
        if not self.enabled or progress is None:
            return
        now = time.time()
        if self.tty:
            sys.stdout.write("\r" + self.line(progress).ljust(110))
            sys.stdout.flush()
        elif progress.step != self.last_step and (now - self.last_print >= 5 or progress.step == progress.total_steps):
            print(self.line(progress), flush=True)
            self.last_step, self.last_print = progress.step, now

    def note(self, text: str) -> None:
        print(("\n" if self.tty else "") + text, flush=True)

    def close(self) -> None:
        if self.enabled and self.tty:
            print()


def print_summary(run_dir: Path, output_uri: str) -> None:
    path = run_dir / ADAPTER_DIR / SUMMARY_FILE
    if not path.is_file():  # the trainer exited 0 without training: the output already held this adapter
        print(f"{output_uri} already holds a complete adapter of this spec; nothing to do")
        return
    try:
        s = read_summary(path)
    except ValidationError as err:  # a summary this version cannot read: the run itself is fine
        print(f"{output_uri}: the adapter is published; {path} is not a summary this version reads ({err})")
        return
    adapter = f"{run_dir / ADAPTER_DIR}"
    if s.adapter:
        adapter += f" ({s.adapter.size_bytes / 1e6:.1f} MB, sha256 {s.adapter.sha256[:12]}...)"
    rows = [
        ("steps", f"{s.steps} / {s.total_steps} ({s.epochs:.2f} epochs)"),
        ("processes", str(s.world_size)),
        ("tokens", f"{s.input_tokens} non-padding, {s.trained_tokens} in the loss{_computed(s.computed_tokens)}; "
                   f"{s.tokens_per_second:.0f} tokens/s over {s.train_seconds:.0f} s of optimizer steps"),
        ("trainable params", f"{s.trainable_parameters:,} of {s.total_parameters:,}"),
        ("eval loss", f"{_num(s.initial_eval_loss)} before -> {_num(s.final_eval_loss)} after "
                      f"(best {_num(s.best_eval_loss)})"),
        ("final train loss", _num(s.final_train_loss)),
        ("adapter", adapter),
        ("loss curve", str(run_dir / ADAPTER_DIR / LOSS_PLOT_FILE)),
    ]  # fmt: skip
    if s.merged_model:
        rows.append(("merged model", f"{s.merged_model.uri} ({s.merged_model.dtype})"))
    width = max(len(k) for k, _ in rows)
    print(f"\n{s.name}: done")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")


def _computed(positions: int) -> str:
    """What the model ran, where the summary says (padding included, a shared prefix once: dataset.sharePrefix)."""
    return f", {positions} positions computed" if positions else ""
