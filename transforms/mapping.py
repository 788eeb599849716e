"""The declarative record mapping of a route's ``map:``: raw record in, canonical event fields out.

A field is ``{column|path|xpath: SELECTOR}`` plus optional ``as``, ``tz``, ``format``, ``default``,
``lookup`` and ``from`` (``record``, the default, or ``document``: the header around the record, see
RawRecord.document); XPath may also climb out of the record (``..``, ``ancestor::``, ``/ASN``).
A plain value is a constant, a dict without a selector a nested mapping, a list maps each item.
Everything is compiled once per route; ``apply`` runs per record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

import jmespath
from jmespath.exceptions import JMESPathError
from lxml import etree

from transforms.casts import CAST_TYPES, Caster, CastError, make_caster
from transforms.lookups import Lookup, LookupMiss
from transforms.parsers import FORMATS
from transforms.records import RawRecord
from transforms.xml_records import safe_xml_parser

SELECTOR_FOR_FORMAT = {
    "csv": "column",
    "json": "path",
    "jsonl": "path",
    "xml": "xpath",
    "x12": "path",
    "edifact": "path",
    "fixed": "column",
}
SELECTORS = ("column", "path", "xpath")
OPTIONS = ("as", "tz", "format", "default", "lookup", "from")
FROM = ("record", "document")

Selector = Callable[[Any], Any]


class MappingError(Exception):
    """A record's field could not be mapped; ``category`` is the dead-letter reason."""

    def __init__(self, field: str, reason: str, category: Literal["mapping", "lookup"] = "mapping") -> None:
        self.field = field
        self.reason = reason
        self.category = category
        super().__init__(field, reason, category)

    def __str__(self) -> str:
        return f"field {self.field!r}: {self.reason}" if self.field else self.reason


@dataclass(frozen=True)
class _Content:
    """What a field reads: the record, and the document around it (None when the format has none)."""

    record: Any
    document: Any


@dataclass(frozen=True)
class _Constant:
    value: Any

    def evaluate(self, content: _Content) -> Any:
        return self.value


@dataclass(frozen=True)
class _Field:
    name: str
    select: Selector
    default: Any
    lookup: Lookup | None
    cast: Caster | None
    from_document: bool = False

    def evaluate(self, content: _Content) -> Any:
        source = content.document if self.from_document else content.record
        value = None if source is None else self.select(source)
        if isinstance(value, str):
            value = value.strip()
        if value is None or value == "":
            if self.default is None:
                return None
            value = self.default
        if self.lookup is not None:
            try:
                value = self.lookup.get(_lookup_key(value))
            except LookupMiss as miss:
                raise MappingError(self.name, str(miss), "lookup") from None
        if self.cast is not None:
            try:
                value = self.cast(value)
            except CastError as error:
                raise MappingError(self.name, str(error)) from None
        return value


@dataclass(frozen=True)
class _Object:
    fields: tuple[tuple[str, _Node], ...]

    def evaluate(self, content: _Content) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, node in self.fields:
            value = node.evaluate(content)
            if value is not None:
                result[key] = value
        return result


@dataclass(frozen=True)
class _List:
    items: tuple[_Node, ...]

    def evaluate(self, content: _Content) -> list[Any]:
        values = (item.evaluate(content) for item in self.items)
        return [value for value in values if value is not None]


_Node = _Constant | _Field | _Object | _List
"""A compiled piece of a mapping; ``evaluate`` gives its value for one record's content."""


class RecordMapping:
    """A route's compiled ``map:`` for one record format."""

    def __init__(self, fmt: str, root: _Object) -> None:
        self.format = fmt
        self._root = root

    def apply(self, record: RawRecord) -> dict[str, Any]:
        """Map one raw record; fields without a value are left out. Raises MappingError."""
        return self._root.evaluate(self._content(record))

    def _content(self, record: RawRecord) -> _Content:
        data = record.data
        if self.format in ("csv", "fixed"):
            if not isinstance(data, Mapping):
                kind = "CSV" if self.format == "csv" else "Fixed-width"
                raise MappingError("", f"{kind} record is a {type(data).__name__}; expected column values")
            return _Content(data, record.document)
        if self.format == "xml":
            if not isinstance(data, str | bytes):
                raise MappingError(
                    "", f"XML record is a {type(data).__name__}; expected the element as XML text"
                )
            element = _parse_xml(data, "XML record")
            root = _xml_in_document(element, record.document)
            return _Content(element, root)
        return _Content(data, record.document)


def _parse_xml(text: str | bytes, what: str) -> Any:
    try:
        return etree.fromstring(text.encode() if isinstance(text, str) else text, safe_xml_parser())
    except etree.XMLSyntaxError as error:
        raise MappingError("", f"{what} does not parse: {error}") from None


def _xml_in_document(element: Any, document: Any) -> Any:
    """Put a record back at its place in its document context; returns the document's root element.

    The context is the trimmed ancestor chain the parser kept (``{"xml": ..., "depth": n}``); the
    record becomes the last child of its innermost ancestor, after the header it followed in the file.
    """
    if document is None:
        return element
    if not isinstance(document, Mapping) or not isinstance(document.get("xml"), str):
        raise MappingError("", "XML record's document context is not the {xml, depth} the parser gives")
    root = _parse_xml(document["xml"], "XML record's document context")
    parent = root
    for _ in range(int(document.get("depth", 1)) - 1):
        if len(parent) == 0:
            raise MappingError("", "XML record's document context is shallower than its depth")
        parent = parent[-1]
    parent.append(element)
    return root


def compile_mapping(
    spec: Mapping[str, Any], fmt: str, lookups: Mapping[str, Lookup], *, no_document: str | None = None
) -> RecordMapping:
    """Compile a route's ``map:`` (already interpolated); raises ValueError naming the bad field.

    ``no_document`` says why the route's records have no document around them (a CSV route without
    a preamble); a field reading ``from: document`` is then refused instead of always being empty.
    """
    if fmt not in SELECTOR_FOR_FORMAT:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not isinstance(spec, Mapping):
        raise ValueError(f"map must be a mapping of field names, not a {type(spec).__name__}")
    mapping = RecordMapping(fmt, _compile_object(spec, "", fmt, lookups))
    if no_document is not None:
        reader = next(_document_readers(mapping._root), None)
        if reader is not None:
            raise ValueError(f"field {reader!r}: from: document would always be empty: {no_document}")
    return mapping


def _document_readers(node: _Node) -> Iterator[str]:
    """Names of the fields under ``node`` that read ``from: document``."""
    if isinstance(node, _Field) and node.from_document:
        yield node.name
    children = node.fields if isinstance(node, _Object) else node.items if isinstance(node, _List) else ()
    for child in children:
        yield from _document_readers(child[1] if isinstance(child, tuple) else child)


def _compile_node(spec: Any, name: str, fmt: str, lookups: Mapping[str, Lookup]) -> _Node:
    if isinstance(spec, Mapping):
        selectors = [key for key in SELECTORS if key in spec]
        if selectors:
            return _compile_field(spec, name, fmt, selectors, lookups)
        if spec and all(key in OPTIONS for key in spec):
            wanted = SELECTOR_FOR_FORMAT[fmt]
            raise ValueError(f"field {name!r} has {', '.join(spec)} but no selector; add {wanted}: ...")
        return _compile_object(spec, name, fmt, lookups)
    if isinstance(spec, list):
        return _List(
            tuple(_compile_node(item, f"{name}[{index}]", fmt, lookups) for index, item in enumerate(spec))
        )
    if isinstance(spec, float):
        # A YAML constant like 1.5 must not reach the canonical model as a binary float.
        return _Constant(Decimal(repr(spec)))
    if spec is None or isinstance(spec, str | int | bool | Decimal):
        return _Constant(spec)
    raise ValueError(f"field {name!r}: a {type(spec).__name__} is neither a constant nor a field spec")


def _compile_object(spec: Mapping[str, Any], name: str, fmt: str, lookups: Mapping[str, Lookup]) -> _Object:
    fields = []
    for key, value in spec.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"field names must be non-empty strings; found {key!r} under {name or 'map'!r}")
        fields.append((key, _compile_node(value, f"{name}.{key}" if name else key, fmt, lookups)))
    return _Object(tuple(fields))


def _compile_field(
    spec: Mapping[str, Any], name: str, fmt: str, selectors: list[str], lookups: Mapping[str, Lookup]
) -> _Field:
    wanted = SELECTOR_FOR_FORMAT[fmt]
    if len(selectors) > 1:
        raise ValueError(f"field {name!r} has {' and '.join(selectors)}; give only {wanted}")
    selector = selectors[0]
    if selector != wanted:
        raise ValueError(f"field {name!r} uses {selector} but the route's format is {fmt}; use {wanted}")
    unknown = [key for key in spec if key != selector and key not in OPTIONS]
    if unknown:
        allowed = ", ".join((selector, *OPTIONS))
        raise ValueError(f"field {name!r} has unknown key {unknown[0]!r}; allowed keys are {allowed}")
    expression = spec[selector]
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"field {name!r}: {selector} must be a non-empty string, not {expression!r}")
    source = spec.get("from", "record")
    if source not in FROM:
        raise ValueError(f"field {name!r}: from must be record or document, not {source!r}")
    if source == "document" and fmt == "jsonl":
        raise ValueError(f"field {name!r}: a jsonl line is a whole document; from: document does not apply")
    default = spec.get("default")
    if isinstance(default, Mapping | list):
        raise ValueError(f"field {name!r}: default must be a single value, not a {type(default).__name__}")
    return _Field(
        name=name,
        select=_compile_selector(selector, expression, name),
        default=Decimal(repr(default)) if isinstance(default, float) else default,
        lookup=_field_lookup(spec.get("lookup"), name, lookups),
        cast=_field_cast(spec, name),
        from_document=source == "document",
    )


def _compile_selector(selector: str, expression: str, name: str) -> Selector:
    if selector == "column":
        column = expression.strip()
        return lambda row: row.get(column)
    if selector == "path":
        try:
            compiled = jmespath.compile(expression)
        except JMESPathError as error:
            raise ValueError(f"field {name!r}: path {expression!r} is not valid JMESPath: {error}") from None

        def select_path(content: Any) -> Any:
            try:
                return compiled.search(content)
            except JMESPathError as error:
                # A function given the wrong type (join over a missing element) is this record's fault.
                raise MappingError(name, f"path {expression!r} failed: {error}") from None

        return select_path
    try:
        xpath = etree.XPath(expression)
    except etree.XPathSyntaxError as error:
        raise ValueError(f"field {name!r}: xpath {expression!r} is not valid XPath: {error}") from None

    def select_xpath(element: Any) -> Any:
        try:
            return _xpath_value(xpath(element))
        except etree.XPathEvalError as error:
            raise MappingError(name, f"xpath {expression!r} failed: {error}") from None

    return select_xpath


def _xpath_value(result: Any) -> Any:
    """XPath results as mapping values: a node-set gives its first node's text, numbers stay exact."""
    if isinstance(result, list):
        if not result:
            return None
        first = result[0]
        if isinstance(first, str):
            return str(first)
        if isinstance(first, etree._Element):
            return "".join(first.itertext())
        return str(first)
    if isinstance(result, bool):
        return result
    if isinstance(result, float):
        if result != result:
            return None
        return int(result) if result.is_integer() else Decimal(repr(result))
    return str(result)


def _field_lookup(table: Any, name: str, lookups: Mapping[str, Lookup]) -> Lookup | None:
    if table is None:
        return None
    if table not in lookups:
        defined = ", ".join(sorted(lookups)) or "none"
        raise ValueError(
            f"field {name!r}: lookup {table!r} is not defined under lookups (defined: {defined})"
        )
    return lookups[table]


def _field_cast(spec: Mapping[str, Any], name: str) -> Caster | None:
    as_ = spec.get("as")
    tz = spec.get("tz")
    fmt = spec.get("format")
    if as_ is None:
        if tz is not None or fmt is not None:
            raise ValueError(f"field {name!r}: tz and format need as: datetime or as: date")
        return None
    if as_ not in CAST_TYPES:
        raise ValueError(f"field {name!r}: as {as_!r} is not one of {', '.join(CAST_TYPES)}")
    if tz is not None and as_ != "datetime":
        raise ValueError(f"field {name!r}: tz applies only to as: datetime, not as: {as_}")
    if fmt is not None and as_ not in ("datetime", "date"):
        raise ValueError(f"field {name!r}: format applies only to as: datetime or date, not as: {as_}")
    for option, value in (("tz", tz), ("format", fmt)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"field {name!r}: {option} must be a string, not {value!r}")
    try:
        return make_caster(as_, tz=tz, fmt=fmt)
    except ValueError as error:
        raise ValueError(f"field {name!r}: {error}") from None


def _lookup_key(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
