"""Compare the base model with base + adapter on held-out data: validation loss and a task score from greedy answers.

    lorafinetune evaluate examples/quickstart.yaml --pvc quickstart-data=examples/data

The held-out rows are the manifest's validation file (or the seeded split training held out). For each row the last
assistant message (or completion) is the reference. When a reference is a JSON object the score is field accuracy
(share of reference keys whose value the answer reproduces exactly, 0 for an answer that is not JSON), otherwise
exact match. One process, no DeepSpeed: this is a check a person runs, not part of training. The loss is the one
training minimises (trainer/loss.py), over the same batches (trainer/batching.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.contract import write_json_atomic
from lorafinetune.storage import local_path
from lorafinetune.trainer import batching, data
from lorafinetune.trainer.loss import TokenLoss

REPORT_FILE = "evaluation.json"


def score_answer(answer: str, reference: str) -> tuple[float, bool]:
    """(score 0..1, exact match) of one generated answer against its reference."""
    answer, reference = answer.strip(), reference.strip()
    try:
        ref = json.loads(reference)
    except json.JSONDecodeError:
        ref = None
    if not isinstance(ref, dict) or not ref:
        return float(answer == reference), answer == reference
    try:
        got = json.loads(answer)
    except json.JSONDecodeError:
        return 0.0, False
    if not isinstance(got, dict):
        return 0.0, False
    return sum(got.get(k) == v for k, v in ref.items()) / len(ref), got == ref


def prompt_and_reference(row: dict[str, Any], fmt: str, tokenizer: Any) -> tuple[str, str]:
    if fmt == "completion":
        return row["prompt"], row["completion"]
    if fmt == "chat":
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return prompt, messages[last]["content"]
    raise ValueError("task scores need dataset.format 'chat' or 'completion' (a 'text' row has no reference answer)")


def generate(model: Any, tokenizer: Any, prompts: list[str], max_new_tokens: int, batch: int = 16) -> list[str]:
    import torch

    tokenizer.padding_side = "left"  # generation continues at the right edge
    answers = []
    for i in range(0, len(prompts), batch):
        enc = tokenizer(prompts[i : i + batch], return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return answers


def validation_loss(model: Any, examples: list, pad_id: int, batch: int = 8) -> float:
    import torch

    total, count = 0.0, 0
    units = batching.make_units(examples, 0, packing=False)
    token_loss = TokenLoss(model)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(units), batch):
            b = {k: v.to(device) for k, v in batching.collate(units[i : i + batch], pad_id, packing=False).items()}
            with torch.no_grad():
                total += token_loss(model, b).item()
            count += batching.trained_token_count(b)
    finally:
        token_loss.remove()
    return total / count


def held_out_rows(spec: LoRAFineTuneSpec) -> list[tuple[str, dict[str, Any]]]:
    """The rows training held out, from local files: the validation file, else the same seeded split by index."""
    ds = spec.dataset
    if ds.validation:
        return data.read_jsonl(local_path(ds.validation))
    rows = data.read_jsonl(local_path(ds.train))
    return data.split_validation(rows, ds.effective_validation_split, spec.training.seed)[1]


def evaluate_adapter(spec: LoRAFineTuneSpec, adapter: Path, report_dir: Path, limit: int | None) -> dict[str, Any]:
    """Base model and base + `adapter` on the held-out rows of `spec` (its URIs local); the report is also written
    to report_dir/evaluation.json."""
    import torch
    import transformers
    from peft import PeftModel

    from lorafinetune.trainer import model

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    model_dir = model.resolve_model_dir(spec.model)
    tok = model.load_tokenizer(model_dir, spec.model)
    ds = spec.dataset
    fmt = data.Formatter(tok, ds.format, ds.max_seq_length, ds.train_on_prompt)
    rows = held_out_rows(spec)
    rows = rows[:limit] if limit else rows
    examples = [fmt(where, row) for where, row in rows]
    pairs = [prompt_and_reference(row, ds.format, tok) for _, row in rows]
    max_new = max(len(tok(ref)["input_ids"]) for _, ref in pairs) + 8

    base = model.load_base_model(model_dir, spec.model, torch.float32).eval()
    results = {"base": _measure(base, tok, examples, pairs, max_new)}
    tuned = PeftModel.from_pretrained(base, str(adapter)).eval()
    results["adapter"] = _measure(tuned, tok, examples, pairs, max_new)
    report = {"adapter": str(adapter), "heldOutRows": len(rows), **results}
    write_json_atomic(report_dir / REPORT_FILE, report)
    return report


def _measure(m: Any, tok: Any, examples: list, pairs: list[tuple[str, str]], max_new: int) -> dict[str, Any]:
    loss = validation_loss(m, examples, tok.pad_token_id)
    answers = generate(m, tok, [p for p, _ in pairs], max_new)
    scored = [score_answer(a, ref) for a, (_, ref) in zip(answers, pairs, strict=True)]
    return {
        "validationLoss": round(loss, 4),
        "perplexity": round(math.exp(min(loss, 50)), 3),
        "taskScore": round(sum(s for s, _ in scored) / len(scored), 4),
        "exactMatch": round(sum(e for _, e in scored) / len(scored), 4),
        "samples": [{"answer": a, "reference": r} for a, (_, r) in list(zip(answers, pairs, strict=True))[:3]],
    }


def print_report(report: dict[str, Any]) -> None:
    b, a = report["base"], report["adapter"]
    print(f"\nheld-out evaluation on {report['heldOutRows']} rows          base    with adapter")
    for key, label in (("validationLoss", "validation loss"), ("perplexity", "perplexity"),
                       ("taskScore", "task score (field accuracy)"), ("exactMatch", "exact match")):  # fmt: skip
        print(f"  {label:<38}{b[key]:>8.4f}    {a[key]:>8.4f}")
    print(f"  example answer, base:    {b['samples'][0]['answer'].strip()[:100]!r}")
    print(f"  example answer, adapter: {a['samples'][0]['answer'].strip()[:100]!r}")
    print(f"  reference:               {b['samples'][0]['reference'][:100]!r}")
