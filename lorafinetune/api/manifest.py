"""Loading a `kind: LoRAFineTune` manifest from YAML, with errors that name the field path and what is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from lorafinetune.api.base import APIModel
from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.api.status import LoRAFineTuneStatus

GROUP = "lorafinetune.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LoRAFineTune"
PLURAL = "lorafinetunes"
SINGULAR = "lorafinetune"
SHORT_NAMES = ["lft"]


class ObjectMeta(APIModel):
    """The part of metadata a manifest may set; the API server owns the rest."""

    model_config = APIModel.model_config | {"extra": "allow"}  # uid, resourceVersion, ... from the API server

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$", description="DNS-1123 label.")
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class LoRAFineTune(APIModel):
    """A LoRA fine-tune of a language model."""

    api_version: Literal["lorafinetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LoRAFineTune"]
    metadata: ObjectMeta
    spec: LoRAFineTuneSpec
    status: LoRAFineTuneStatus | None = None

    @field_validator("metadata")
    @classmethod
    def _name(cls, v: ObjectMeta) -> ObjectMeta:
        # Child names are `<name>-<attempt>-...`; keep room under the 63-character label limit.
        if len(v.name) > 40:
            raise ValueError(f"metadata.name {v.name!r} is {len(v.name)} characters; use at most 40")
        return v


class ManifestError(ValueError):
    """A manifest that cannot be used. `problems` lists one `path: message` line per problem."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: invalid LoRAFineTune manifest:\n" + "\n".join(f"  - {p}" for p in problems))


def describe_errors(err: ValidationError) -> list[str]:
    """One line per pydantic error: `spec.training.learningRate: Input should be greater than 0 (got -1)`."""
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"] if p not in ("function-after",)) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `kubectl explain lft.spec` lists valid fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"{path}: {msg}")
    return lines


def parse_manifest(data: object, source: str = "manifest") -> LoRAFineTune:
    """Validate an already-decoded manifest."""
    if not isinstance(data, dict):
        raise ManifestError(source, ["(top level): expected a mapping with apiVersion, kind, metadata and spec"])
    try:
        return LoRAFineTune.model_validate(data)
    except ValidationError as err:
        raise ManifestError(source, describe_errors(err)) from None


def load_manifest(path: str | Path) -> LoRAFineTune:
    """Read and validate one LoRAFineTune from a YAML file."""
    path = Path(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except FileNotFoundError:
        raise ManifestError(str(path), ["file not found"]) from None
    except yaml.YAMLError as err:
        raise ManifestError(str(path), [f"not valid YAML: {err}"]) from None
    if len(docs) != 1:
        raise ManifestError(str(path), [f"expected exactly one YAML document, found {len(docs)}"])
    return parse_manifest(docs[0], str(path))
