"""Loading a `kind: LoRAFineTune` manifest from YAML, with errors that name the field path and what is valid."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError

from lorafinetune.api.base import CLUSTER, APIModel
from lorafinetune.api.rules import F, Rule
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

    # Any Kubernetes object name; in a cluster also a DNS-1035 label (LoRAFineTune.RULES), since it names a Service.
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=253, description="Object name.")
    namespace: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class LoRAFineTune(APIModel):
    """A LoRA fine-tune of a language model."""

    RULES = (
        # Child names are `<name>-a<attempt>-<index>-...`: keep room under the 63-character label limit.
        Rule(~(F("metadata.name").size() > 40), "metadata.name must be at most 40 characters (child object names "
             "append a suffix)"),
        Rule(F("metadata.name").matches("^[a-z]([-a-z0-9]*[a-z0-9])?$"), "metadata.name must be a DNS-1035 label in "
             "a cluster (lower-case letters, digits and '-', starting with a letter): it also names the fine-tune's "
             "headless Service", cluster=True),
    )  # fmt: skip

    api_version: Literal["lorafinetune.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LoRAFineTune"]
    metadata: ObjectMeta
    spec: LoRAFineTuneSpec
    status: LoRAFineTuneStatus | None = None


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


def parse_manifest(data: object, source: str = "manifest", cluster: bool = False) -> LoRAFineTune:
    """Validate an already-decoded manifest; `cluster`: also the rules that only hold in a cluster (rules.py)."""
    if not isinstance(data, dict):
        raise ManifestError(source, ["(top level): expected a mapping with apiVersion, kind, metadata and spec"])
    try:
        return LoRAFineTune.model_validate(data, context={CLUSTER: cluster})
    except ValidationError as err:
        raise ManifestError(source, describe_errors(err)) from None


def load_manifest(path: str | Path, cluster: bool = False) -> LoRAFineTune:
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
    return parse_manifest(docs[0], str(path), cluster)
