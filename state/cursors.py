"""Source cursors in the store (table ``source_cursors``): where a polling source got to (a REST page
cursor), so a restart resumes there."""

from __future__ import annotations

from datetime import UTC, datetime

from state.engine import StoreEngine
from state.tables import SourceCursorRow


class CursorStore(StoreEngine):
    """Polling sources' saved positions, by name."""

    def get_cursor(self, name: str) -> str | None:
        """The last position a polling source saved under ``name``, or None before its first run."""
        with self._transaction() as session:
            row = session.get(SourceCursorRow, name)
            return row.value if row is not None else None

    def set_cursor(self, name: str, value: str) -> None:
        """Save (insert or replace) a polling source's position."""
        values = {"name": name, "value": value, "updated_at": datetime.now(UTC)}
        statement = self._insert(SourceCursorRow).values(**values)
        statement = statement.on_conflict_do_update(
            index_elements=[SourceCursorRow.name],
            set_={"value": statement.excluded.value, "updated_at": statement.excluded.updated_at},
        )
        with self._transaction() as session:
            session.execute(statement)
