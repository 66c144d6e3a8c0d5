"""Packing vs padding: non-padding tokens per second of LoRA training steps on the quick start's model and data.

    $(scripts/env.sh)/bin/python benchmarks/packing.py [--steps 6] [--batch 8]

Both arms run the same examples, the same model (SmolLM2-135M-Instruct + LoRA r=16 on all linear layers, fp32) and
the same trainer code (`lorafinetune.trainer.batching`), one process, alternating arms step by step so that machine
noise hits both alike. The baseline is padding (each example its own row); the candidate packs examples into rows of
`--pack-len` tokens with a block-diagonal mask. Writes benchmarks/results/packing.json with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lorafinetune.api.manifest import load_manifest
from lorafinetune.trainer import batching, data, model
from lorafinetune.trainer.data import IGNORE

REPO = Path(__file__).resolve().parents[1]


def step(peft_model, opt, batch) -> None:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = peft_model(**inputs).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)
    loss.backward()
    opt.step()
    opt.zero_grad()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8, help="examples per step (padding: one row each)")
    ap.add_argument("--pack-len", type=int, default=512, help="tokens per packed row")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = load_manifest(REPO / "examples/quickstart.yaml").spec
    model_dir = model.resolve_model_dir(spec.model)
    tok = model.load_tokenizer(model_dir, spec.model)
    fmt = data.Formatter(tok, "chat", spec.dataset.max_seq_length)
    examples = data.load_examples(REPO / "examples/data/train.jsonl", fmt)
    base = model.load_base_model(model_dir, spec.model, torch.float32)
    peft_model = model.wrap_with_lora(base, spec.lora, gradient_checkpointing=False)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)

    per_step = args.batch
    arms = {"padding": [], "packing": []}
    for i in range(args.steps + 1):  # step 0 warms up and is not counted
        chunk = examples[i * per_step : (i + 1) * per_step]
        for arm in arms:
            units = batching.make_units(chunk, args.pack_len, packing=(arm == "packing"))
            batch = batching.collate(units, tok.pad_token_id, packing=(arm == "packing"))
            t0 = time.perf_counter()
            step(peft_model, opt, batch)
            if i:
                arms[arm].append((time.perf_counter() - t0, sum(u.length for u in units), batch["input_ids"].numel()))
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} (CPU)",
              "model": "SmolLM2-135M-Instruct + LoRA r=16 all-linear, fp32", "examplesPerStep": per_step,
              "packLength": args.pack_len, "threads": torch.get_num_threads()}  # fmt: skip
    for arm, rows in arms.items():
        secs = sum(r[0] for r in rows)
        result[arm] = {
            "tokensPerSecond": round(sum(r[1] for r in rows) / secs, 1),
            "paddingShare": round(1 - sum(r[1] for r in rows) / sum(r[2] for r in rows), 3),
            "seconds": round(secs, 2),
        }
    result["speedup"] = round(result["packing"]["tokensPerSecond"] / result["padding"]["tokensPerSecond"], 3)
    out = REPO / "benchmarks/results/packing.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
