"""What runs in each pod (or local rank): data, model + LoRA, DeepSpeed engine, evaluation, checkpoints, output."""

import logging
import warnings

# On CPUs with AVX512-BF16, importing bitsandbytes (peft does) warns that it cannot fetch an inference-only 4-bit
# kernel from the hub. The trainer turns that kernel off (it has no backward: model.py), and no run may reach a hub,
# so the warning was noise in every run's and every evaluation's output.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# PEFT reads `model.is_gradient_checkpointing` whenever it wraps a model, a property transformers 5 deprecates with a
# FutureWarning: two lines about code that is not ours, in the quick start's evaluation output.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
