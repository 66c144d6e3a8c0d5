"""Turning dataset rows into tokens: which tokens are trained, and how bad rows are reported."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafinetune.trainer.data import IGNORE, Formatter, load_examples, read_jsonl, split_validation
from lorafinetune.trainer.errors import ConfigError, DataError


def trained_text(tok, example) -> str:
    return tok.decode([t for t in example.labels if t != IGNORE])


def test_chat_trains_only_assistant_turns_with_end_of_turn(tiny_tokenizer):
    fmt = Formatter(tiny_tokenizer, "chat", 256)
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "alice age"},
            {"role": "assistant", "content": "paris nurse"},
            {"role": "user", "content": "bob job"},
            {"role": "assistant", "content": "oslo chef"},
        ]
    }
    ex = fmt("f.jsonl:1", row)
    assert trained_text(tiny_tokenizer, ex) == "paris nurse<|im_end|>\noslo chef<|im_end|>\n"
    assert len(ex.input_ids) == len(ex.labels)
    # the prompt is intact in the inputs: masking changes labels only
    assert tiny_tokenizer.decode(ex.input_ids) == tiny_tokenizer.apply_chat_template(row["messages"], tokenize=False)


def test_eos_is_trained_even_when_pad_equals_eos(tiny_tokenizer):
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    try:
        ex = Formatter(tiny_tokenizer, "completion", 64)("f:1", {"prompt": "alice is", "completion": "a nurse"})
    finally:
        tiny_tokenizer.pad_token = "<|endoftext|>"
    assert ex.labels[-1] == ex.input_ids[-1] == tiny_tokenizer.eos_token_id
    assert trained_text(tiny_tokenizer, ex) == "a nurse<|im_end|>"


def test_completion_masks_prompt_unless_train_on_prompt(tiny_tokenizer):
    row = {"prompt": "alice is", "completion": " a nurse"}
    masked = Formatter(tiny_tokenizer, "completion", 64)("f:1", row)
    full = Formatter(tiny_tokenizer, "completion", 64, train_on_prompt=True)("f:1", row)
    n_prompt = len(tiny_tokenizer("alice is")["input_ids"])
    assert masked.labels[:n_prompt] == [IGNORE] * n_prompt
    assert full.labels == full.input_ids
    assert masked.input_ids == full.input_ids


def test_text_trains_every_token_and_appends_eos(tiny_tokenizer):
    ex = Formatter(tiny_tokenizer, "text", 64)("f:1", {"text": "the city is oslo"})
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tiny_tokenizer.eos_token_id


def test_truncation_that_removes_every_trained_token_is_an_error(tiny_tokenizer):
    long_prompt = " ".join(["alice"] * 40)
    fmt = Formatter(tiny_tokenizer, "completion", 16)
    with pytest.raises(DataError, match=r"data.jsonl:7: no token is left to train on .*maxSeqLength 16"):
        fmt("data.jsonl:7", {"prompt": long_prompt, "completion": "nurse"})


@pytest.mark.parametrize(
    "line, fmt, message",
    [
        ("{not json", "chat", r"rows.jsonl:2: not valid JSON"),
        ("[1, 2]", "chat", r"rows.jsonl:2: expected a JSON object, got list"),
        ('{"text": "hi"}', "chat", r"rows.jsonl:2: format 'chat' needs a non-empty list field 'messages'"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "chat", r"rows.jsonl:2: messages\[0\] must be"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "chat", r"rows.jsonl:2: no assistant message"),
        ('{"prompt": "x"}', "completion", r"rows.jsonl:2: format 'completion' needs .* 'completion'"),
        ('{"text": ""}', "text", r"rows.jsonl:2: format 'text' needs a non-empty string field 'text'"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path: Path, tiny_tokenizer, line, fmt, message):
    good = {
        "chat": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "completion": {"prompt": "a", "completion": "b"},
        "text": {"text": "a b"},
    }[fmt]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(DataError, match=message):
        load_examples(path, Formatter(tiny_tokenizer, fmt, 64))


def test_missing_and_empty_files_are_clear(tmp_path: Path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="has no rows"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_chat_format_needs_a_chat_template(tiny_tokenizer):
    template = tiny_tokenizer.chat_template
    tiny_tokenizer.chat_template = None
    try:
        with pytest.raises(ConfigError, match="no chat template; use 'completion'"):
            Formatter(tiny_tokenizer, "chat", 64)
    finally:
        tiny_tokenizer.chat_template = template


def test_validation_split_is_seeded_and_disjoint():
    items = list(range(100))
    train_a, val_a = split_validation(items, 0.2, seed=7)
    train_b, val_b = split_validation(items, 0.2, seed=7)
    _, val_c = split_validation(items, 0.2, seed=8)
    assert (train_a, val_a) == (train_b, val_b) and val_a != val_c
    assert len(val_a) == 20 and not set(val_a) & set(train_a) and sorted(train_a + val_a) == items
