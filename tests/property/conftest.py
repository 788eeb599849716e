"""A real SQLite dead-letter store shared by a module's examples: every dead letter must be storable."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from state import Store


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    folder: Path = tmp_path_factory.mktemp("property-store")
    with Store(f"sqlite:///{folder / 'router.db'}") as opened:
        yield opened
