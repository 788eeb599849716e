"""Fixed-width exports (older POS and ERP systems): each field at a start column with a width.

A layout either has one set of ``fields`` (every line is a record) or ``record_types`` told apart by
a code at ``type: [start, width]``: header lines give the document context of the records after
them, detail lines are the records, and a trailer's count is checked against the detail lines read
since the previous trailer (a mismatch refuses the whole file, naming the trailer's line).
Columns are 1-based character positions, as suppliers' layout sheets give them.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from itertools import pairwise
from typing import Any

from transforms.records import FileFormatError, RawRecord, check_trailer_count

FILLER = "FILLER"
"""In a copybook-like list, an item that only takes columns (COBOL's name for unused space)."""


class RecordRole(Enum):
    """What a record type is for: context for the records, a record, or the file's closing count."""

    HEADER = "header"
    DETAIL = "detail"
    TRAILER = "trailer"


class LayoutError(ValueError):
    """A fixed-width layout that cannot be used; ``where`` is the key path under ``fixed:``."""

    def __init__(self, where: tuple[str | int, ...], reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(where, reason)

    def __str__(self) -> str:
        return f"fixed.{'.'.join(map(str, self.where))}: {self.reason}" if self.where else self.reason


@dataclass(frozen=True)
class FixedField:
    """A named field: ``start`` is its first column (1-based), ``width`` its number of characters."""

    name: str
    start: int
    width: int

    @property
    def end(self) -> int:
        """The last column the field covers."""
        return self.start + self.width - 1

    def cut(self, line: str) -> str:
        """The field's text in ``line``, without padding; a line cut short reads as blanks."""
        return line[self.start - 1 : self.end].strip()


@dataclass(frozen=True)
class RecordType:
    """One kind of line: its role, its fields, and for a trailer the field holding the count."""

    code: str
    role: RecordRole
    fields: tuple[FixedField, ...]
    count: str | None = None

    def values(self, line: str) -> dict[str, str]:
        return {field.name: field.cut(line) for field in self.fields}


@dataclass(frozen=True)
class FixedLayout:
    """A route's compiled ``fixed:`` block; ``records`` splits a file into raw records."""

    types: tuple[RecordType, ...]
    type_at: FixedField | None = None
    encoding: str = "utf-8"

    def records(self, lines: Iterable[tuple[int, str]], name: str) -> Iterator[RawRecord]:
        """Records of the detail lines, from (line number, text) pairs; raises FileFormatError."""
        by_code = {kind.code: kind for kind in self.types}
        document: dict[str, str] | None = None
        number = since_trailer = last = 0
        expect_trailer = any(kind.role is RecordRole.TRAILER for kind in self.types)
        for last, text in lines:
            line = text.rstrip("\r\n")
            if not line.strip():
                continue
            kind = self._kind(line, by_code)
            if kind is not None and kind.role is RecordRole.HEADER:
                # A new header starts a new document: the records after it read its fields.
                document = kind.values(line)
                continue
            if kind is not None and kind.role is RecordRole.TRAILER:
                if kind.count is not None:
                    check_trailer_count(kind.values(line)[kind.count], since_trailer, name, last, kind.code)
                since_trailer = 0
                continue
            number += 1
            since_trailer += 1
            if kind is None:
                yield RawRecord(number, last, line, self._unknown(line, by_code), document)
                continue
            yield RawRecord(number, last, kind.values(line), document=document)
        if expect_trailer and since_trailer:
            raise FileFormatError(
                name,
                last,
                None,
                f"{since_trailer} record(s) after the last trailer; the file may be cut short",
            )

    def _unknown(self, line: str, by_code: Mapping[str, RecordType]) -> str:
        code = self.type_at.cut(line) if self.type_at else ""
        column = self.type_at.start if self.type_at else 1
        known = ", ".join(sorted(by_code))
        return f"column {column}: record type {code!r} is not in the layout (it has {known})"

    def _kind(self, line: str, by_code: Mapping[str, RecordType]) -> RecordType | None:
        if self.type_at is None:
            return self.types[0]
        return by_code.get(line[self.type_at.start - 1 : self.type_at.end])


def compile_layout(spec: Mapping[str, Any]) -> FixedLayout:
    """Build a layout from the ``fixed:`` mapping; raises LayoutError naming the key that is wrong."""
    encoding = spec.get("encoding", "utf-8")
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise LayoutError(("encoding",), f"unknown encoding {encoding!r}") from None
    fields, record_types, type_at = spec.get("fields"), spec.get("record_types"), spec.get("type")
    if (fields is None) == (record_types is None):
        raise LayoutError((), "give either fields (every line is a record) or record_types with type")
    if record_types is None:
        if type_at is not None:
            raise LayoutError(("type",), "type applies only with record_types")
        detail = RecordType("", RecordRole.DETAIL, _fields(fields, ("fields",)))
        return FixedLayout((detail,), None, encoding)
    if type_at is None:
        raise LayoutError(("type",), "record_types need type: [start, width], where the code is in each line")
    code_field = _field("type", type_at, ("type",))
    types = tuple(_record_type(code, kind, code_field.width) for code, kind in record_types.items())
    if not any(kind.role is RecordRole.DETAIL for kind in types):
        raise LayoutError(
            ("record_types",), "no record type has role detail, so the file would give no records"
        )
    return FixedLayout(types, code_field, encoding)


def _record_type(code: str, spec: Mapping[str, Any], width: int) -> RecordType:
    where = ("record_types", code)
    if len(code) != width:
        raise LayoutError(where, f"the code {code!r} has {len(code)} character(s); type says {width}")
    try:
        role = RecordRole(spec.get("role") or RecordRole.DETAIL.value)
    except ValueError:
        roles = ", ".join(role.value for role in RecordRole)
        raise LayoutError(
            (*where, "role"), f"role must be one of {roles}, not {spec.get('role')!r}"
        ) from None
    fields = _fields(spec.get("fields") or {}, (*where, "fields"))
    if role is RecordRole.DETAIL and not fields:
        raise LayoutError((*where, "fields"), "a detail record type needs at least one field")
    count = spec.get("count")
    if count is not None:
        if role is not RecordRole.TRAILER:
            raise LayoutError((*where, "count"), f"count applies to a trailer, not a {role.value}")
        if count not in {field.name for field in fields}:
            raise LayoutError((*where, "count"), f"count names {count!r}, which is not one of its fields")
    return RecordType(code, role, fields, count)


def _fields(spec: Any, where: tuple[str | int, ...]) -> tuple[FixedField, ...]:
    if isinstance(spec, list):
        spec = _laid_end_to_end(spec, where)
    fields = sorted(
        (_field(name, bounds, (*where, name)) for name, bounds in spec.items()), key=lambda f: f.start
    )
    for before, after in pairwise(fields):
        if after.start <= before.end:
            raise LayoutError(
                (*where, after.name),
                f"columns {after.start}-{after.end} overlap {before.name} "
                f"(columns {before.start}-{before.end})",
            )
    return tuple(fields)


def _laid_end_to_end(items: list[Any], where: tuple[str | int, ...]) -> dict[str, tuple[int, int]]:
    """A copybook-like list ``[{NAME: width}, ...]``: fields one after the other from column 1;
    ``FILLER`` items take their columns without naming a field."""
    fields: dict[str, tuple[int, int]] = {}
    start = 1
    for index, item in enumerate(items):
        valid = isinstance(item, Mapping) and len(item) == 1
        name, width = next(iter(item.items())) if valid else ("", None)
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            reason = f"each item must be {{NAME: width}} with a width of at least 1, not {item!r}"
            raise LayoutError((*where, index), reason)
        if name in fields:
            raise LayoutError((*where, index), f"{name!r} is laid out twice")
        if name != FILLER:
            fields[name] = (start, width)
        start += width
    return fields


def _field(name: str, bounds: Any, where: tuple[str | int, ...]) -> FixedField:
    valid = (
        isinstance(bounds, list | tuple)
        and len(bounds) == 2
        and all(isinstance(value, int) and not isinstance(value, bool) for value in bounds)
    )
    if not valid or bounds[0] < 1 or bounds[1] < 1:
        raise LayoutError(
            where,
            f"must be [start, width] with a 1-based start column and a width of at least 1, not {bounds!r}",
        )
    return FixedField(name, bounds[0], bounds[1])
