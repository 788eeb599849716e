"""Metrics exposition (names, labels, buckets) and structured, redacted logging."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ops import metrics
from ops.logging import configure_logging, redact

DESIGN_METRICS: dict[str, tuple[str, ...]] = {
    "router_messages_received_total": ("route",),
    "router_events_transformed_total": ("route",),
    "router_events_delivered_total": ("route", "target"),
    "router_delivery_attempts_total": ("target", "outcome"),
    "router_delivery_seconds": ("target",),
    "router_event_lag_seconds": ("target",),
    "router_deadletters_total": ("route", "stage", "reason"),
    "router_deadletters_open": ("route",),
    "router_parked_keys": ("target",),
    "router_events_stale_total": ("target",),
    "router_queue_depth": ("queue",),
    "router_circuit_open": ("target",),
}


def _scrape() -> dict[str, list[tuple[dict[str, str], float]]]:
    """Sample name -> [(labels, value)] from what ``GET /metrics`` would serve."""
    body, _ = metrics.render_latest()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


class _CountedStore:
    """The store's grouped counts, as the state gauges read them at a scrape."""

    def open_letters_by_route(self) -> dict[str, int]:
        return {"t-scrape": 1}

    def parked_keys_by_target(self) -> dict[str, int]:
        return {"t-erp": 4}


def test_scrape_shows_every_design_metric_with_its_labels() -> None:
    metrics.MESSAGES_RECEIVED.labels(route="t-scrape").inc()
    metrics.EVENTS_TRANSFORMED.labels(route="t-scrape").inc(3)
    metrics.EVENTS_DELIVERED.labels(route="t-scrape", target="t-erp").inc(2)
    metrics.DELIVERY_ATTEMPTS.labels(target="t-erp", outcome="delivered").inc()
    metrics.DELIVERY_SECONDS.labels(target="t-erp").observe(0.2)
    metrics.EVENT_LAG.labels(target="t-erp").observe(42)
    metrics.DEADLETTERS.labels(route="t-scrape", stage="transform", reason="validation").inc()
    store = _CountedStore()
    metrics.STATE_GAUGES.attach(store, ["t-idle"], ["t-idle"])
    metrics.EVENTS_STALE.labels(target="t-erp").inc()
    metrics.QUEUE_DEPTH.labels(queue="router.deliver.t-erp.0").set(17)
    metrics.CIRCUIT_OPEN.labels(target="t-erp").set(1)

    try:
        samples = _scrape()
    finally:
        metrics.STATE_GAUGES.detach(store)

    for name, labels in DESIGN_METRICS.items():
        sample_name = f"{name}_count" if name.endswith("_seconds") else name
        assert sample_name in samples, f"{sample_name} missing from the scrape"
        assert any(set(found) == set(labels) for found, _ in samples[sample_name]), (
            name,
            samples[sample_name],
        )
    assert ({"queue": "router.deliver.t-erp.0"}, 17.0) in samples["router_queue_depth"]
    assert ({"route": "t-scrape", "target": "t-erp"}, 2.0) in samples["router_events_delivered_total"]
    assert not any(name.endswith("_created") for name in samples)
    assert ({"route": "t-scrape"}, 1.0) in samples["router_deadletters_open"]
    assert ({"route": "t-idle"}, 0.0) in samples["router_deadletters_open"]
    assert ({"target": "t-erp"}, 4.0) in samples["router_parked_keys"]


def test_no_metric_has_an_item_or_location_label() -> None:
    samples = _scrape()

    labels = {label for series in samples.values() for found, _ in series for label in found}

    assert labels.isdisjoint({"sku", "gtin", "location", "event_id", "sequence_key"})


def test_histogram_buckets_cover_fast_requests_and_day_old_events() -> None:
    metrics.DELIVERY_SECONDS.labels(target="t-buckets").observe(0.003)
    metrics.EVENT_LAG.labels(target="t-buckets").observe(3 * 3600)
    samples = _scrape()

    delivery = {
        found["le"]: value
        for found, value in samples["router_delivery_seconds_bucket"]
        if found["target"] == "t-buckets"
    }
    lag = {
        found["le"]: value
        for found, value in samples["router_event_lag_seconds_bucket"]
        if found["target"] == "t-buckets"
    }

    assert delivery["0.005"] == 1.0 and "60.0" in delivery
    assert lag["3600.0"] == 0.0 and lag["14400.0"] == 1.0 and "0.1" in lag and "86400.0" in lag


def test_deadletters_count_per_reason_category() -> None:
    def count(reason: str) -> float:
        labels = {"route": "t-reasons", "stage": "delivery", "reason": reason}
        return metrics.REGISTRY.get_sample_value("router_deadletters_total", labels) or 0.0

    metrics.DEADLETTERS.labels(route="t-reasons", stage="delivery", reason="http_4xx").inc()
    metrics.DEADLETTERS.labels(route="t-reasons", stage="delivery", reason="http_4xx").inc()
    metrics.DEADLETTERS.labels(route="t-reasons", stage="delivery", reason="retries_exhausted").inc()

    assert (count("http_4xx"), count("retries_exhausted")) == (2.0, 1.0)


def test_scrape_is_served_as_prometheus_text() -> None:
    body, content_type = metrics.render_latest()

    assert content_type.startswith("text/plain")
    assert b"# TYPE router_deadletters_total counter" in body


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """Capture what configure_logging writes; restore the root logger afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    output = io.StringIO()
    yield output
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _json_lines(output: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.getvalue().splitlines()]


def test_json_lines_carry_level_logger_message_and_extra_fields(log_output: io.StringIO) -> None:
    configure_logging("INFO", json=True, stream=log_output)

    logging.getLogger("router.delivery_worker").info("delivered %d events", 200, extra={"target": "erp"})
    logging.getLogger("router.delivery_worker").debug("not shown at INFO")

    [entry] = _json_lines(log_output)
    assert entry["level"] == "INFO" and entry["logger"] == "router.delivery_worker"
    assert entry["msg"] == "delivered 200 events"
    assert entry["target"] == "erp"
    assert str(entry["ts"]).endswith("+00:00")


def test_terminal_format_is_one_short_line(log_output: io.StringIO) -> None:
    configure_logging("WARNING", json=False, stream=log_output)

    logging.getLogger("router.runtime").warning("broker unreachable, retrying", extra={"attempt": 3})

    [line] = log_output.getvalue().splitlines()
    assert "WARNING" in line and "router.runtime: broker unreachable, retrying" in line
    assert line.endswith("attempt=3")
    assert not line.startswith("{")


def test_reconfiguring_replaces_the_handler_instead_of_doubling_lines(log_output: io.StringIO) -> None:
    configure_logging("INFO", json=True, stream=log_output)
    configure_logging("INFO", json=True, stream=log_output)

    logging.getLogger("router").info("once")

    assert len(_json_lines(log_output)) == 1


def test_unknown_level_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="'LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"):
        configure_logging("LOUD")


@pytest.mark.parametrize(
    ("text", "secret", "kept"),
    [
        ("connecting to amqp://guest:s3cr3t@rabbit:5672//", "s3cr3t", "amqp://guest:***@rabbit:5672//"),
        ("store postgresql://router:pa55@db/inventory down", "pa55", "postgresql://router:***@db/inventory"),
        ("sent Authorization: Bearer eyJhbGciOi.x-y_z", "eyJhbGciOi", "Bearer ***"),
        ("webhook secret whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw loaded", "MfKQ9r8G", "whsec_***"),
        ("GET https://api.example/stock?token=abc123&page=2", "abc123", "stock?token=***&page=***"),
        ('{"password": "hunter2", "user": "ops"}', "hunter2", '"user": "ops"'),
    ],
)
def test_secrets_are_masked_in_text(text: str, secret: str, kept: str) -> None:
    redacted = redact(text)

    assert secret not in redacted
    assert kept in redacted


def test_plain_urls_and_words_are_left_alone() -> None:
    text = "delivered to http://erp:8091/inventory/movements; token bucket refilled"

    assert redact(text) == text


def test_secrets_never_reach_the_log(log_output: io.StringIO) -> None:
    configure_logging("INFO", json=True, stream=log_output)
    log = logging.getLogger("router.config")

    log.info(
        "target erp at %s",
        "https://svc:topsecret@erp.example/api",
        extra={"erp_token": "tok-123", "headers": {"Authorization": "Bearer abc"}, "route": "pos-sales"},
    )
    try:
        raise ConnectionError("amqp://guest:brokerpw@rabbit:5672// refused")
    except ConnectionError:
        log.exception("broker down")

    output = log_output.getvalue()
    for secret in ("topsecret", "tok-123", "abc", "brokerpw"):
        assert secret not in output
    first, second = _json_lines(log_output)
    assert first["erp_token"] == "***" and first["headers"] == {"Authorization": "***"}
    assert first["route"] == "pos-sales"
    assert "ConnectionError" in str(second["exc"]) and "guest:***@rabbit" in str(second["exc"])
