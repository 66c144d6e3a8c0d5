"""Prometheus metrics, served by rank 0 only (other ranks hold no metrics and open no port).

Names follow Prometheus conventions: `lorafinetune_` prefix, base units, `_total` on counters, and no unbounded
labels (the run is identified by the pod's labels that Prometheus attaches, never by a label here).
"""

from __future__ import annotations

import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

STEP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class TrainerMetrics:
    """The trainer's metrics in a registry of their own (no process/platform collectors mixed in)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.train_loss = Gauge("lorafinetune_train_loss", "Train loss per trained token, last step", registry=r)
        self.eval_loss = Gauge("lorafinetune_eval_loss", "Evaluation loss per token, last evaluation", registry=r)
        self.learning_rate = Gauge("lorafinetune_learning_rate", "Learning rate of the last step", registry=r)
        self.global_step = Gauge("lorafinetune_global_step", "Optimizer steps completed", registry=r)
        self.total_steps = Gauge("lorafinetune_total_steps", "Optimizer steps planned", registry=r)
        self.optimizer_steps = Counter(
            "lorafinetune_optimizer_steps", "Optimizer steps run by this process (resets on restart)", registry=r
        )
        self.tokens = Counter("lorafinetune_tokens", "Non-padding tokens processed, all ranks", registry=r)
        self.trained_tokens = Counter(
            "lorafinetune_trained_tokens", "Tokens in the loss (completion tokens), all ranks", registry=r
        )
        self.step_seconds = Histogram(
            "lorafinetune_step_duration_seconds", "Wall time of one optimizer step", buckets=STEP_BUCKETS, registry=r
        )
        self.checkpoint_time = Gauge(
            "lorafinetune_last_checkpoint_timestamp_seconds", "Unix time of the last complete checkpoint", registry=r
        )
        self.tokens_per_second = Gauge(
            "lorafinetune_tokens_per_second", "Non-padding tokens per second of the last step, all ranks", registry=r
        )
        self.eta_seconds = Gauge("lorafinetune_eta_seconds", "Estimated seconds until the last step", registry=r)
        self.world_size = Gauge("lorafinetune_world_size", "Training processes in this run", registry=r)
        self.info = Info("lorafinetune_trainer", "Versions and base model of this trainer", registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)

    def describe(self, model: str, world_size: int) -> None:
        import deepspeed
        import peft
        import torch
        import transformers

        self.world_size.set(world_size)
        self.info.info(
            {
                "model": model,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "peft": peft.__version__,
                "deepspeed": deepspeed.__version__,
                "python": platform.python_version(),
            }
        )
