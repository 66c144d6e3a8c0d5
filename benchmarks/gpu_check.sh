#!/usr/bin/env bash
# GPU check and benchmark, for a machine with one NVIDIA GPU and no network (run from the repository root).
#
#   benchmarks/gpu_check.sh OUT_DIR [STEPS]
#
# Needs: python3 with torch (CUDA); the other Python dependencies as wheels in .whl/ (pydantic, transformers, peft,
# the deepspeed sdist, ...); SmolLM2-135M's config and tokenizer in .gpu/smollm2-config/ (weights are initialised at
# random here: the point is the CUDA path and its speed, not the answers). It runs `lorafinetune run` on the GPU, one
# rank (NCCL), bf16, in three arms on the quick start's data: ZeRO-2 padded (the baseline), ZeRO-2 packed, ZeRO-3
# packed; each run's adapter is verified by the trainer (a fresh process reloads it). Summaries go to OUT_DIR.
set -euo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR [STEPS]}
STEPS=${2:-60}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
    .whl/deepspeed-*.tar.gz
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LFT_CACHE_DIR=/tmp/lft-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c 'import torch, transformers, peft, deepspeed; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "deepspeed", deepspeed.__version__)' | tee -a "$OUT/machine.txt"

MODEL=/tmp/smollm2-random
python3 - "$MODEL" <<'PY'
import shutil, sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
src, dst = Path(".gpu/smollm2-config"), Path(sys.argv[1])
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src), dtype=torch.bfloat16)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name != "config.json":
        shutil.copy(f, dst / f.name)
PY

arm() {  # name zero packing
  cat > "/tmp/$1.yaml" <<YAML
apiVersion: lorafinetune.io/v1alpha1
kind: LoRAFineTune
metadata: {name: gpu-$1}
spec:
  model: {uri: "file://$MODEL"}
  dataset: {train: "file://$PWD/examples/data/train.jsonl", validation: "file://$PWD/examples/data/validation.jsonl",
            format: chat, maxSeqLength: 512, packing: $3}
  lora: {r: 16, alpha: 32, dropout: 0.05, targetModules: [all-linear]}
  training: {maxSteps: $STEPS, learningRate: 0.001, microBatchSize: 16, precision: bf16}
  deepspeed: {zeroStage: $2}
  evaluation: {everySteps: $STEPS}
  checkpointing: {everySteps: $(( STEPS / 2 ))}
  resources: {nodes: 1, gpusPerNode: 1}
  output: {uri: "file:///tmp/runs/$1"}
YAML
  local start=$SECONDS
  if python3 -m lorafinetune.cli run "/tmp/$1.yaml" --quiet > "$OUT/$1.log" 2>&1; then status=ok; else status=FAILED; fi
  echo "$1: $status in $(( SECONDS - start )) s" | tee -a "$OUT/arms.txt"
  cp /tmp/runs/$1/adapter/training_summary.json "$OUT/$1.summary.json" 2>/dev/null || tail -40 /tmp/runs/$1/logs/node-0.log > "$OUT/$1.node-0.tail" || true
}
arm zero2-padded 2 false
arm zero2-packed 2 true
arm zero3-packed 3 true
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {}
for f in sorted(out.glob("*.summary.json")):
    s = json.loads(f.read_text())
    keys = ("steps", "tokensPerSecond", "trainSeconds", "durationSeconds", "inputTokens", "trainedTokens",
            "initialEvalLoss", "finalEvalLoss")
    rows[f.name.removesuffix(".summary.json")] = {k: s.get(k) for k in keys}
print(json.dumps(rows, indent=1))
(out / "results.json").write_text(json.dumps(rows, indent=1))
PY
