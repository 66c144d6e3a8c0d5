"""`lorafinetune` command line: validate, run, evaluate, plot, crd.

    lorafinetune validate examples/quickstart.yaml
    lorafinetune run examples/quickstart.yaml --pvc quickstart-data=examples/data
    lorafinetune evaluate examples/quickstart.yaml --pvc quickstart-data=examples/data
    lorafinetune plan examples/quickstart.yaml --pvc quickstart-data=examples/data --gpu-memory 24Gi
    lorafinetune crd | kubectl apply -f -   # the CRD, generated from the API models
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lorafinetune.api.manifest import ManifestError, load_manifest


def _pvc_mount(value: str) -> tuple[str, Path]:
    claim, sep, path = value.partition("=")
    if not sep or not claim or not path:
        raise argparse.ArgumentTypeError(f"--pvc {value!r}: expected CLAIM=DIR, e.g. --pvc data=./examples/data")
    return claim, Path(path).resolve()


def _add_local_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="LoRAFineTune YAML file")
    p.add_argument(
        "--pvc", type=_pvc_mount, action="append", default=[], metavar="CLAIM=DIR",
        help="map pvc://CLAIM/... to a local folder (repeatable)",
    )  # fmt: skip
    p.add_argument("--pvc-root", type=Path, default=Path("runs"), help="folder for other claims (default: ./runs)")


def _options(args: argparse.Namespace):
    from lorafinetune.local.runner import LocalOptions

    return LocalOptions(
        pvc_root=args.pvc_root.resolve(),
        pvc_mounts=dict(args.pvc),
        metrics_port=getattr(args, "metrics_port", 0),
    )


def cmd_validate(args: argparse.Namespace) -> int:
    lft = load_manifest(args.manifest, cluster=args.cluster)
    s = lft.spec
    where = "in a cluster" if args.cluster else "for local runs"
    print(
        f"{args.manifest}: valid {where}: LoRAFineTune {lft.metadata.name!r}: {s.resources.nodes} node(s) x "
        f"{s.resources.procs_per_node} process(es), ZeRO-{s.deepspeed.zero_stage}, LoRA r={s.lora.r}"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from lorafinetune.local.runner import run_local

    return run_local(load_manifest(args.manifest), _options(args), show_progress=not args.quiet)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lorafinetune.api.spec import LoRAFineTuneSpec
    from lorafinetune.contract import ADAPTER_DIR
    from lorafinetune.local.runner import render_local_config
    from lorafinetune.storage import local_path
    from lorafinetune.trainer.evaluate import evaluate_adapter, print_report

    spec = LoRAFineTuneSpec.model_validate(render_local_config(load_manifest(args.manifest), _options(args))["spec"])
    if spec.output.uri.scheme != "file":
        print(f"output.uri {spec.output.uri}: evaluate reads the adapter from a local run (pvc:// or file://)")
        return 2
    run_dir = local_path(spec.output.uri)
    adapter = args.adapter or run_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        print(f"no adapter in {adapter}: run `lorafinetune run` first, or pass --adapter")
        return 2
    print_report(evaluate_adapter(spec, adapter, run_dir, args.limit))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from lorafinetune.plan import GIB, PlanError, estimate, parse_memory

    lft = load_manifest(args.manifest)
    spec, res = lft.spec, lft.spec.resources
    try:
        if args.model_config:
            config = json.loads(args.model_config.read_text())
        else:
            from lorafinetune.api.spec import LoRAFineTuneSpec
            from lorafinetune.local.runner import render_local_config
            from lorafinetune.trainer import model
            from lorafinetune.trainer.errors import ModelError

            try:
                local = LoRAFineTuneSpec.model_validate(render_local_config(lft, _options(args))["spec"])
                config = model.load_config(local.model)
            except ModelError as err:
                print(err, file=sys.stderr)
                return 2
        size = args.gpu_memory or res.gpu_memory
        capacity, where = (parse_memory(size, "--gpu-memory"), "per GPU") if size else _local_capacity(res)
        if not res.gpus_per_node and spec.training.precision == "auto":  # a local run: auto as the trainer resolves it
            from lorafinetune.trainer.model import with_concrete_precision

            spec = with_concrete_precision(spec, on_gpu=False)
        plan = estimate(spec, config, capacity)
    except (PlanError, OSError, json.JSONDecodeError) as err:
        print(f"cannot plan {args.manifest}: {err}", file=sys.stderr)
        return 2
    device = f"{res.gpus_per_node} GPU(s)" if res.gpus_per_node else "CPU"
    print(f"{lft.metadata.name}: {plan.base_parameters / 1e9:.2f} B parameters, LoRA r={spec.lora.r} "
          f"({plan.trainable_parameters / 1e6:.1f} M trainable), {res.nodes} node(s) x {res.procs_per_node} "
          f"process(es) on {device}, ZeRO-{spec.deepspeed.zero_stage}, {plan.precision}"
          f"{_auto_note(plan.device) if lft.spec.training.precision == 'auto' else ''}")  # fmt: skip
    print(f"peak memory per {'GPU' if res.gpus_per_node else 'process'} (estimate):")
    print(plan.table())
    if plan.fits is None or capacity is None:
        print("no verdict: pass --gpu-memory (e.g. 80Gi) or set resources.gpuMemory")
        return 0
    print(f"{'fits' if plan.fits else 'DOES NOT FIT'}: {plan.total / GIB:.1f} GiB of {capacity / GIB:.1f} GiB {where}")
    for s in plan.suggestions:
        print(f"  would fit: {s}")
    if plan.fits is False and not plan.suggestions:
        print("  nothing this planner tries makes it fit: a larger GPU, a smaller model or shorter sequences")
    return 0 if plan.fits else 1


def _auto_note(device: str) -> str:
    if device == "gpu":
        return " (training.precision auto; fp16, the same size, on GPUs before Ampere)"
    return " (training.precision auto, on this CPU)"


def _local_capacity(res) -> tuple[int | None, str]:
    """On CPU: this machine's available memory shared by the processes of one node. On GPUs: unknown."""
    if res.gpus_per_node:
        return None, ""
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return available // res.procs_per_node, f"per process (this machine's available memory / {res.procs_per_node})"


def cmd_plot(args: argparse.Namespace) -> int:
    from lorafinetune import plots

    if args.summary:
        name, history = plots.history_from_summary(args.summary)
    else:
        name, history = args.finetune, plots.history_from_prometheus(args.prometheus, args.finetune, args.namespace,
                                                                     since_s=args.since)  # fmt: skip
    if not history:
        print("no loss data found (check --finetune / --namespace, and that Prometheus scrapes the trainer)")
        return 1
    plots.plot_loss_curves(history, args.output, f"{name}: loss per trained token")
    print(f"wrote {args.output} ({len(history)} steps)")
    return 0


def cmd_crd(args: argparse.Namespace) -> int:
    from lorafinetune.generate.crd import render_crd

    sys.stdout.write(render_crd())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafinetune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a manifest without running it")
    p.add_argument("manifest", type=Path)
    p.add_argument("--cluster", action="store_true",
                   help="also the rules of a cluster, as the API server applies them (no file:// or package:// "
                   "URIs, a name that can name a Service); without it, what `lorafinetune run` accepts")  # fmt: skip
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="run a manifest on this machine (local ranks over gloo)")
    _add_local_flags(p)
    p.add_argument("--metrics-port", type=int, default=0, help="serve rank 0's Prometheus metrics on this port")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("evaluate", help="validation loss and task score of the base model and the adapter")
    _add_local_flags(p)
    p.add_argument("--adapter", type=Path, help="adapter folder (default: <output>/adapter)")
    p.add_argument("--limit", type=int, default=None, help="score at most this many held-out prompts")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plan", help="per-process peak memory of a manifest, whether it fits, and what would")
    _add_local_flags(p)
    p.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU, e.g. 80Gi (default: resources.gpuMemory)")
    p.add_argument("--model-config", type=Path, metavar="FILE",
                   help="the model's config.json, instead of reading it from model.uri")  # fmt: skip
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("plot", help="PNG of a run's loss curves, from its summary or from Prometheus")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--summary", type=Path, help="a training_summary.json")
    src.add_argument("--prometheus", help="Prometheus base URL, e.g. http://127.0.0.1:9090 (needs --finetune)")
    p.add_argument("--finetune", help="the LoRAFineTune's name (the `finetune` label)")
    p.add_argument("--namespace", help="its namespace (the `namespace` label)")
    p.add_argument("--since", type=float, default=6 * 3600, help="seconds of history to read (default 6 h)")
    p.add_argument("-o", "--output", type=Path, default=Path("loss_curve.png"), help="PNG to write")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("crd", help="print the CustomResourceDefinition generated from the API (| kubectl apply -f -)")
    p.set_defaults(func=cmd_crd)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "prometheus", None) and not args.finetune:
        parser.error("--prometheus needs --finetune NAME")
    try:
        return args.func(args)
    except ManifestError as err:
        print(err, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
