"""What a run knows about itself beside its weights: the loss history, the best evaluation, token counts and time
spent training. Every rank keeps a copy: losses and token counts come from collectives and agree; the time spent and
the learning rate are each rank's own (rank 0's is the one reported). It is saved in each checkpoint's
COMPLETE.json and restored on resume, so that early stopping, the summary and the throughput carry on exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Checkpoint metadata key -> TrainState attribute. The keys are what checkpoints written so far hold.
_META_KEYS = {
    "history": "history",
    "bestEvalLoss": "best_eval",
    "initialEvalLoss": "initial_eval",
    "trainedTokens": "trained_tokens",
    "inputTokens": "input_tokens",
    "computedTokens": "computed_tokens",
    "trainSeconds": "train_seconds",
    "evalsWithoutGain": "evals_without_gain",
}


@dataclass
class TrainState:
    history: list[dict[str, Any]] = field(default_factory=list)  # {"step", "trainLoss", "learningRate", "evalLoss"}
    best_eval: float | None = None
    initial_eval: float | None = None
    evals_without_gain: int = 0
    trained_tokens: int = 0  # tokens in the loss (all ranks)
    input_tokens: int = 0  # non-padding tokens processed (all ranks): the honest throughput measure
    computed_tokens: int = 0  # positions the model ran (all ranks): padding included, a shared prefix once
    train_seconds: float = 0.0  # optimizer steps only, without start-up, evaluation and checkpoints
    last_eval: float | None = None  # kept, not searched for in the history: progress is written every step

    def to_meta(self) -> dict[str, Any]:
        return {key: getattr(self, attr) for key, attr in _META_KEYS.items()}

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainState:
        state = cls(**{attr: meta[key] for key, attr in _META_KEYS.items() if meta.get(key) is not None})
        state.last_eval = next((h["evalLoss"] for h in reversed(state.history) if "evalLoss" in h), None)
        return state

    def record_step(self, step: int, train_loss: float, lr: float, trained: int, tokens: int, seconds: float,
                    computed: int = 0) -> None:  # fmt: skip
        self.history.append({"step": step, "trainLoss": round(train_loss, 6), "learningRate": lr})
        self.trained_tokens += trained
        self.input_tokens += tokens
        self.computed_tokens += computed
        self.train_seconds += seconds

    def record_eval(self, step: int, loss: float, min_delta: float) -> None:
        """An evaluation counts as a gain when it beats the best so far by more than `min_delta`; the one before
        training (step 0) sets the bar without counting against patience."""
        self.last_eval = loss
        if step == 0:
            self.initial_eval = loss
        if self.best_eval is None or loss < self.best_eval - min_delta:
            self.best_eval, self.evals_without_gain = loss, 0
        elif step > 0:
            self.evals_without_gain += 1
        if self.history and self.history[-1]["step"] == step:
            self.history[-1]["evalLoss"] = round(loss, 6)
        else:
            self.history.append({"step": step, "evalLoss": round(loss, 6)})

    @property
    def final_train_loss(self) -> float | None:
        return next((h["trainLoss"] for h in reversed(self.history) if "trainLoss" in h), None)

    @property
    def final_eval_loss(self) -> float | None:
        return next((h["evalLoss"] for h in reversed(self.history) if "evalLoss" in h), None)

    @property
    def tokens_per_second(self) -> float:
        return self.input_tokens / max(self.train_seconds, 1e-9)
