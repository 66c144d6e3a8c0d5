"""Reload check run in a fresh interpreter: python -m lorafinetune.trainer.verify ADAPTER_DIR BASE_MODEL [REVISION]

Loads the base model and the adapter with PEFT, then checks every LoRA tensor in the loaded model equals the file.
Exits non-zero with the reason on any mismatch.
"""

from __future__ import annotations

import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM


def main(adapter_dir: str, base_dir: str, revision: str | None = None) -> int:
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, revision=revision)
    model = PeftModel.from_pretrained(base, adapter_dir)
    saved = load_file(f"{adapter_dir}/adapter_model.safetensors")
    loaded = {n: p for n, p in model.named_parameters() if "lora_" in n}
    if len(loaded) != len(saved):
        print(f"loaded {len(loaded)} LoRA tensors but the file has {len(saved)}")
        return 1
    by_suffix = {n.replace(".default", ""): p for n, p in loaded.items()}
    for name, tensor in saved.items():
        match = [p for n, p in by_suffix.items() if n.endswith(name.removeprefix("base_model.model."))]
        if len(match) != 1 or not torch.equal(match[0].detach().to(tensor.dtype), tensor):
            print(f"tensor {name} did not load back identically")
            return 1
    if all(float(t.abs().sum()) == 0 for n, t in saved.items() if "lora_B" in n):
        print("every lora_B tensor is zero: the adapter never trained")
        return 1
    print(f"ok: {len(saved)} tensors reloaded")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
