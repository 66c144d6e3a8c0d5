"""Base model and tokenizer loading (local folders, PVCs, packages, GGUF files, the Hugging Face Hub) and the LoRA wrap.

A GGUF model is dequantised by transformers, but then carries a quantisation marker that makes `Trainer`, PEFT
saving and `save_pretrained` refuse it. We rebuild it once as an ordinary float checkpoint in the cache and load
that from then on (same weights, trainable, saveable).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from lorafinetune.api.spec import PRECISION_DTYPE, LoRAFineTuneSpec, LoRASpec, ModelSpec, concrete_precision
from lorafinetune.contract import COMPLETE_MARKER, ENV_CACHE_DIR, write_json_atomic
from lorafinetune.storage import StorageError, local_path
from lorafinetune.trainer.errors import ConfigError, ModelError, TrainerError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cache_dir() -> Path:
    return Path(os.environ.get(ENV_CACHE_DIR, Path.home() / ".cache" / "lorafinetune"))


def load_dtype(spec: ModelSpec, precision: str) -> torch.dtype:
    return DTYPES[PRECISION_DTYPE[precision] if spec.dtype == "auto" else spec.dtype]


def native_bf16(on_gpu: bool, device_index: int = 0) -> bool:
    """Whether this process's device computes bf16 matrix multiplies natively: a GPU from Ampere (compute capability
    8.0) on, or a CPU as cpu_native_bf16 says. Reads device properties only (no CUDA context)."""
    if not on_gpu:
        return cpu_native_bf16()
    if device_index >= (visible := torch.cuda.device_count()):  # a node fault more often than a spec's: retried
        raise TrainerError(f"local rank {device_index} has no GPU: {visible} are visible to this process, fewer "
                           f"than resources.gpusPerNode")  # fmt: skip
    return torch.cuda.get_device_capability(device_index) >= (8, 0)


def cpu_native_bf16() -> bool:
    """An x86 CPU with AVX512-BF16 or AMX-BF16, or an Arm one with the BF16 extension. (On x86 oneDNN's own check,
    torch.ops.mkldnn._is_mkldnn_bf16_supported, also says yes for plain AVX512, where it emulates bf16.)"""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def with_concrete_precision(spec: LoRAFineTuneSpec, on_gpu: bool, device_index: int = 0) -> LoRAFineTuneSpec:
    """`spec` with training.precision `auto` replaced by what this device trains in (api.spec.concrete_precision);
    `spec` itself when it names one. The trainer resolves it before anything compares with it: checkpoints,
    published adapters and DeepSpeed's config all see the precision actually used."""
    t = spec.training
    if t.precision != "auto":
        return spec
    precision = concrete_precision(t.precision, on_gpu=on_gpu, native_bf16=native_bf16(on_gpu, device_index))
    return spec.model_copy(update={"training": t.model_copy(update={"precision": precision})})


def emulated_on_cpu(spec: ModelSpec, precision: str, native: bool | None = None) -> str | None:
    """Why training with these settings on this CPU will crawl, or None. bf16 matrix multiplies are native only
    where cpu_native_bf16 says so, fp16 ones only with AVX512-FP16 or AMX-FP16; elsewhere PyTorch emulates them.
    Measured on an AMD EPYC with AVX2 only (benchmarks/README, cpu_matmul.py): a SmolLM2 block's matrix multiplies
    ran at 0.05x fp32's speed in bf16, and a quick start step took 88 s in bf16, 95 % of it in them, against 27-33 s
    in fp32 with the test suite running beside it. `native`: the CPU's support, as detected unless given."""
    # DeepSpeed casts the model to bf16 or fp16 when the precision is one of those; fp32 computes in the load dtype.
    half = precision != "fp32"
    dtype = DTYPES[PRECISION_DTYPE[precision]] if half else load_dtype(spec, precision)
    if dtype not in (torch.bfloat16, torch.float16):
        return None
    if native is None:
        native = cpu_native_bf16() if dtype == torch.bfloat16 else torch.ops.mkldnn._is_mkldnn_fp16_supported()
    if native:
        return None
    field = f"training.precision {precision}" if half else f"model.dtype {spec.dtype}"
    name = str(dtype).removeprefix("torch.")
    return (f"{field} on this CPU ({torch.backends.cpu.get_cpu_capability()}): it has no native {name} matrix "
            f"multiply, so PyTorch emulates it (about 20x slower than fp32 on an AVX2 CPU); set training.precision: "
            f"auto (which picks what this CPU computes natively) and model.dtype: auto")  # fmt: skip


def resolve_model_dir(spec: ModelSpec, downloaded: Path | None = None) -> Path | str:
    """A local folder holding an ordinary HF checkpoint, or a Hub repo id. GGUF files are converted on first use.
    `downloaded` is where an s3:// model was fetched to (see trainer.remote)."""
    uri = spec.uri
    if uri.scheme == "hf":
        source: Path | str = uri.location
    else:
        try:
            source = downloaded if downloaded is not None else local_path(uri)
        except StorageError as err:
            raise ModelError(str(err)) from None
        if not source.is_dir():
            raise ModelError(f"model.uri {spec.uri}: {source} is not a folder")
        if spec.gguf_file and not (source / spec.gguf_file).is_file():
            found = sorted(p.name for p in source.glob("*.gguf"))
            raise ModelError(f"model.ggufFile {spec.gguf_file!r} is not in {source} (GGUF files there: {found})")
    if spec.gguf_file:
        return _converted_gguf(source, spec, revision=uri.revision)
    return source


_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_commit(repo: str, revision: str | None) -> str:
    """The commit that `revision` (a branch, tag or commit; default main) of a Hub repository names now.

    Resolved once per run and then loaded by commit, by every rank and every later attempt (the checkpoints record
    it): a push to the branch during a run must not give two ranks, or a retry, another model. Offline
    (HF_HUB_OFFLINE=1), the Hugging Face cache's refs say which commit the branch names."""
    if revision and _COMMIT.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        cached = try_to_load_from_cache(repo, "config.json", revision=revision or "main")
        if isinstance(cached, str):
            return Path(cached).parent.name  # .../snapshots/<commit>/config.json
        raise ModelError(
            f"could not load {repo!r} from the Hugging Face Hub (offline, HF_HUB_OFFLINE=1, and revision "
            f"{revision or 'main'!r} is not in the Hugging Face cache). If this machine is offline, copy the model "
            f"to a PVC or folder and use pvc:// or file:// instead"
        )
    try:
        return HfApi().model_info(repo, revision=revision).sha
    except Exception as err:  # noqa: BLE001 - network, auth, missing repo or revision: all mean "cannot load it"
        raise _hub_error(repo, err) from None


def _hub_error(source: Path | str, err: Exception) -> ModelError:
    if isinstance(source, str):
        return ModelError(
            f"could not load {source!r} from the Hugging Face Hub ({type(err).__name__}: {err}). If this machine is "
            f"offline, copy the model to a PVC or folder and use pvc:// or file:// instead"
        )
    return ModelError(f"could not load the model in {source}: {type(err).__name__}: {err}")


def _converted_gguf(source: Path | str, spec: ModelSpec, revision: str | None) -> Path:
    """Dequantise a GGUF file into a cached float checkpoint, once per file (file-locked across local ranks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert spec.gguf_file, "called for a GGUF model only"
    ident = f"{source}|{spec.gguf_file}|{revision}"
    if isinstance(source, Path):
        st = (source / spec.gguf_file).stat()
        ident += f"|{st.st_size}|{st.st_mtime_ns}"
    target = cache_dir() / "models" / hashlib.sha256(ident.encode()).hexdigest()[:16]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{target}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first local rank converts; the others wait and reuse
        if (target / COMPLETE_MARKER).is_file() and (target / "config.json").is_file():
            return target
        shutil.rmtree(target, ignore_errors=True)  # incomplete (e.g. left by an older version): convert again
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        try:
            kw: dict[str, Any] = {"gguf_file": spec.gguf_file, "revision": revision}
            tok = AutoTokenizer.from_pretrained(source, **kw)
            gguf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kw)
        except (OSError, ValueError) as err:
            raise _hub_error(source, err) from None
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.tie_weights()
        # Call this before the process group exists: once torch.distributed is initialised, transformers writes
        # weights on rank 0 only, and a conversion by rank 1 (whoever holds the lock) once left no config.json.
        model.save_pretrained(staging)
        tok.save_pretrained(staging)
        written = {p.name for p in staging.iterdir()}
        if "config.json" not in written or not any(n.endswith(".safetensors") for n in written):
            raise ModelError(f"converting {spec.gguf_file} wrote no weights to {staging} (found {sorted(written)})")
        write_json_atomic(staging / COMPLETE_MARKER, {"source": str(source), "ggufFile": spec.gguf_file})
        os.replace(staging, target)
    return target


def load_tokenizer(source: Path | str, spec: ModelSpec, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # safe: padding is masked by position, never by token id
    return tok


def load_base_model(source: Path | str, spec: ModelSpec, dtype: torch.dtype, revision: str | None = None,
                    quantized_on: torch.device | None = None) -> Any:  # fmt: skip
    """The base model in `dtype`; with `quantized_on`, its decoder's linear layers quantized as spec.quantization
    says, placed on that device (bitsandbytes quantizes while loading, layer by layer: the full-precision model is
    never in memory at once)."""
    from transformers import AutoModelForCausalLM

    kw: dict[str, Any] = {}
    if quantized_on is not None and spec.quantization:
        kw = {"quantization_config": _bnb_config(spec.quantization, dtype), "device_map": {"": quantized_on}}
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, revision=revision, trust_remote_code=spec.trust_remote_code,
            attn_implementation="sdpa", **kw,
        )  # fmt: skip
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None
    for module in loaded.modules() if kw else ():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # bitsandbytes (0.50.2) repacks a 4-bit weight for its AVX512-BF16 CPU kernel the first time the layer
            # runs in eval mode without grad, i.e. at the first evaluation, and that kernel has no backward: every
            # later training step would pass no gradient through the frozen layers (layers narrower than a
            # quantization block fail outright). Found on an AMD EPYC with avx512_bf16; the trainer evaluates
            # between steps, so the repacking is off.
            module.support_avx512bf16_for_cpu = False
    return loaded


QUANTIZED_LINEARS = ("Linear4bit", "Linear8bitLt")  # bitsandbytes' layer classes, by name: it loads only if used


def _bnb_config(quantization: str, compute_dtype: torch.dtype) -> Any:
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401 - transformers' own message on a missing package names no spec field
    except ImportError:
        raise ConfigError(
            f"model.quantization: {quantization} needs the bitsandbytes package (pip install bitsandbytes; the "
            f"project's image has it); remove model.quantization to train on the unquantized base"
        ) from None
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype)  # fmt: skip


def load_config(spec: ModelSpec, downloaded: Path | None = None) -> dict[str, Any]:
    """The model's config.json as a dict, without its weights: from a folder, a GGUF file's header or the Hub."""
    from transformers import AutoConfig

    uri = spec.uri
    if uri.scheme == "s3" and downloaded is None:
        raise ModelError(f"model.uri {spec.uri}: reading an s3:// model's config needs the model fetched; pass the "
                         f"config.json itself instead (lorafinetune plan --model-config FILE)")  # fmt: skip
    source: Path | str = uri.location if uri.scheme == "hf" else (downloaded or local_path(uri))
    kw: dict[str, Any] = {"revision": uri.revision, "trust_remote_code": spec.trust_remote_code}
    if spec.gguf_file:
        kw["gguf_file"] = spec.gguf_file
    try:
        return AutoConfig.from_pretrained(source, **kw).to_dict()
    except (OSError, ValueError) as err:
        raise _hub_error(source, err) from None


def lora_config(spec: LoRASpec) -> Any:
    from peft import LoraConfig

    targets: str | list[str] = "all-linear" if spec.target_modules == ["all-linear"] else spec.target_modules
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        task_type="CAUSAL_LM",
    )


def wrap_with_lora(model: Any, spec: LoRASpec, gradient_checkpointing: bool) -> Any:
    """Freeze the base and add LoRA modules; a target list that matches nothing is a clear error."""
    from peft import get_peft_model

    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    try:
        return get_peft_model(model, lora_config(spec))
    except ValueError as err:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(
            f"lora.targetModules {spec.target_modules}: {err} (linear modules in this model: {names})"
        ) from None
