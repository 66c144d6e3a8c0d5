"""The base model every API type derives from: camelCase field names on the wire, unknown fields refused, and the
type's cross-field rules (rules.py) checked here and written into the CRD from the same declaration."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, ValidationInfo, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import core_schema as cs

from lorafinetune.api.rules import Rule

CLUSTER = "cluster"  # validation context key: True when the object is meant for a cluster (validate --cluster)


class APIModel(BaseModel):
    """Fields are snake_case in Python and camelCase in manifests, like every Kubernetes API."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",  # a typo such as `learningrate` must fail, not be silently ignored
        validate_assignment=True,
    )
    # This type's own rules (not inherited): each becomes one x-kubernetes-validations entry of its schema.
    RULES: ClassVar[tuple[Rule, ...]] = ()

    def to_manifest(self) -> dict:
        """The camelCase dict a manifest or the API server holds, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")

    @model_validator(mode="after")
    def _rules_hold(self, info: ValidationInfo) -> Any:
        rules = type(self).__dict__.get("RULES", ())
        if rules:
            for_cluster = bool((info.context or {}).get(CLUSTER))
            obj = self.to_manifest()
            for rule in rules:
                if (for_cluster or not rule.cluster) and not rule.check(obj):
                    raise ValueError(rule.message)
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: cs.CoreSchema, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        json_schema = handler(schema)
        rules = cls.__dict__.get("RULES", ())
        if rules:
            target = handler.resolve_ref_schema(json_schema)
            target.setdefault("x-kubernetes-validations", []).extend(rule.cel() for rule in rules)
        return json_schema
