"""Reload check run in a fresh interpreter:

    python -m lorafinetune.trainer.verify ADAPTER_DIR BASE_MODEL [--revision R] [--merge-into DIR --dtype D]

Loads the base model and the adapter with PEFT, then checks every LoRA tensor in the loaded model equals the file.
With --merge-into (output.mergeAdapter) it then folds the adapter into the base weights in fp32, checks that the
merged model gives the adapted model's logits, and saves it in dtype D with the adapter's tokenizer: a model that
loads with plain transformers. Exits non-zero with the reason on any mismatch.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

# The adapter folder's files that belong to the adapter, not copied into the merged model: the weights, the config and
# PEFT's model card (its front matter says `library_name: peft`). The rest is the tokenizer, saved by the trainer.
_ADAPTER_ONLY = {"adapter_model.safetensors", "adapter_config.json", "README.md"}


def check_adapter(model: PeftModel, adapter_dir: str) -> str | None:
    saved = load_file(f"{adapter_dir}/adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if len(loaded) != len(saved):
        return f"loaded {len(loaded)} LoRA tensors but the file has {len(saved)}"
    by_suffix = {n.replace(".default", ""): p for n, p in loaded.items()}
    for name, tensor in saved.items():
        match = [p for n, p in by_suffix.items() if n.endswith(name.removeprefix("base_model.model."))]
        if len(match) != 1 or not torch.equal(match[0].detach().to(tensor.dtype), tensor):
            return f"tensor {name} did not load back identically"
    if all(float(t.abs().sum()) == 0 for n, t in saved.items() if "lora_B" in n):
        return "every lora_B tensor is zero: the adapter never trained"
    print(f"ok: {len(saved)} tensors reloaded")
    return None


@torch.no_grad()
def merge(model: PeftModel, adapter_dir: str, out: Path, dtype: torch.dtype) -> str | None:
    probe = torch.arange(1, 33).remainder(model.config.vocab_size).unsqueeze(0)
    adapted = model(input_ids=probe).logits
    merged = model.merge_and_unload()
    gap = (merged(input_ids=probe).logits - adapted).abs().max().item()
    if gap > 1e-3 * max(1.0, adapted.abs().max().item()):
        return f"the merged model's logits differ from the adapted model's by {gap:.3g}"
    shutil.rmtree(out, ignore_errors=True)
    merged.to(dtype).save_pretrained(out)
    for f in Path(adapter_dir).iterdir():
        if f.is_file() and f.name not in _ADAPTER_ONLY and not (out / f.name).exists():
            shutil.copy2(f, out / f.name)
    print(f"ok: merged into {out} ({dtype}, logits within {gap:.2g} of the adapted model)")
    return None


def main(argv: list[str]) -> int:
    args = argparse.ArgumentParser(prog="python -m lorafinetune.trainer.verify")
    args.add_argument("adapter_dir")
    args.add_argument("base_dir")
    args.add_argument("--revision")
    args.add_argument("--merge-into", type=Path)
    args.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = args.parse_args(argv)
    # Merging folds the adapter in fp32; the check alone loads the weights as stored (bf16 for most models: half the
    # host memory of fp32, which for an 8B model is 32 GB beside the trainer's own).
    dtype = torch.float32 if a.merge_into else "auto"
    base = AutoModelForCausalLM.from_pretrained(a.base_dir, dtype=dtype, revision=a.revision)
    model = PeftModel.from_pretrained(base, a.adapter_dir)
    problem = check_adapter(model, a.adapter_dir)
    if problem is None and a.merge_into is not None:
        problem = merge(model, a.adapter_dir, a.merge_into, getattr(torch, a.dtype))
    if problem is not None:
        print(problem)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
