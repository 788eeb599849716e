"""`router_deadletters_open` and `router_parked_keys` are counted in the store at each scrape: a letter
discarded by the CLI in another process shows at the next scrape, and a store failing during a scrape
leaves those two gauges out without breaking /metrics."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deadletter import NewDeadLetter
from ops import metrics
from state import Store
from tests.conftest import StoreLocation
from tests.integration.harness import write_config

REPO = Path(__file__).resolve().parents[2]


def _gauges() -> dict[tuple[str, str], float]:
    """(metric, route or target) -> value of the two state gauges in what ``GET /metrics`` serves now."""
    body, _ = metrics.render_latest()
    return {
        (sample.name, sample.labels.get("route") or sample.labels["target"]): sample.value
        for family in text_string_to_metric_families(body.decode())
        if family.name in ("router_deadletters_open", "router_parked_keys")
        for sample in family.samples
    }


@pytest.fixture
def attached(location: StoreLocation) -> Iterator[Store]:
    with location.open() as store:
        metrics.STATE_GAUGES.attach(store, ["pos-sales", "supplier-asn"], ["erp", "wms"])
        try:
            yield store
        finally:
            metrics.STATE_GAUGES.detach(store)


def _store_url(location: StoreLocation) -> str:
    """The location as a routes.yaml ``store.url`` (the PostgreSQL schema as the connection's search_path)."""
    if location.schema is None:
        return location.url
    return f"{location.url}?options=-csearch_path%3D{location.schema}"


def test_a_letter_discarded_by_the_cli_in_another_process_shows_at_the_next_scrape(
    attached: Store, location: StoreLocation, tmp_path: Path
) -> None:
    delivery = attached.add_dead_letter(
        route="pos-sales",
        stage="delivery",
        target="erp",
        reason="http_4xx",
        detail="HTTP 422 from erp: unknown item",
        payload={"event_id": "A-1", "sequence_key": "A", "source": {"route": "pos-sales"}},
        event_id="A-1",
        sequence_key="A",
    )
    attached.add_dead_letters(
        [NewDeadLetter(route="pos-sales", stage="transform", reason="validation", detail="qty", payload={})]
    )
    assert _gauges() == {
        ("router_deadletters_open", "pos-sales"): 2,
        ("router_deadletters_open", "supplier-asn"): 0,
        ("router_parked_keys", "erp"): 1,
        ("router_parked_keys", "wms"): 0,
    }

    config = write_config(
        tmp_path,
        broker_url="memory://",
        prefix="router",
        targets={"erp": "http://127.0.0.1:9"},
        store_url=_store_url(location),
    )
    done = subprocess.run(
        [sys.executable, "-m", "router.cli", "deadletter", "discard", str(delivery), "--reason", "test",
         "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr

    gauges = _gauges()
    assert gauges[("router_deadletters_open", "pos-sales")] == 1
    assert gauges[("router_parked_keys", "erp")] == 0


class _FailingStore:
    def open_letters_by_route(self) -> Mapping[str, int]:
        raise ConnectionError("store down")

    def parked_keys_by_target(self) -> Mapping[str, int]:
        raise ConnectionError("store down")


def test_a_store_failing_during_a_scrape_leaves_the_state_gauges_out_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failing = _FailingStore()
    metrics.STATE_GAUGES.attach(failing, ["pos-sales"], ["erp"])
    metrics.MESSAGES_RECEIVED.labels(route="t-gauges").inc()
    try:
        with caplog.at_level(logging.WARNING, logger="ops.metrics"):
            for _ in range(3):
                body, _ = metrics.render_latest()
                assert b'router_messages_received_total{route="t-gauges"}' in body
                assert _gauges() == {}
    finally:
        metrics.STATE_GAUGES.detach(failing)
    warnings = [record for record in caplog.records if "left out of /metrics" in record.getMessage()]
    assert len(warnings) == 1 and "store down" in warnings[0].getMessage()
