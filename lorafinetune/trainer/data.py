"""JSONL rows -> token ids and labels, with the prompt masked out of the loss.

Three formats (spec.dataset.format):
    text        {"text": "..."}                                   every token trained, EOS appended
    completion  {"prompt": "...", "completion": "..."}            completion + EOS trained
    chat        {"messages": [{"role": ..., "content": ...}, ...]} assistant turns trained, with end-of-turn

Labels use -100 (ignored by the loss) for masked positions, decided by position, never by token id: a tokenizer whose
pad token is its EOS must still learn to stop. An example with no trained token left (after truncation) is an error
naming its file and line, not a silently useless row.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lorafinetune.trainer.errors import ConfigError, DataError

IGNORE = -100
ROLES = {"system", "user", "assistant", "tool"}


T = TypeVar("T")  # split_validation holds out rows and examples alike


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str  # "file:line", for error messages

    @property
    def trained_tokens(self) -> int:
        # labels[0] is never predicted (nothing precedes it), so it does not count
        return sum(1 for t in self.labels[1:] if t != IGNORE)


def read_jsonl(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Rows with their `file:line`; a line that is not a JSON object is an error naming it."""
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            rows.append((where, row))
    if not rows:
        raise DataError(f"dataset file {path} has no rows")
    return rows


def _string_field(row: dict, key: str, where: str, fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: format {fmt!r} needs a non-empty string field {key!r} (keys found: {sorted(row)})")
    return value


class Formatter:
    """Turns rows of one format into Examples with one tokenizer."""

    def __init__(self, tokenizer: Any, fmt: str, max_seq_length: int, train_on_prompt: bool = False):
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; the model could never learn to stop")
        if fmt == "chat" and not tokenizer.chat_template:
            raise ConfigError("dataset.format is 'chat' but the tokenizer has no chat template; use 'completion'")
        if fmt == "chat" and not tokenizer.is_fast:
            raise ConfigError("dataset.format 'chat' needs a fast tokenizer (offset mapping) to mask prompts")
        self.tok = tokenizer
        self.fmt = fmt
        self.max_len = max_seq_length
        self.train_on_prompt = train_on_prompt

    def __call__(self, where: str, row: dict[str, Any]) -> Example:
        if self.fmt == "text":
            ids = self._encode(_string_field(row, "text", where, "text"), special=True) + [self.tok.eos_token_id]
            labels = list(ids)
        elif self.fmt == "completion":
            prompt = self._encode(_string_field(row, "prompt", where, "completion"), special=True)
            answer = self._encode(_string_field(row, "completion", where, "completion"), special=False)
            answer.append(self.tok.eos_token_id)
            ids = prompt + answer
            labels = (list(prompt) if self.train_on_prompt else [IGNORE] * len(prompt)) + answer
        else:
            ids, labels = self._chat(where, row)
        example = Example(ids[: self.max_len], labels[: self.max_len], where)
        if example.trained_tokens == 0:
            raise DataError(
                f"{where}: no token is left to train on (prompt of {len(ids) - sum(t != IGNORE for t in labels)} "
                f"tokens, maxSeqLength {self.max_len}); shorten the prompt or raise dataset.maxSeqLength"
            )
        return example

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def _chat(self, where: str, row: dict[str, Any]) -> tuple[list[int], list[int]]:
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: format 'chat' needs a non-empty list field 'messages'")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f"{where}: messages[{i}] must be {{\"role\": one of {sorted(ROLES)}, \"content\": string}}"
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message, so nothing to train on")
        render = self.tok.apply_chat_template
        text = render(messages, tokenize=False)
        # 1. Character spans of each assistant answer: what the template adds between "prompt for turn i" and
        #    "conversation up to turn i". That span includes the end-of-turn token, which must be trained.
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = render(messages[: i + 1], tokenize=False)
            if not upto.startswith(prompt) or not text.startswith(upto):
                raise ConfigError(
                    "the chat template does not render conversations incrementally (a prefix changes when a turn is "
                    "added), so assistant tokens cannot be located; use dataset.format 'completion'"
                )
            spans.append((len(prompt), len(upto)))
        # 2. Tokenise once and train exactly the tokens that start inside an answer span.
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = []
        for tid, (start, end) in zip(ids, enc["offset_mapping"], strict=True):
            trained = self.train_on_prompt or any(a <= start < b for a, b in spans)
            labels.append(tid if trained and end > start else IGNORE)
        return ids, labels


def load_examples(path: Path, formatter: Formatter) -> list[Example]:
    return [formatter(where, row) for where, row in read_jsonl(path)]


def split_validation(examples: list[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Seeded hold-out: the same seed always holds out the same rows, on every rank."""
    if fraction <= 0:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    held = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]
