"""The run state a checkpoint carries (trainer/state.py): what resumes must find exactly as it was saved."""

from __future__ import annotations

import json

from lorafinetune.trainer.state import TrainState


def test_the_state_round_trips_through_checkpoint_metadata_as_json():
    state = TrainState()
    state.record_eval(0, 2.5, min_delta=0.0)
    state.record_step(1, 2.4, 1e-3, trained=100, tokens=300, seconds=0.5)
    state.record_step(2, 2.2, 9e-4, trained=120, tokens=280, seconds=0.7, computed=250)
    state.record_eval(2, 2.1, min_delta=0.0)

    restored = TrainState.from_meta(json.loads(json.dumps(state.to_meta())))  # COMPLETE.json is JSON
    assert restored == state
    assert restored.last_eval == 2.1, "the last evaluation is found again in the history"
    assert (restored.trained_tokens, restored.input_tokens, restored.train_seconds) == (220, 580, 1.2)
    assert restored.computed_tokens == 250
    assert restored.initial_eval == 2.5 and restored.best_eval == 2.1
    assert restored.final_train_loss == 2.2 and restored.final_eval_loss == 2.1


def test_checkpoints_without_newer_fields_and_with_nulls_still_resume():
    restored = TrainState.from_meta({"history": [{"step": 1, "trainLoss": 1.0}], "bestEvalLoss": None})
    assert restored.history == [{"step": 1, "trainLoss": 1.0}]
    assert restored.best_eval is None and restored.evals_without_gain == 0 and restored.trained_tokens == 0
    assert restored.last_eval is None and restored.final_eval_loss is None


def test_patience_counts_evaluations_that_do_not_beat_the_best_by_more_than_min_delta():
    state = TrainState()
    state.record_eval(0, 1.0, min_delta=0.1)  # sets the bar, never counts against patience
    assert state.evals_without_gain == 0
    state.record_eval(2, 0.95, min_delta=0.1)  # better, but not by more than min_delta
    state.record_eval(4, 1.2, min_delta=0.1)
    assert state.evals_without_gain == 2 and state.best_eval == 1.0
    state.record_eval(6, 0.8, min_delta=0.1)
    assert state.evals_without_gain == 0 and state.best_eval == 0.8


def test_an_evaluation_joins_the_history_entry_of_its_step():
    state = TrainState()
    state.record_step(4, 1.5, 1e-3, trained=10, tokens=20, seconds=0.1)
    state.record_eval(4, 1.4, min_delta=0.0)
    assert state.history == [{"step": 4, "trainLoss": 1.5, "learningRate": 1e-3, "evalLoss": 1.4}]
