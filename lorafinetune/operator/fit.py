"""Will the fine-tune fit in a GPU's memory? Asked once, before the first attempt, so that a run that cannot fit never
holds a GPU: it is held back with Ready=False, reason WontFit, the numbers and what to change (lorafinetune.plan).

Needs two facts, and checks nothing when either is unknown:
- the memory of one GPU: `resources.gpuMemory`, else the largest `nvidia.com/gpu.memory` label (MiB, set by NVIDIA's
  GPU feature discovery) among the nodes that have GPUs and match `resources.nodeSelector`;
- the model's config.json: read from the Hugging Face Hub for hf:// models (LFT_HUB_ENDPOINT; empty turns the
  check off). The operator reads no PVC, bucket or secret, so other models, and gated ones, are not checked here;
  `lorafinetune plan` checks them where the files are.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.api.uris import StorageURI
from lorafinetune.plan import GIB, PlanError, estimate, parse_memory

log = logging.getLogger(__name__)
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
CONFIG_TIMEOUT_SECONDS = 5.0
RETRY_UNREADABLE_SECONDS = 300.0  # a Hub that did not answer is asked again after this, not on every reconcile
_configs: dict[tuple[str, str], tuple[float, dict[str, Any] | None]] = {}


def wont_fit(spec: LoRAFineTuneSpec, nodes: Iterable[dict[str, Any]], hub: str) -> tuple[str, str] | None:
    """("WontFit", message) when the estimate exceeds one GPU's memory; None when it fits or cannot be told."""
    if not spec.resources.gpus_per_node or not hub:
        return None
    capacity, source = _gpu_memory(spec, nodes)
    if capacity is None:
        return None
    config = model_config(spec.model.uri, hub)
    if config is None:
        return None
    try:
        plan = estimate(spec, config, capacity)
    except PlanError as err:
        log.info("no memory check for %s: %s", spec.model.uri, err)
        return None
    if plan.fits:
        return None
    # Training settings are immutable: the way on is a new fine-tune, a nodeSelector for larger GPUs, or an override.
    advice = (f"; create it again with {plan.suggestions[0]}" if plan.suggestions
              else "; no change this planner tries makes it fit")  # fmt: skip
    return "WontFit", (
        f"the estimated peak is {plan.total / GIB:.1f} GiB per GPU but {source} gives {capacity / GIB:.1f} GiB"
        f"{advice}. `lorafinetune plan` shows the breakdown; resources.gpuMemory overrules the check"
    )


def _gpu_memory(spec: LoRAFineTuneSpec, nodes: Iterable[dict[str, Any]]) -> tuple[int | None, str]:
    if spec.resources.gpu_memory:
        return parse_memory(spec.resources.gpu_memory, "resources.gpuMemory"), "resources.gpuMemory"
    wanted = spec.resources.node_selector or {}
    best: tuple[int, str] | None = None
    for node in nodes:
        labels = node["metadata"].get("labels") or {}
        gpus = (node.get("status", {}).get("allocatable") or {}).get("nvidia.com/gpu", "0")
        if int(gpus) == 0 or any(labels.get(k) != v for k, v in wanted.items()) or GPU_MEMORY_LABEL not in labels:
            continue
        try:
            size = parse_memory(f"{labels[GPU_MEMORY_LABEL]}Mi", GPU_MEMORY_LABEL)
        except PlanError:
            continue
        if best is None or size > best[0]:
            best = size, f"node {node['metadata']['name']} ({GPU_MEMORY_LABEL}={labels[GPU_MEMORY_LABEL]} MiB)"
    return (best[0], best[1]) if best else (None, "")


def model_config(uri: StorageURI, hub: str) -> dict[str, Any] | None:
    """config.json of an hf:// model (cached; an unreadable one is retried after a while), else None."""
    if uri.scheme != "hf":
        return None
    key = (uri.location, uri.revision or "main")
    cached = _configs.get(key)
    if cached and (cached[1] is not None or time.monotonic() - cached[0] < RETRY_UNREADABLE_SECONDS):
        return cached[1]
    url = f"{hub.rstrip('/')}/{uri.location}/resolve/{urllib.parse.quote(key[1], safe='')}/config.json"
    config: dict[str, Any] | None = None
    try:
        with urllib.request.urlopen(url, timeout=CONFIG_TIMEOUT_SECONDS) as response:
            loaded = json.load(response)
        config = loaded if isinstance(loaded, dict) else None
    except (OSError, ValueError) as err:  # offline, gated (401), missing (404), not JSON: no check, no failure
        log.info("no memory check for %s: cannot read its config.json (%s)", uri, err)
    _configs[key] = (time.monotonic(), config)
    return config
