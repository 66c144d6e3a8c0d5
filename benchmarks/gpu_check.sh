#!/usr/bin/env bash
# GPU check and benchmark, for a machine with one NVIDIA GPU and no network (run from the repository root); about
# 10.5 minutes on one H100 or H200 before the fp16 step was added (with a 590 s limit the quick start's last arm is
# cut and the fp16 step not reached; STEPS="step-profile trainers-varlen fp16" runs only those, PROFILE_ARMS and
# VARLEN_ARMS choose arms).
# Every step writes its results as it finishes, so a step cut short loses only itself.
#
#   benchmarks/gpu_check.sh OUT_DIR
#
# Needs: python3 with torch (CUDA) and numpy; the rest comes from .whl/ and .gpu/, which benchmarks/gpu_prepare.sh
# fills on a machine with PyPI (carry both: they are git-ignored). The TRL arm needs trl, datasets, pandas and
# pyarrow installed on the machine (trl and datasets travel in .whl/trl; pandas and pyarrow, too big to carry, are
# in the GPU image) and is skipped without them; QLoRA needs .gpu/site's bitsandbytes.
#
# 1. A model of Llama-3.2-1B's published shape (1.24 B parameters, 128k vocabulary) with random bf16 weights and
#    SmolLM2's tokenizer: the point is the speed and memory of the CUDA path, not the answers.
# 2. benchmarks/step_profile.py --device cuda: the trainer's own steps at a batch that fills the GPU, timed (MFU)
#    and profiled (GPU time by kernel kind, GPU idle share); the trainer's defaults against compiled decoder layers
#    (LFT_COMPILE=layers, not on by default until this shows it winning; PROFILE_ARMS="defaults masks peft-lora
#    compiled redo-dropout" adds the 4-D masks, PEFT's LoRA forward, and the fused LoRA layers redoing the dropout
#    in backward as on a CPU: its memory saved against its time).
# 3. benchmarks/trainers.py --device cuda: HF Trainer + PEFT with padding (the baseline) beside `lorafinetune run`
#    padded and packed, on the long-tailed data and the quick start's; tokens/s, peak GPU memory, eval loss and MFU
#    per arm (more arms: TRL packed when installed, `ours-packed-nf4` on an nf4 base, `ours-packed-masks`).
# 4. benchmarks/memory_plan.py --device cuda: `lorafinetune plan`'s estimate against torch.cuda.max_memory_allocated,
#    an nf4 configuration included.
# 5. benchmarks/step_profile.py --arms fp16: the trainer in fp16 with loss scaling (training.precision auto's choice
#    on GPUs before Ampere), never run on a GPU yet; last, so with the 590 s limit it needs STEPS="... fp16".
# benchmarks/loss_path.py --device cuda (the output layer and loss alone) is left out for time; run it by hand.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
if [ -f .whl/requirements.txt ]; then
  py=$(python3 -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
  ls .whl/pydantic_core-*-"$py"-*.whl > /dev/null 2>&1 ||
    { echo "python3 is $py; .whl/ has wheels for cp311 and cp312 only (benchmarks/gpu_prepare.sh)" | tee "$OUT/steps.txt"; exit 1; }
  grep -v '^deepspeed==' .whl/requirements.txt > /tmp/lft-wheels.txt
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links .whl --target /tmp/site \
    -r /tmp/lft-wheels.txt
  python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site \
    .whl/deepspeed-*.tar.gz
  if [ -d .whl/trl ]; then  # the TRL arm's extras: without them trainers.py skips that arm and says so
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links .whl/trl \
      --target /tmp/site trl datasets dill multiprocess || echo "TRL's wheels did not install" >> "$OUT/steps.txt"
  fi
  export PYTHONPATH=/tmp/site
fi
[ -d .gpu/site ] && export PYTHONPATH=$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 LFT_CACHE_DIR=/tmp/lft-cache
export LFT_BENCH_DIR=/tmp/lft-bench HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c 'import sys, torch, transformers, peft, deepspeed; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__, "deepspeed", deepspeed.__version__)' | tee -a "$OUT/machine.txt"
for m in bitsandbytes matplotlib pyarrow datasets trl; do
  python3 -c "import $m; print('$m', $m.__version__)" >> "$OUT/machine.txt" 2>&1 || echo "$m: not importable" >> "$OUT/machine.txt"
done
# torch.compile (the step profile's `compiled` arm): Triton builds its launcher with $CC, else gcc, else clang
for c in "${CC:-}" gcc clang "none"; do
  [ "$c" = none ] && echo "C compiler: none (the compiled arm will fail)" >> "$OUT/machine.txt"
  [ -n "$c" ] && command -v "$c" > /dev/null && { echo "C compiler: $("$c" --version | head -n 1)" >> "$OUT/machine.txt"; break; }
done

MODEL=/tmp/llama-1b-shape
python3 - "$MODEL" <<'PY' || { echo "could not build the model" | tee -a "$OUT/steps.txt"; exit 1; }
import shutil, sys, torch
from pathlib import Path
from transformers import LlamaConfig, LlamaForCausalLM
src, dst = Path(".gpu/smollm2-config"), Path(sys.argv[1])
config = LlamaConfig(  # meta-llama/Llama-3.2-1B's config.json
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, vocab_size=128256, tie_word_embeddings=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    bos_token_id=1, eos_token_id=2, pad_token_id=2)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(dst)
for f in src.iterdir():
    if f.name not in ("config.json", "generation_config.json") and f.is_file():
        shutil.copy(f, dst / f.name)
print("built", sum(p.numel() for p in model.parameters()) / 1e9, "B parameters")
PY

# The device tool returns at most 8 files: results JSON per step, steps.txt, machine.txt and logs.txt, which gets
# each step's output tail, the attention each trainer run chose, and a failed run's own log tail.
LOGS=/tmp/gpu-check-logs
mkdir -p "$LOGS"
step() {  # name seconds command...   (STEPS="name ..." in the environment runs only those)
  local name=$1 limit=$2 start=$SECONDS status f
  shift 2
  [[ -z "${STEPS:-}" || " $STEPS " == *" $name "* ]] || return 0
  touch "$LOGS/.start-$name"
  if timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1; then status=ok; else status="FAILED (exit $?)"; fi
  echo "$name: $status in $(( SECONDS - start )) s" | tee -a "$OUT/steps.txt"
  {
    echo "===== $name: $status"
    tail -n 40 "$LOGS/$name.log"
    for f in "$LFT_BENCH_DIR"/*.log "$LFT_BENCH_DIR"/runs/*/logs/*.log; do
      [ -f "$f" ] && [ "$f" -nt "$LOGS/.start-$name" ] || continue
      echo "--- $f"
      grep -h -e "^attention:" -e "^decoder layers:" "$f"
      [ "$status" = ok ] || tail -n 25 "$f"
    done
  } >> "$OUT/logs.txt" 2>&1
}
# Most wanted first: a step cut short by the device tool's limit loses only itself and what follows.
# Where an optimizer step's time goes (our trainer's own steps, 16 packed rows of 1,024 tokens: enough work to fill
# the GPU): the trainer's defaults, then with each decoder layer compiled (fused RMSNorm, SiLU x up, RoPE, residual
# adds: the 0.126 s per step of elementwise kernels the H200 profile found); MFU at that batch.
# shellcheck disable=SC2086  # PROFILE_ARMS is a list
step step-profile 180 python3 benchmarks/step_profile.py --device cuda --model-dir "$MODEL" --micro 16 \
  --max-len 1024 --steps 11 --out "$OUT/step_profile-cuda.json" --arms ${PROFILE_ARMS:-defaults compiled}
# Side by side with HF on the long tail (ours padded was 0.92x HF's on 2026-11-28, before the fused loss and varlen
# attention). Packed rows of 1,024 tokens hold ~9 examples: a packed micro-batch of 2 is about the 16 examples of
# the padded arms, so all arms make about as many optimizer steps over the same tokens.
# shellcheck disable=SC2086  # VARLEN_ARMS is a list
step trainers-varlen 220 python3 benchmarks/trainers.py --device cuda --model-dir "$MODEL" --datasets varlen \
  --rows 640 --micro 16 --packed-micro 2 --max-len 1024 --out "$OUT/trainers-varlen.json" \
  --arms ${VARLEN_ARMS:-hf-padded ours-padded ours-packed trl-packed}
step memory-plan 115 python3 benchmarks/memory_plan.py --device cuda --model-dir "$MODEL" \
  --configs mb8-s1024-checkpointing mb4-s1024-nf4 --out "$OUT/memory_plan-cuda.json"
step trainers-quickstart 110 python3 benchmarks/trainers.py --device cuda --model-dir "$MODEL" --datasets quickstart \
  --rows 1280 --micro 32 --max-len 1024 --out "$OUT/trainers-quickstart.json" --arms hf-padded ours-padded
# fp16 with loss scaling, what training.precision auto picks on GPUs before Ampere (none in the device pool; a
# Hopper GPU runs the same code): that it trains (finite, falling losses) and its step time beside bf16's above.
step fp16 100 python3 benchmarks/step_profile.py --device cuda --model-dir "$MODEL" --micro 16 --max-len 1024 \
  --steps 11 --out "$OUT/step_profile-fp16.json" --arms fp16
cat "$OUT/steps.txt"
