"""The XML record splitter: a streaming XPath subset, each record with its ancestors' header as context."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from copy import deepcopy
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, BinaryIO

from lxml import etree

from transforms.records import FileFormatError, RawRecord, Splitter

MAX_HEADER_ELEMENTS = 10_000
"""Most child elements an XML element may have before its first record: they are kept in memory as
the records' header, so a document with more (usually a wrong ``records``) is refused instead."""

_XML_STEP = re.compile(r"\*|[A-Za-z_][\w.\-]*")
_LIBXML_POSITION = re.compile(r", line \d+, column \d+$")


XmlPathMatcher = Callable[[tuple[str, ...]], bool]


def compile_xml_splitter(records: str | None) -> Splitter:
    """The splitter of the XML elements at ``records`` (ValueError when it is missing or unsupported)."""
    if not records:
        raise ValueError("records is required for xml: an element path such as /ASN/Line or //Line")
    path_matches = _compile_xml_path(records)
    return lambda stream, name, **_: _xml_records(stream, name, records, path_matches)


def _compile_xml_path(records: str) -> XmlPathMatcher:
    """Compile the streaming XPath subset: element names joined by / or //, optionally absolute."""
    text = records.strip()
    unsupported = (
        f"records {records!r} is outside the streaming XPath subset: element names joined by '/' or '//', "
        "optionally starting with '/' or '//' (e.g. /ASN/Line, //Line, Lines/Line); '*' matches any element"
    )
    steps: list[tuple[bool, str]]
    if text.startswith("//"):
        body, descendant, steps = text[2:], True, []
    elif text.startswith("/"):
        body, descendant, steps = text[1:], False, []
    else:
        # Like lxml's ElementTree.xpath, a relative path starts at the root element.
        body, descendant, steps = text, False, [(False, "*")]
    for part in body.split("/"):
        if part == "":
            if descendant:
                raise ValueError(unsupported)
            descendant = True
            continue
        if not _XML_STEP.fullmatch(part):
            raise ValueError(unsupported)
        steps.append((descendant, part))
        descendant = False
    if descendant or not body:
        raise ValueError(unsupported)
    compiled_steps = tuple(steps)

    @lru_cache(maxsize=1024)
    def matches(path: tuple[str, ...]) -> bool:
        return _path_matches(compiled_steps, path, 0, 0)

    return matches


def _path_matches(steps: tuple[tuple[bool, str], ...], path: tuple[str, ...], step: int, depth: int) -> bool:
    if step == len(steps):
        return depth == len(path)
    descendant, tag = steps[step]
    candidates = range(depth, len(path)) if descendant else range(depth, min(depth + 1, len(path)))
    return any((tag in ("*", path[at])) and _path_matches(steps, path, step + 1, at + 1) for at in candidates)


def safe_xml_parser() -> etree.XMLParser:
    """An lxml parser that expands no entities, loads no DTD and touches no network (XXE-safe)."""
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


def _local_name(tag: str) -> str:
    return tag.rpartition("}")[2]


@dataclass
class _OpenElement:
    """An element whose end is not yet parsed: its place in the path and whether records started in it."""

    serial: int
    record: bool
    holds_records: bool = False
    kept: int = 0


def _xml_records(stream: BinaryIO, name: str, records: str, matches: XmlPathMatcher) -> Iterator[RawRecord]:
    """Records of the elements ``matches`` accepts, each with its ancestors' own content as context.

    An ancestor keeps the children that ended before its first record (its header: ShipTo, dates);
    a subtree that held records, and whatever ends after records started, is dropped once parsed,
    so memory holds the header and one record whatever the number of lines.
    """
    events = etree.iterparse(
        stream,
        events=("start", "end"),
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        huge_tree=False,
    )
    path: list[str] = []
    stack: list[_OpenElement] = []
    open_records = 0
    number = serial = 0
    documents = _XmlDocuments()
    try:
        for event, element in events:
            if event == "start":
                # A parsed element's tag is a str; lxml types it wider for tags set by hand.
                path.append(_local_name(str(element.tag)))
                serial += 1
                stack.append(_OpenElement(serial, matches(tuple(path))))
                open_records += stack[-1].record
                continue
            path.pop()
            state = stack.pop()
            if state.record:
                open_records -= 1
                number += 1
                for ancestor in stack:
                    ancestor.holds_records = True
                yield _xml_record(element, number, documents.context(element, stack))
            if open_records == 0:
                parent = element.getparent()
                if parent is None:
                    continue
                # A header child stays readable by the records that follow it; the rest is done with.
                if state.record or state.holds_records or stack[-1].holds_records:
                    parent.remove(element)
                    continue
                stack[-1].kept += 1
                if stack[-1].kept > MAX_HEADER_ELEMENTS:
                    raise FileFormatError(
                        name,
                        element.sourceline,
                        None,
                        f"<{path[-1]}> has more than {MAX_HEADER_ELEMENTS} child elements before its "
                        f"first record, all kept as the records' header (is records {records!r} right?)",
                    )
    except etree.XMLSyntaxError as error:
        # The parser's own log holds the first fatal error with its position; the exception sometimes
        # says only "no element found" (an undefined entity, for one).
        first = next(iter(events.error_log), None)
        if first is not None:
            line, column, message = first.line, first.column, first.message
        else:
            (line, column), message = error.position, _LIBXML_POSITION.sub("", error.msg or str(error))
        raise FileFormatError(name, line or None, column or None, f"XML syntax error: {message}") from None


class _XmlDocuments:
    """The document context of XML records: a trimmed copy of the ancestor chain, made once per header.

    Consecutive records under the same ancestors with the same header share one context object, so
    a chunk carries it once (see router.ingress).
    """

    def __init__(self) -> None:
        self._key: tuple[tuple[int, int], ...] = ()
        self._context: dict[str, Any] | None = None

    def context(self, element: Any, stack: list[_OpenElement]) -> dict[str, Any] | None:
        ancestors = list(element.iterancestors())[::-1]
        if not ancestors:
            return None
        chain = [*ancestors[1:], element]
        # The header of each ancestor is every child before the chain; later siblings may be parsed
        # ahead by lxml and are not part of the document yet.
        heads = [ancestor.index(child) for ancestor, child in zip(ancestors, chain, strict=True)]
        key = tuple(zip((state.serial for state in stack), heads, strict=True))
        if key != self._key or self._context is None:
            self._key = key
            self._context = {"xml": _trimmed_chain(ancestors, heads), "depth": len(ancestors)}
        return self._context


def _trimmed_chain(ancestors: list[Any], heads: list[int]) -> str:
    """The ancestors as one XML document: each with its attributes, text and header children only."""
    top: Any = None
    parent: Any = None
    for ancestor, head in zip(ancestors, heads, strict=True):
        copy = (
            etree.Element(ancestor.tag, attrib=dict(ancestor.attrib), nsmap=ancestor.nsmap)
            if parent is None
            else etree.SubElement(parent, ancestor.tag, attrib=dict(ancestor.attrib), nsmap=ancestor.nsmap)
        )
        copy.text = ancestor.text
        for child in ancestor[:head]:
            copy.append(deepcopy(child))
        top = copy if top is None else top
        parent = copy
    return etree.tostring(top, encoding="unicode")


def _xml_record(element: Any, number: int, document: dict[str, Any] | None) -> RawRecord:
    text = etree.tostring(element, encoding="unicode", with_tail=False)
    entity = next(element.iter(etree.Entity), None)
    if entity is not None:
        reason = f"record uses the entity {entity.text}, which is not expanded (DTD entities are disabled)"
        return RawRecord(number, element.sourceline, text, reason)
    return RawRecord(number, element.sourceline, text, document=document)
