"""The CustomResourceDefinition, generated from the pydantic models of lorafinetune.api (the only source of the schema).

    lorafinetune crd | kubectl apply -f -     (make generate writes it to crds/, with the chart's files)

Pydantic emits JSON Schema 2020-12; Kubernetes wants a *structural* OpenAPI v3.0 schema: no $ref, no anyOf for
optional fields, `exclusiveMinimum` as a boolean, every object typed. `to_structural` does that translation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from lorafinetune.api.manifest import GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION, LoRAFineTune
from lorafinetune.api.spec import LoRAFineTuneSpec
from lorafinetune.api.status import LoRAFineTuneStatus

REPO = Path(__file__).resolve().parents[2]  # the generated files are written into the source tree
CRD_PATH = REPO / "crds" / f"{GROUP}_{PLURAL}.yaml"

_KEPT = {
    "type", "description", "enum", "default", "minimum", "maximum", "minLength", "maxLength", "pattern",
    "minItems", "maxItems", "items", "properties", "required", "additionalProperties", "format", "maxProperties",
    "x-kubernetes-validations", "x-kubernetes-preserve-unknown-fields",
}  # fmt: skip

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "string", "jsonPath": ".status.progress.summary"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.trainLoss"},
    {"name": "Eval Loss", "type": "number", "jsonPath": ".status.progress.evalLoss"},
    {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt"},
    {"name": "ETA", "type": "number", "jsonPath": ".status.progress.etaSeconds", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def to_structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Translate one pydantic JSON-Schema node into a structural OpenAPI v3 node."""
    if "$ref" in schema:
        target = defs[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        rules = target.get("x-kubernetes-validations", []) + schema.get("x-kubernetes-validations", [])
        if rules:  # the type's own rules and the field's (e.g. immutability) both apply
            merged["x-kubernetes-validations"] = rules
        return to_structural(merged, defs)
    if "anyOf" in schema:  # Optional[X] -> X; the field is simply not required
        options = [o for o in schema["anyOf"] if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express a union of {len(options)} types structurally: {schema}")
        merged = {**options[0], **{k: v for k, v in schema.items() if k not in ("anyOf", "default")}}
        return to_structural(merged, defs)
    out: dict[str, Any] = {}
    if "const" in schema:
        out["enum"] = [schema["const"]]
    if "exclusiveMinimum" in schema:
        out["minimum"], out["exclusiveMinimum"] = schema["exclusiveMinimum"], True
    if "exclusiveMaximum" in schema:
        out["maximum"], out["exclusiveMaximum"] = schema["exclusiveMaximum"], True
    for key, value in schema.items():
        if key not in _KEPT or (key == "default" and value is None):
            continue
        if key == "additionalProperties" and isinstance(value, bool):
            continue  # not allowed in structural schemas; the API server prunes or (strict) rejects unknown fields
        if key == "properties":
            value = {name: to_structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = to_structural(value, defs)
        out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out["type"] = "object"
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _schema_of(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return to_structural(raw, raw.get("$defs", {}))


def build_crd() -> dict[str, Any]:
    """The complete CustomResourceDefinition object."""
    root = {
        "type": "object",
        "description": "A LoRA fine-tune of a language model.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _schema_of(LoRAFineTuneSpec),
            "status": _schema_of(LoRAFineTuneStatus),
        },
        "x-kubernetes-validations": [rule.cel() for rule in LoRAFineTune.RULES],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": ["all", "ml"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd() -> str:
    header = "# Generated by `make generate` from lorafinetune/api. Do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)
