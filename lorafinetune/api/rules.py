"""Validation rules written once, enforced twice: by the API server and by `lorafinetune validate`.

A rule is a small expression over the fields of one API type (camelCase names, as in the manifest). It compiles to
CEL for the CRD's `x-kubernetes-validations` and evaluates in Python in a pydantic validator, so the two cannot drift:

    Rule(~F("offloadParams") | (F("zeroStage") == 3), "deepspeed.offloadParams needs zeroStage 3")

Both sides see the same object: the manifest with defaults filled in and unset optional fields absent (the API server
applies the schema's defaults before validating). An absent field must be guarded with `.has()`, as CEL requires;
reading one without a guard raises in Python too, so a missing guard shows up in the unit tests rather than as an
API server error.

`cluster=True` marks a rule that only holds in a cluster (no file:// or package:// URIs, names that fit the
children's name limits): always in the CRD, in Python only when validating for a cluster (`validate --cluster`, the
operator), never in local runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class _Absent(LookupError):
    """A field read without a has() guard (CEL: "no such key")."""


class Expr:
    """A node of a rule: `cel()` renders it, `eval(obj)` computes it on the manifest-shaped dict of the type."""

    def cel(self) -> str:
        raise NotImplementedError

    def eval(self, obj: dict[str, Any]) -> Any:
        raise NotImplementedError

    def __and__(self, other: Expr) -> Expr:
        return _Logic("&&", self, other)

    def __or__(self, other: Expr) -> Expr:
        return _Logic("||", self, other)

    def __invert__(self) -> Expr:
        return _Not(self)

    def __eq__(self, other: object) -> Expr:  # type: ignore[override]
        return _Compare("==", self, _lift(other))

    def __ne__(self, other: object) -> Expr:  # type: ignore[override]
        return _Compare("!=", self, _lift(other))

    def __gt__(self, other: object) -> Expr:
        return _Compare(">", self, _lift(other))

    def __ge__(self, other: object) -> Expr:
        return _Compare(">=", self, _lift(other))

    def __hash__(self) -> int:
        return id(self)


def _lift(value: object) -> Expr:
    return value if isinstance(value, Expr) else _Const(value)


@dataclass(eq=False)
class _Const(Expr):
    value: Any

    def cel(self) -> str:
        return json.dumps(self.value) if not isinstance(self.value, str) else "'" + self.value.replace("'", "\\'") + "'"

    def eval(self, obj: dict[str, Any]) -> Any:
        return self.value


@dataclass(eq=False)
class F(Expr):
    """A field of the type the rule belongs to (dotted for nested fields: `"metadata.name"`)."""

    path: str

    def cel(self) -> str:
        return f"self.{self.path}"

    def eval(self, obj: dict[str, Any]) -> Any:
        value: Any = obj
        for part in self.path.split("."):
            if not isinstance(value, dict) or part not in value:
                raise _Absent(self.path)
            value = value[part]
        return value

    def has(self) -> Expr:
        return _Has(self)

    def startswith(self, prefix: str) -> Expr:
        return _Call("startsWith", self, prefix, lambda v, p: v.startswith(p))

    def matches(self, regex: str) -> Expr:
        """RE2 in the API server, `re` here: keep to the syntax both share (no lookaround, no backreferences)."""
        return _Call("matches", self, regex, lambda v, r: re.search(r, v) is not None)

    def contains(self, item: str) -> Expr:
        return _Contains(self, item)

    def size(self) -> Expr:
        return _Size(self)


@dataclass(eq=False)
class _Has(Expr):
    field: F

    def cel(self) -> str:
        parts = self.field.path.split(".")  # has() takes one selection: guard each level
        return " && ".join(f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))

    def eval(self, obj: dict[str, Any]) -> bool:
        try:
            self.field.eval(obj)
            return True
        except _Absent:
            return False


@dataclass(eq=False)
class _Call(Expr):
    method: str
    target: F
    argument: str
    python: Callable[[Any, str], bool]

    def cel(self) -> str:
        return f"{self.target.cel()}.{self.method}({_Const(self.argument).cel()})"

    def eval(self, obj: dict[str, Any]) -> bool:
        return self.python(self.target.eval(obj), self.argument)


@dataclass(eq=False)
class _Contains(Expr):
    target: F
    item: str

    def cel(self) -> str:
        return f"{_Const(self.item).cel()} in {self.target.cel()}"

    def eval(self, obj: dict[str, Any]) -> bool:
        return self.item in self.target.eval(obj)


@dataclass(eq=False)
class _Size(Expr):
    target: F

    def cel(self) -> str:
        return f"size({self.target.cel()})"

    def eval(self, obj: dict[str, Any]) -> int:
        return len(self.target.eval(obj))


@dataclass(eq=False)
class _Compare(Expr):
    op: str
    left: Expr
    right: Expr

    def cel(self) -> str:
        return f"{self.left.cel()} {self.op} {self.right.cel()}"

    def eval(self, obj: dict[str, Any]) -> bool:
        a, b = self.left.eval(obj), self.right.eval(obj)
        return {"==": a == b, "!=": a != b, ">": a > b, ">=": a >= b}[self.op]


@dataclass(eq=False)
class _Logic(Expr):
    op: str
    left: Expr
    right: Expr

    def cel(self) -> str:
        return f"({self.left.cel()} {self.op} {self.right.cel()})"

    def eval(self, obj: dict[str, Any]) -> bool:
        # Left to right with short-circuit; CEL's && and || are commutative about errors, so a rule whose guard
        # comes first means the same on both sides.
        if self.op == "&&":
            return bool(self.left.eval(obj)) and bool(self.right.eval(obj))
        return bool(self.left.eval(obj)) or bool(self.right.eval(obj))


@dataclass(eq=False)
class _Not(Expr):
    inner: Expr

    def cel(self) -> str:
        return f"!({self.inner.cel()})"

    def eval(self, obj: dict[str, Any]) -> bool:
        return not self.inner.eval(obj)


@dataclass(frozen=True)
class Rule:
    """`holds` must be true of every valid object; `message` says what to change, naming the field."""

    holds: Expr
    message: str
    cluster: bool = False

    def cel(self) -> dict[str, str]:
        return {"rule": self.holds.cel(), "message": self.message}

    def check(self, obj: dict[str, Any]) -> bool:
        return bool(self.holds.eval(obj))
