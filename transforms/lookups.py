"""Lookup tables (store code -> GLN, partner item -> SKU) loaded once from CSV and shared by routes."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path


class LookupTableError(ValueError):
    """A lookup table file cannot be loaded: missing, unreadable, or without the named columns."""


class LookupMiss(KeyError):
    """A mapped value has no entry in its lookup table."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Lookup:
    """One named key -> value table; ``source`` says where it came from, for error messages.

    A table loaded from a CSV file can be refreshed from it while the router runs (a new store opens:
    its code maps without a restart).
    """

    def __init__(
        self, name: str, table: Mapping[str, str], *, key_column: str = "key", source: str = ""
    ) -> None:
        self.name = name
        self.key_column = key_column
        self.source = source
        self._table = dict(table)
        self._origin: tuple[Path, str, str, float] | None = None

    @classmethod
    def from_csv(cls, path: Path, key: str, value: str, name: str) -> Lookup:
        """Load ``key`` -> ``value`` columns of a CSV file with a header row (UTF-8, BOM allowed)."""
        modified = _modified(path)
        lookup = cls(name, _read_csv(path, key, value, name), key_column=key, source=str(path))
        lookup._origin = (path, key, value, modified)
        return lookup

    def refresh(self) -> bool:
        """Reload the table when its file changed; True when it did. A file that no longer loads leaves
        the current table in place and raises LookupTableError saying why."""
        if self._origin is None:
            return False
        path, key, value, loaded = self._origin
        modified = _modified(path)
        if modified == loaded:
            return False
        self._origin = (path, key, value, modified)
        # One assignment: a transform reading the table meanwhile sees the old or the new one, whole.
        self._table = _read_csv(path, key, value, self.name)
        return True

    def get(self, key: str) -> str:
        """The value for ``key``; raises LookupMiss naming the key, the table and its file."""
        try:
            return self._table[key]
        except KeyError:
            origin = f" ({self.source})" if self.source else ""
            raise LookupMiss(f"{self.key_column} {key!r} not found in lookup {self.name!r}{origin}") from None

    def __len__(self) -> int:
        return len(self._table)


def _modified(path: Path) -> float:
    """The file's modification time, or -1 when it cannot be seen (reading it then says why)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def _read_csv(path: Path, key: str, value: str, name: str) -> dict[str, str]:
    """The ``key`` -> ``value`` columns of a CSV lookup file; raises LookupTableError saying what is wrong."""
    where = f"lookup {name!r} ({path})"
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = [column.strip() for column in reader.fieldnames or []]
            missing = [column for column in (key, value) if column not in columns]
            if missing:
                found = ", ".join(columns) or "no header row"
                raise LookupTableError(f"{where}: column {missing[0]!r} not found (columns: {found})")
            reader.fieldnames = columns
            table: dict[str, str] = {}
            first_line: dict[str, int] = {}
            for row in reader:
                line = reader.line_num
                entry_key = (row.get(key) or "").strip()
                entry_value = (row.get(value) or "").strip()
                if not entry_key:
                    raise LookupTableError(f"{where} line {line}: column {key!r} is empty")
                if entry_key in table and table[entry_key] != entry_value:
                    raise LookupTableError(
                        f"{where} line {line}: {key} {entry_key!r} maps to {entry_value!r}, "
                        f"but line {first_line[entry_key]} maps it to {table[entry_key]!r}"
                    )
                table[entry_key] = entry_value
                first_line.setdefault(entry_key, line)
    except FileNotFoundError:
        raise LookupTableError(f"{where}: file not found") from None
    except UnicodeDecodeError as error:
        raise LookupTableError(f"{where}: not UTF-8 ({error.reason} at byte {error.start})") from None
    except (OSError, csv.Error) as error:
        raise LookupTableError(f"{where}: cannot be read: {error}") from None
    return table
