"""Problems found in routes.yaml reported at their line and column: pydantic's errors and the
cross-references checked on the raw document."""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel

from router.config.model import RouterConfig
from router.config_source import ConfigDocument, ConfigPath


def check_references(document: ConfigDocument) -> None:
    """Cross-references checked on the raw data, so they are reported beside any model error."""
    data = document.data
    targets = data.get("targets")
    target_names = list(targets) if isinstance(targets, dict) else []
    routes = data.get("routes")
    seen: dict[str, int] = {}
    for index, route in enumerate(routes if isinstance(routes, list) else []):
        if not isinstance(route, dict):
            continue
        name = route.get("name")
        if isinstance(name, str):
            if name in seen:
                document.problem(
                    ("routes", index, "name"),
                    f"route name {name!r} is used twice (first by routes[{seen[name]}])",
                )
            seen.setdefault(name, index)
        deliver = route.get("deliver")
        for position, item in enumerate(deliver if isinstance(deliver, list) else []):
            target = item.get("target") if isinstance(item, dict) else item
            if isinstance(target, str) and target not in target_names:
                document.problem(
                    ("routes", index, "deliver", position), unknown("target", target, target_names)
                )


def unknown(what: str, name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]!r}?" if close else f"defined: {', '.join(known) or 'none'}"
    return f"unknown {what} {name!r}; {hint}"


def _data_path(data: Any, loc: tuple[str | int, ...]) -> ConfigPath:
    """The path in the document for a pydantic error location (union tags are not in the document)."""
    path: list[str | int] = []
    node = data
    for index, part in enumerate(loc):
        in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
        if in_list or (isinstance(node, dict) and part in node):
            node = node[part]
        elif index < len(loc) - 1:
            continue
        path.append(part)
    return tuple(path)


def _display(path: ConfigPath) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "the configuration"


def report_validation_error(document: ConfigDocument, item: Mapping[str, Any]) -> None:
    path = _data_path(document.data, tuple(item["loc"]))
    kind = item["type"]
    where = _display(path[:-1])
    if kind == "extra_forbidden":
        key = str(path[-1])
        allowed = _allowed_keys(tuple(item["loc"][:-1]))
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(allowed)}"
        document.problem(path, f"unknown key {key!r} in {where}; {hint}", at_key=True)
    elif kind == "missing":
        document.problem(path, f"missing required key {path[-1]!r} in {where}")
    elif kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = item.get("ctx", {}).get("expected_tags", "")
        document.problem(
            (*path, "type") if kind == "union_tag_invalid" else path,
            f"{_display(path)}.type must be one of {tags}",
        )
    else:
        message = str(item["msg"]).removeprefix("Value error, ")
        document.problem(path, f"{_display(path)}: {message}")


def _allowed_keys(loc: tuple[str | int, ...]) -> list[str]:
    """The keys the model at ``loc`` accepts, for a "did you mean" hint."""
    annotation: Any = RouterConfig
    for part in loc:
        annotation = _step(annotation, part)
        if annotation is None:
            return []
    model = _unwrap(annotation)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [field.alias or name for name, field in model.model_fields.items()]
    return []


def _unwrap(annotation: Any) -> Any:
    """Strip Annotated and Optional around a type."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
            if len(members) != 1:
                return annotation
            annotation = members[0]
        else:
            return annotation


def _step(annotation: Any, part: str | int) -> Any:
    annotation = _unwrap(annotation)
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            if part in (name, field.alias):
                return field.annotation if field.annotation is not None else None
        return None
    if origin is list:
        return typing.get_args(annotation)[0]
    if origin is dict:
        return typing.get_args(annotation)[1]
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(annotation):
            fields = getattr(member, "model_fields", {})
            tag = fields.get("type")
            if tag is not None and part in typing.get_args(tag.annotation):
                return member
    return None
