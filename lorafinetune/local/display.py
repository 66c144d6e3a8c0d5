"""Terminal output of local runs: a one-line progress bar while training and a summary table at the end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lorafinetune.api.status import Progress
from lorafinetune.contract import ADAPTER_DIR, LOSS_PLOT_FILE, SUMMARY_FILE


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
    summary = json.loads(path.read_text())
    tokens, secs = summary.get("inputTokens", summary["trainedTokens"]), summary.get("trainSeconds", 0.0)
    rows = [
        ("steps", f"{summary['steps']} / {summary['totalSteps']} ({summary['epochs']:.2f} epochs)"),
        ("processes", str(summary["worldSize"])),
        ("tokens", f"{tokens} non-padding, {summary['trainedTokens']} in the loss; "
                   f"{summary.get('tokensPerSecond', 0):.0f} tokens/s over {secs:.0f} s of optimizer steps"),
        ("trainable params", f"{summary['trainableParameters']:,} of {summary['totalParameters']:,}"),
        ("eval loss", f"{_num(summary['initialEvalLoss'])} before -> {_num(summary['finalEvalLoss'])} after "
                      f"(best {_num(summary['bestEvalLoss'])})"),
        ("final train loss", _num(summary["finalTrainLoss"])),
        ("adapter", f"{run_dir / ADAPTER_DIR} ({summary['adapter']['sizeBytes'] / 1e6:.1f} MB, "
                    f"sha256 {summary['adapter']['sha256'][:12]}...)"),
        ("loss curve", str(run_dir / ADAPTER_DIR / LOSS_PLOT_FILE)),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print(f"\n{summary['name']}: done")
    for k, v in rows:
        print(f"  {k.ljust(width)}  {v}")
