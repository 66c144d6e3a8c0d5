"""The LoRAFineTune API: typed spec and status, manifest loading, storage URIs and the CRD generator."""

from lorafinetune.api.manifest import LoRAFineTune, ManifestError, load_manifest, parse_manifest
from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.api.status import LoRAFineTuneStatus
from lorafinetune.api.uris import StorageURI, parse_uri

__all__ = [
    "LoRAFineTune", "LoRAFineTuneSpec", "LoRAFineTuneStatus", "ManifestError", "StorageURI",
    "load_manifest", "parse_manifest", "parse_uri",
]  # fmt: skip
