"""Outbound payloads for targets: canonical events shaped by a target's ``body`` as JSON, XML or CSV."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Literal

import jmespath
import orjson
from jmespath.exceptions import JMESPathError
from lxml import etree

PayloadFormat = Literal["json", "xml", "csv"]
CONTENT_TYPES: dict[str, str] = {
    "json": "application/json",
    "xml": "application/xml",
    "csv": "text/csv; charset=utf-8",
}

_XML_NAME = re.compile(r"[A-Za-z_][\w.\-]*")
# OWASP CSV injection: a spreadsheet runs a cell starting with one of these as a formula (the
# full-width forms too, which some spreadsheets normalise). A plain number such as -5 or +3.5 is not
# a formula and is left alone.
_FORMULA_START = tuple("=+-@\t\r\uff1d\uff0b\uff0d\uff20")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_CSV_NEEDS_QUOTES = re.compile(r'[",\r\n]')


class RenderError(ValueError):
    """An event cannot be put in the target's shape or format (a body expression or value that fails)."""


class PayloadRenderer:
    """Renders events for one target; ``body`` (field -> JMESPath on the event) is compiled once."""

    def __init__(
        self,
        *,
        body: Mapping[str, str] | None = None,
        fmt: PayloadFormat = "json",
        xml_root: str = "events",
        xml_element: str = "event",
    ) -> None:
        if fmt not in CONTENT_TYPES:
            raise ValueError(f"unknown payload format {fmt!r}; expected one of {', '.join(CONTENT_TYPES)}")
        self.format = fmt
        self.content_type = CONTENT_TYPES[fmt]
        self._body = _compile_body(body) if body else None
        if fmt == "xml":
            for what, name in (
                ("root", xml_root),
                ("element", xml_element),
                *(("body field", f) for f in body or {}),
            ):
                if not _XML_NAME.fullmatch(name):
                    raise ValueError(f"xml {what} {name!r} is not a usable XML element name")
        self._xml_root = xml_root
        self._xml_element = xml_element

    def shape(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The outbound object for one event: the event itself, or the target's ``body`` fields."""
        if self._body is None:
            return dict(event)
        return {field: expression.search(event) for field, expression in self._body}

    def render(self, events: Sequence[Mapping[str, Any]], as_batch: bool) -> tuple[bytes, str]:
        """The request payload and its content type; without ``as_batch`` exactly one event is sent.

        JSON gives one object, or an array for a batch; XML a root element with one element per
        event; CSV a header and one row per event.
        """
        if not as_batch and len(events) != 1:
            raise ValueError(f"a single-event payload needs exactly one event, got {len(events)}")
        try:
            return self._render([self.shape(event) for event in events], as_batch), self.content_type
        except (JMESPathError, ValueError, TypeError) as error:
            ids = ", ".join(str(event.get("event_id")) for event in events)
            raise RenderError(f"cannot render event(s) {ids} as {self.format}: {error}") from None

    def _render(self, shaped: Sequence[Mapping[str, Any]], as_batch: bool) -> bytes:
        if self.format == "json":
            return _json_bytes(shaped if as_batch else shaped[0])
        if self.format == "xml":
            return self._xml(shaped)
        return _csv(shaped, [field for field, _ in self._body] if self._body else None)

    def _xml(self, shaped: Sequence[Mapping[str, Any]]) -> bytes:
        root = etree.Element(self._xml_root)
        for fields in shaped:
            element = etree.SubElement(root, self._xml_element)
            for name, value in fields.items():
                _append_xml(element, name, value)
        return etree.tostring(root, xml_declaration=True, encoding="UTF-8")


def render_events(
    events: Sequence[Mapping[str, Any]],
    *,
    body: Mapping[str, str] | None,
    fmt: PayloadFormat,
    as_batch: bool,
    xml_root: str = "events",
    xml_element: str = "event",
) -> tuple[bytes, str]:
    """One-off rendering; a target that sends repeatedly should build a PayloadRenderer once."""
    renderer = PayloadRenderer(body=body, fmt=fmt, xml_root=xml_root, xml_element=xml_element)
    return renderer.render(events, as_batch)


def _compile_body(body: Mapping[str, str]) -> tuple[tuple[str, Any], ...]:
    compiled = []
    for field, expression in body.items():
        if not isinstance(expression, str):
            raise ValueError(f"body field {field!r} must be a JMESPath string, not {expression!r}")
        try:
            compiled.append((field, jmespath.compile(expression)))
        except JMESPathError as error:
            raise ValueError(f"body field {field!r}: {expression!r} is not valid JMESPath: {error}") from None
    return tuple(compiled)


def _json_bytes(document: Any) -> bytes:
    """Compact UTF-8 JSON, Decimals as exact strings, datetimes as ``isoformat()``.

    orjson writes the same bytes as ``json.dumps`` (ensure_ascii off, no spaces) at a fraction of the
    cost of every delivered batch; what it refuses and json takes (an integer beyond 64 bits, nesting
    deeper than 254) goes through ``json.dumps``, so no payload a target got before is refused now.
    """
    try:
        return orjson.dumps(document, default=_json_default, option=orjson.OPT_PASSTHROUGH_DATETIME)
    except orjson.JSONEncodeError:
        text = json.dumps(document, default=_json_default, ensure_ascii=False, separators=(",", ":"))
        return text.encode("utf-8")


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} cannot be sent as JSON")


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value)


def _append_xml(parent: Any, name: str, value: Any) -> None:
    """Nested objects become nested elements, lists repeated elements; null fields are left out."""
    if value is None:
        return
    if isinstance(value, list):
        for item in value:
            _append_xml(parent, name, item)
        return
    if not _XML_NAME.fullmatch(name):
        raise ValueError(f"field {name!r} cannot be an XML element name")
    element = etree.SubElement(parent, name)
    if isinstance(value, Mapping):
        for child, child_value in value.items():
            _append_xml(element, str(child), child_value)
    else:
        element.text = _scalar_text(value)


def _csv(shaped: Sequence[Mapping[str, Any]], columns: list[str] | None) -> bytes:
    if columns is None:
        # Without a body the columns are the events' own fields, in order of first appearance.
        columns = list(dict.fromkeys(name for fields in shaped for name in fields))
    lines = [_csv_row([_csv_cell(column) for column in columns])]
    lines += [_csv_row([_csv_cell(fields.get(column)) for column in columns]) for fields in shaped]
    return "".join(lines).encode("utf-8")


def _csv_row(cells: Sequence[tuple[str, bool]]) -> str:
    """One CSV line as ``csv.writer`` writes it, but with the neutralised cells always quoted."""
    texts = [
        # A lone empty cell is quoted too, or its row would read as a blank line.
        '"' + text.replace('"', '""') + '"'
        if quote or _CSV_NEEDS_QUOTES.search(text) or (text == "" and len(cells) == 1)
        else text
        for text, quote in cells
    ]
    return ",".join(texts) + "\r\n"


def _csv_cell(value: Any) -> tuple[str, bool]:
    """The cell's text, and whether it was neutralised as a formula (OWASP: prefix ' and quote it)."""
    if value is None:
        return "", False
    if isinstance(value, Mapping | list):
        return json.dumps(value, default=_json_default, ensure_ascii=False, separators=(",", ":")), False
    text = _scalar_text(value)
    if isinstance(value, str) and text.startswith(_FORMULA_START) and not _NUMBER.fullmatch(text):
        return "'" + text, True
    return text, False
