"""Prometheus metrics, served by rank 0 only (other ranks hold no metrics and open no port).

Names follow Prometheus conventions: `lorafinetune_` prefix, base units, `_total` on counters, and no unbounded
labels (the run is identified by the pod's labels that Prometheus attaches, never by a label here). The names are in
lorafinetune.contract, since the operator, `lorafinetune plot` and the dashboard read them.
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from lorafinetune.contract import TrainerMetricNames

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class TrainerMetrics:
    """The trainer's metrics in a registry of their own (no process/platform collectors mixed in)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        name = TrainerMetricNames
        self.train_loss = Gauge(name.TRAIN_LOSS, "Train loss per trained token, last step", registry=r)
        self.eval_loss = Gauge(name.EVAL_LOSS, "Evaluation loss per token, last evaluation", registry=r)
        self.learning_rate = Gauge(name.LEARNING_RATE, "Learning rate of the last step", registry=r)
        self.global_step = Gauge(name.GLOBAL_STEP, "Optimizer steps completed", registry=r)
        self.total_steps = Gauge(name.TOTAL_STEPS, "Optimizer steps planned", registry=r)
        self.optimizer_steps = Counter(
            name.OPTIMIZER_STEPS, "Optimizer steps run by this process (resets on restart)", registry=r
        )
        self.tokens = Counter(name.TOKENS, "Non-padding tokens processed, all ranks", registry=r)
        self.trained_tokens = Counter(
            name.TRAINED_TOKENS, "Tokens in the loss (completion tokens), all ranks", registry=r
        )
        self.step_seconds = Histogram(
            name.STEP_DURATION, "Wall time of one optimizer step", buckets=STEP_BUCKETS, registry=r
        )
        self.checkpoint_time = Gauge(name.LAST_CHECKPOINT_TIME, "Unix time of the last complete checkpoint", registry=r)
        self.tokens_per_second = Gauge(
            name.TOKENS_PER_SECOND, "Non-padding tokens per second of the last step, all ranks", registry=r
        )
        self.eta_seconds = Gauge(name.ETA, "Estimated seconds until the last step", registry=r)
        self.world_size = Gauge(name.WORLD_SIZE, "Training processes in this run", registry=r)
        self.info = Info(name.INFO, "Versions, base model and precision of this trainer", registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def describe(self, model: str, world_size: int, precision: str) -> None:
        import deepspeed
        import peft
        import torch
        import transformers

        self.world_size.set(world_size)
        self.info.info(
            {
                "model": model,
                "precision": precision,  # what training.precision auto resolved to on this machine
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "deepspeed": deepspeed.__version__,
                "python": platform.python_version(),
            }
        )
