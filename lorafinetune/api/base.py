"""The base model every API type derives from: camelCase field names on the wire, unknown fields refused."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel


class APIModel(BaseModel):
    """Fields are snake_case in Python and camelCase in manifests, like every Kubernetes API."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",  # a typo such as `learningrate` must fail, not be silently ignored
        validate_assignment=True,
    )

    def to_manifest(self) -> dict:
        """The camelCase dict a manifest or the API server holds, without unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
