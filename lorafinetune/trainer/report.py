"""Rank 0's account of a run, in one place: the Prometheus metrics (scraped), progress.json (read by the operator for
status.progress and by the local console) and the console lines. The other ranks' reporters say nothing and open no
port, so the recipe calls them without asking which rank it is."""

from __future__ import annotations

import math
from collections import deque
from datetime import UTC, datetime
from pathlib import Path

from lorafinetune.api.status import Progress
from lorafinetune.contract import PROGRESS_FILE, write_json_atomic
from lorafinetune.trainer.batching import Schedule
from lorafinetune.trainer.metrics import TrainerMetrics
from lorafinetune.trainer.state import TrainState

ETA_WINDOW = 20  # steps averaged for the time left: recent enough to follow a slowdown, long enough to be steady


class Reporter:
    def __init__(self, run_dir: Path, active: bool) -> None:
        self.run_dir = run_dir
        self.metrics = TrainerMetrics() if active else None
        self.recent_steps: deque[float] = deque(maxlen=ETA_WINDOW)
        self.tokens_per_second: float | None = None

    def started(self, schedule: Schedule, total_steps: int, start_step: int, model_uri: str, world: int,
                precision: str, port: int) -> None:  # fmt: skip
        self.schedule, self.total_steps = schedule, total_steps
        if (m := self.metrics) is None:
            return
        if port:
            m.serve(port)
        m.describe(model_uri, world, precision)
        m.total_steps.set(total_steps)
        m.global_step.set(start_step)

    def resumed(self, step: int, path: Path) -> None:
        if self.metrics is not None:
            print(f"resuming from step {step} ({path})", flush=True)

    def stepped(self, step: int, state: TrainState, train_loss: float, lr: float, trained: float, tokens: float,
                seconds: float) -> None:  # fmt: skip
        self.recent_steps.append(seconds)
        if (m := self.metrics) is None:
            return
        self.tokens_per_second = tokens / seconds
        eta = (self.total_steps - step) * sum(self.recent_steps) / len(self.recent_steps)
        m.train_loss.set(train_loss)
        m.learning_rate.set(lr)
        m.global_step.set(step)
        m.optimizer_steps.inc()
        m.step_seconds.observe(seconds)
        m.tokens.inc(tokens)
        m.trained_tokens.inc(trained)
        m.tokens_per_second.set(self.tokens_per_second)
        m.eta_seconds.set(eta)
        self._progress(step, state, train_loss, eta)

    def evaluated(self, step: int, loss: float) -> None:
        if self.metrics is not None:
            self.metrics.eval_loss.set(loss)
            print(f"step {step}: eval loss {loss:.4f} (perplexity {math.exp(min(loss, 50)):.2f})", flush=True)

    def checkpointed(self, step: int, path: Path, pruned: list[str]) -> None:
        if self.metrics is not None:
            self.metrics.checkpoint_time.set_to_current_time()
            print(f"step {step}: checkpoint {path}" + (f" (pruned {', '.join(pruned)} in S3)" if pruned else ""),
                  flush=True)  # fmt: skip

    def stopped_early(self, step: int, evals: int) -> None:
        if self.metrics is not None:
            print(f"early stopping at step {step}: eval loss did not improve for {evals} evaluations", flush=True)

    def finished(self, step: int, state: TrainState) -> None:
        """The adapter is published: progress says so (eta 0) with the last train loss."""
        if self.metrics is not None:
            self._progress(step, state, state.final_train_loss, eta=0.0)

    def _progress(self, step: int, state: TrainState, train_loss: float | None, eta: float) -> None:
        progress = Progress(
            step=step,
            total_steps=self.total_steps,
            summary=f"{step}/{self.total_steps}",
            epoch=round(self.schedule.epoch_of(step), 4),
            train_loss=train_loss,
            eval_loss=state.last_eval,
            best_eval_loss=state.best_eval,
            tokens_per_second=self.tokens_per_second,
            eta_seconds=round(eta, 1),
            updated_at=datetime.now(UTC),
        )
        write_json_atomic(self.run_dir / PROGRESS_FILE, progress.to_manifest())
