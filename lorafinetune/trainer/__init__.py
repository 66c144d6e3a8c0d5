"""What runs in each pod (or local rank): data, model + LoRA, DeepSpeed engine, evaluation, checkpoints, output."""
