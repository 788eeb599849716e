"""REST polling source against a real paged API on loopback, with a real SQLite store for its cursor."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from connectors.chunks import SourceChunk
from connectors.rest_settings import RestPollSettings
from connectors.rest_source import RestPollSource, content_id
from connectors.retry import RetryPolicy
from ops import tracing
from state import Store
from tests.integration.harness import wait_until

ROUTE = "marketplace-stock"
CURSOR_NAME = f"rest:{ROUTE}"
FAST_RETRY = RetryPolicy(attempts=3, initial=0.05, max_delay=0.2, max_age=10.0)
# A one-page API that answers a plain JSON array of records, without cursor or record ids.
PLAIN_LIST: dict[str, Any] = {"records": None, "cursor_param": None, "cursor_next": None, "record_id": None}


@dataclass(frozen=True)
class SeenRequest:
    """One request as the API received it."""

    at: float
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class MarketplaceApi:
    """A paged inventory API: page bodies keyed by the ``after`` cursor, scripted failures served first."""

    url: str = ""
    pages: dict[str | None, str] = field(default_factory=dict)
    failures: list[tuple[int, dict[str, str], str]] = field(default_factory=list)
    requests: list[SeenRequest] = field(default_factory=list)

    def answer(self, query: dict[str, str], headers: dict[str, str]) -> tuple[int, dict[str, str], str]:
        self.requests.append(SeenRequest(time.monotonic(), query, headers))
        if self.failures:
            return self.failures.pop(0)
        body = self.pages.get(query.get("after"))
        if body is None:
            return 404, {}, json.dumps({"error": f"unknown cursor {query.get('after')!r}"})
        return 200, {}, body

    def cursors(self) -> list[str | None]:
        return [request.query.get("after") for request in self.requests]


def page(records: list[dict[str, Any]], following: str | None) -> str:
    return json.dumps({"data": records, "paging": {"next": following}})


def stock(sku: str, qty: int = 5) -> dict[str, Any]:
    return {"id": sku, "sku": sku, "location": "DC1", "qty": qty}


@dataclass
class RecordingSink:
    """Stands in for the broker: keeps confirmed chunks; confirms only ``accept`` more while set."""

    chunks: list[SourceChunk] = field(default_factory=list)
    accept: int | None = None

    def __call__(self, chunk: SourceChunk) -> None:
        if self.accept is not None:
            if self.accept == 0:
                raise ConnectionError("broker unreachable")
            self.accept -= 1
        self.chunks.append(chunk)

    def record_ids(self) -> list[str]:
        return [identity for chunk in self.chunks for identity in chunk.record_ids or []]


@pytest.fixture
def api() -> Iterator[MarketplaceApi]:
    marketplace = MarketplaceApi()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            query = {key: values[-1] for key, values in parse_qs(urlsplit(self.path).query).items()}
            status, headers, body = marketplace.answer(query, {k.lower(): v for k, v in self.headers.items()})
            payload = body.encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    marketplace.url = f"http://127.0.0.1:{server.server_address[1]}/v1/inventory"
    try:
        yield marketplace
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    with Store(store_url) as opened:
        yield opened


SourceFactory = Callable[..., RestPollSource]


@pytest.fixture
def make_source(api: MarketplaceApi) -> Iterator[SourceFactory]:
    sources: list[RestPollSource] = []

    def make(sink: RecordingSink, store: Store, **overrides: Any) -> RestPollSource:
        options: dict[str, Any] = {
            "route": ROUTE,
            "url": f"{api.url}?location=DC1",
            "records": "data",
            "chunk_size": 100,
            "cursor_param": "after",
            "cursor_next": "paging.next",
            "record_id": "id",
            "timeout": 5.0,
            "retry": FAST_RETRY,
        }
        source = RestPollSource(RestPollSettings(**{**options, **overrides}), sink, store)
        sources.append(source)
        return source

    yield make
    for source in sources:
        source.close()


def three_pages(api: MarketplaceApi) -> None:
    api.pages = {
        None: page([stock("A1"), stock("A2")], "p2"),
        "p2": page([stock("B1"), stock("B2")], "p3"),
        "p3": page([stock("C1")], None),
    }


def stored_state(store: Store) -> dict[str, Any] | None:
    value = store.get_cursor(CURSOR_NAME)
    return None if value is None else json.loads(value)


def test_pages_are_followed_until_next_is_null_and_published_in_order(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    three_pages(api)
    sink = RecordingSink()

    result = make_source(sink, store).poll_once()

    assert (result.pages, result.records, result.chunks, result.caught_up) == (3, 5, 3, True)
    assert result.error is None
    assert sink.record_ids() == ["A1", "A2", "B1", "B2", "C1"]
    assert [record.data["sku"] for chunk in sink.chunks for record in chunk.records] == sink.record_ids()
    assert [chunk.message_id for chunk in sink.chunks] == [
        f"{api.url}#1",
        f"{api.url}?after=p2#1",
        f"{api.url}?after=p3#1",
    ]
    assert {chunk.system for chunk in sink.chunks} == {"rest"}
    assert all(chunk.origin == {"url": api.url} for chunk in sink.chunks)
    assert api.cursors() == [None, "p2", "p3"]
    assert all(request.query["location"] == "DC1" for request in api.requests)
    assert stored_state(store) == {"url": api.url, "cursor": "p3", "published": ["C1"]}


def test_each_page_is_the_root_of_the_trace_its_chunks_travel_in(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    three_pages(api)
    traces: list[tuple[str, str] | None] = []
    sink = RecordingSink()

    def traced(chunk: SourceChunk) -> None:
        traces.append(tracing.current_ids())
        sink(chunk)

    memory = InMemorySpanExporter()
    tracing.install(memory)
    try:
        make_source(traced, store).poll_once()
    finally:
        tracing.shutdown()

    pages = memory.get_finished_spans()
    assert [span.name for span in pages] == [f"poll {ROUTE}"] * 3
    assert all(span.parent is None for span in pages)
    # Query values are masked like anywhere else: a cursor may be a credential.
    assert [(span.attributes or {}).get("url.full") for span in pages] == [api.url] + [
        f"{api.url}?after=***"
    ] * 2
    assert traces == [
        (f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}") for span in pages if span.context
    ]


def test_a_restarted_source_resumes_from_the_stored_cursor(
    api: MarketplaceApi, store_url: str, make_source: SourceFactory
) -> None:
    three_pages(api)
    sink = RecordingSink()
    with Store(store_url) as store:
        first = make_source(sink, store, max_pages_per_poll=2).poll_once()
    assert (first.pages, first.caught_up, sink.record_ids()) == (2, False, ["A1", "A2", "B1", "B2"])

    api.requests.clear()
    with Store(store_url) as reopened:
        resumed = make_source(sink, reopened).poll_once()
        assert api.cursors() == ["p3"]
        assert sink.record_ids() == ["A1", "A2", "B1", "B2", "C1"]
        assert resumed.caught_up

        api.requests.clear()
        again = make_source(sink, reopened).poll_once()
    assert api.cursors() == ["p3"]
    assert (again.records, len(sink.chunks)) == (0, 3)


def test_the_last_page_is_read_again_and_only_appended_records_are_published(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    three_pages(api)
    sink = RecordingSink()
    source = make_source(sink, store)
    source.poll_once()

    unchanged = source.poll_once()
    assert (unchanged.pages, unchanged.records, len(sink.chunks)) == (1, 0, 3)

    api.pages["p3"] = page([stock("C1"), stock("C2")], None)
    appended = source.poll_once()
    assert (appended.records, sink.chunks[-1].record_ids) == (1, ["C2"])
    assert sink.chunks[-1].message_id == f"{api.url}?after=p3#2"

    api.pages["p3"] = page([stock("C2")], None)
    assert source.poll_once().records == 0
    assert stored_state(store) == {"url": api.url, "cursor": "p3", "published": ["C2"]}

    api.pages["p3"] = page([stock("C2"), stock("C3")], "p4")
    api.pages["p4"] = page([stock("D1")], None)
    api.requests.clear()
    onward = source.poll_once()
    assert api.cursors() == ["p3", "p4"]
    assert sink.record_ids()[-2:] == ["C3", "D1"]
    assert onward.records == 2
    assert stored_state(store) == {"url": api.url, "cursor": "p4", "published": ["D1"]}


def test_a_last_page_that_repeats_its_own_cursor_ends_the_poll(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    three_pages(api)
    api.pages["p3"] = page([stock("C1")], "p3")
    sink = RecordingSink()

    result = make_source(sink, store).poll_once()

    assert (result.pages, result.caught_up, api.cursors()) == (3, True, [None, "p2", "p3"])
    assert stored_state(store) == {"url": api.url, "cursor": "p3", "published": ["C1"]}


def test_records_without_an_id_are_identified_by_content_whatever_the_key_order(
    api: MarketplaceApi, tmp_path: Path, store: Store, make_source: SourceFactory
) -> None:
    levels = [{"sku": "A", "location": "DC1", "qty": 7}, {"sku": "B", "location": "DC1", "qty": 3}]
    first_ids = [content_id(level) for level in levels]
    api.pages = {None: json.dumps(levels)}
    sink = RecordingSink()
    source = make_source(sink, store, **PLAIN_LIST)
    source.poll_once()
    assert sink.record_ids() == first_ids
    assert len(set(first_ids)) == 2

    reordered = [dict(reversed(level.items())) for level in levels]
    api.pages = {None: json.dumps(reordered)}
    other_sink = RecordingSink()
    with Store(f"sqlite:///{tmp_path / 'other.db'}") as other_store:
        make_source(other_sink, other_store, **PLAIN_LIST).poll_once()
    assert other_sink.record_ids() == first_ids

    levels[1]["qty"] = 2
    api.pages = {None: json.dumps(levels)}
    changed = source.poll_once()
    assert changed.records == 1
    assert sink.chunks[-1].records[0].data == levels[1]
    assert sink.chunks[-1].record_ids == [content_id(levels[1])]
    assert content_id(levels[1]) not in first_ids


def test_429_waits_as_long_as_retry_after_asks(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    three_pages(api)
    api.failures = [(429, {"Retry-After": "1"}, '{"error": "rate limited"}')]
    sink = RecordingSink()

    started = time.monotonic()
    result = make_source(sink, store).poll_once()
    elapsed = time.monotonic() - started

    assert result.error is None and result.records == 5
    gap = api.requests[1].at - api.requests[0].at
    assert 0.95 <= gap < 3.0
    assert elapsed < 5.0


def test_a_retry_after_longer_than_the_retry_budget_delays_the_next_poll(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    three_pages(api)
    api.failures = [(429, {"Retry-After": "1"}, "quota exhausted")]
    sink = RecordingSink()
    source = make_source(sink, store, poll=0.05, retry=RetryPolicy(attempts=3, initial=0.05, max_age=0.2))
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(sink.record_ids()) == 5, 5.0, "records published after the Retry-After")
    finally:
        stop.set()
        thread.join(timeout=5)
    gap = api.requests[1].at - api.requests[0].at
    assert 0.95 <= gap < 3.0


def test_server_errors_are_retried_then_left_for_the_next_poll(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    three_pages(api)
    api.failures = [(503, {}, "upstream down"), (502, {}, "bad gateway")]
    sink = RecordingSink()
    source = make_source(sink, store)

    recovered = source.poll_once()
    assert (recovered.error, recovered.records, len(api.requests)) == (None, 5, 5)

    api.failures = [(500, {}, "boom")] * 3
    api.pages["p3"] = page([stock("C1"), stock("C2")], None)
    exhausted = source.poll_once()
    assert exhausted.error is not None
    assert "HTTP 500" in exhausted.error and "gave up after 3 attempt(s)" in exhausted.error
    assert exhausted.records == 0 and not exhausted.caught_up
    assert source.poll_once().records == 1


def test_a_client_error_is_logged_with_its_body_and_not_retried_until_the_next_poll(
    api: MarketplaceApi, store: Store, make_source: SourceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    three_pages(api)
    api.failures = [(404, {}, '{"error": "location DC1 is not enabled for this seller"}')]
    sink = RecordingSink()
    source = make_source(sink, store)

    with caplog.at_level(logging.ERROR, logger="connectors.rest_source"):
        failed = source.poll_once()

    assert failed.error is not None
    assert "HTTP 404" in failed.error and "location DC1 is not enabled" in failed.error
    assert len(api.requests) == 1 and sink.chunks == []
    assert failed.error in caplog.text
    assert store.get_cursor(CURSOR_NAME) is None
    assert source.poll_once().records == 5


def test_an_unconfirmed_chunk_keeps_the_cursor_and_is_published_again(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    api.pages = {None: page([stock(f"A{n}") for n in range(1, 6)], "p2"), "p2": page([stock("B1")], None)}
    sink = RecordingSink(accept=1)
    source = make_source(sink, store, chunk_size=2)

    failed = source.poll_once()
    assert failed.error is not None and "broker did not confirm" in failed.error
    assert (failed.records, sink.record_ids()) == (2, ["A1", "A2"])
    assert stored_state(store) == {"url": api.url, "cursor": None, "published": ["A1", "A2"]}

    sink.accept = None
    recovered = source.poll_once()
    assert recovered.caught_up and recovered.records == 4
    assert sink.record_ids() == ["A1", "A2", "A3", "A4", "A5", "B1"]
    assert [chunk.message_id for chunk in sink.chunks] == [
        f"{api.url}#1",
        f"{api.url}#3",
        f"{api.url}#5",
        f"{api.url}?after=p2#1",
    ]


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"bearer": "tok-4711"}, "Bearer tok-4711"),
        ({"basic": ("svc-inventory", "s3cret")}, "Basic c3ZjLWludmVudG9yeTpzM2NyZXQ="),
    ],
)
def test_auth_and_custom_headers_reach_the_api(
    api: MarketplaceApi, store: Store, make_source: SourceFactory, auth: dict[str, Any], expected: str
) -> None:
    three_pages(api)
    headers = {"X-Marketplace-Id": "EU-1"}

    make_source(RecordingSink(), store, headers=headers, **auth).poll_once()

    assert {request.headers["authorization"] for request in api.requests} == {expected}
    assert {request.headers["x-marketplace-id"] for request in api.requests} == {"EU-1"}


def test_a_secret_echoed_in_an_error_body_is_redacted(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    api.failures = [(401, {}, '{"error": "token tok-4711 expired", "key": "k-99887766"}')]

    source = make_source(RecordingSink(), store, bearer="tok-4711", headers={"X-Api-Key": "k-99887766"})

    failed = source.poll_once()

    assert failed.error is not None and "HTTP 401 (check the route's auth)" in failed.error
    assert "tok-4711" not in failed.error and "k-99887766" not in failed.error
    assert "token *** expired" in failed.error


def test_json_numbers_stay_exact_and_ids_may_be_numbers(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    api.pages = {None: '[{"id": 1001, "qty": 12.50, "cost": 0.1, "units": 3}, {"sku": "no-id", "qty": 1}]'}
    sink = RecordingSink()

    make_source(sink, store, **{**PLAIN_LIST, "record_id": "id"}).poll_once()

    numbered, missing = sink.chunks[0].records
    assert isinstance(numbered.data["qty"], Decimal) and str(numbered.data["qty"]) == "12.50"
    assert numbered.data["cost"] == Decimal("0.1")
    assert numbered.data["units"] == 3 and isinstance(numbered.data["units"], int)
    assert sink.chunks[0].record_ids == ["1001", content_id(missing.data)]
    assert numbered.error is None
    assert missing.error == "record id 'id' is missing (null or empty) in record 2"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("<html>maintenance</html>", "is not valid JSON: $: line 1 column 1 (char 0): Expecting value"),
        ('{"data": [{"sku": "\\ud800"}]}', "is not valid JSON: $.data[0].sku"),
        ('{"data": [], "data": [{"sku": "A"}]}', "$.data: the key 'data' appears more than once"),
        ("[" * 100_000 + "]" * 100_000, "is not valid JSON: "),
        ('{"items": []}', "records 'data' gave nothing; expected a list of records"),
        ('{"data": [], "paging": {"next": {"id": 7}}}', """'paging.next' gave {"id":7}; expected a string"""),
    ],
)
def test_a_malformed_page_is_reported_and_nothing_is_published(
    api: MarketplaceApi, store: Store, make_source: SourceFactory, body: str, message: str
) -> None:
    api.pages = {None: body}
    sink = RecordingSink()

    result = make_source(sink, store).poll_once()

    assert result.error is not None and message in result.error
    assert sink.chunks == [] and store.get_cursor(CURSOR_NAME) is None


def test_run_survives_failing_polls_and_stops_promptly(
    api: MarketplaceApi, store: Store, make_source: SourceFactory
) -> None:
    three_pages(api)
    api.failures = [(403, {}, "forbidden")]
    sink = RecordingSink()
    source = make_source(sink, store, poll=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(sink.record_ids()) == 5, 5.0, "records published after a failed poll")
    finally:
        stop.set()
        thread.join(timeout=5)
    assert not thread.is_alive()
    assert api.requests[0].query.get("after") is None and len(api.requests) >= 4


def test_run_outlives_a_failing_store(
    api: MarketplaceApi,
    tmp_path: Path,
    store_url: str,
    store: Store,
    make_source: SourceFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    three_pages(api)
    with sqlite3.connect(tmp_path / "state.db") as database:
        database.execute("ALTER TABLE source_cursors RENAME TO source_cursors_away")
    sink = RecordingSink()
    source = make_source(sink, store, poll=0.1)
    stop = threading.Event()
    thread = threading.Thread(target=source.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.ERROR, logger="connectors.rest_source"):
        thread.start()
        try:
            wait_until(lambda: "failed a poll" in caplog.text, 5.0, "the store failure logged")
            assert thread.is_alive()
            with sqlite3.connect(tmp_path / "state.db") as database:
                database.execute("ALTER TABLE source_cursors_away RENAME TO source_cursors")
            wait_until(lambda: len(sink.record_ids()) == 5, 5.0, "records published once the store is back")
        finally:
            stop.set()
            thread.join(timeout=5)
    assert not thread.is_alive()
    assert "no such table: source_cursors" in caplog.text


def test_two_routers_on_one_route_take_turns_instead_of_both_polling(
    api: MarketplaceApi, store_url: str, make_source: SourceFactory
) -> None:
    three_pages(api)
    first_sink, second_sink = RecordingSink(), RecordingSink()
    with Store(store_url) as first_store, Store(store_url) as second_store:
        first = make_source(first_sink, first_store, poll=0.05)
        second = make_source(second_sink, second_store, poll=0.05)
        first_stop, second_stop = threading.Event(), threading.Event()
        first_thread = threading.Thread(target=first.run, args=(first_stop,), daemon=True)
        second_thread = threading.Thread(target=second.run, args=(second_stop,), daemon=True)
        first_thread.start()
        wait_until(lambda: len(first_sink.record_ids()) == 5, 5.0, "the first router's poll")
        second_thread.start()
        time.sleep(0.5)  # ten of the second router's poll intervals: it must stand by
        assert second_sink.chunks == []

        first_stop.set()  # the first router stops and gives up its lease
        first_thread.join(timeout=5)
        api.pages["p3"] = page([stock("C1"), stock("C2")], None)
        try:
            wait_until(lambda: second_sink.record_ids() == ["C2"], 5.0, "the second router taking over")
        finally:
            second_stop.set()
            second_thread.join(timeout=5)
    assert first_sink.record_ids() == ["A1", "A2", "B1", "B2", "C1"]


@dataclass
class SlowSink(RecordingSink):
    """A broker that takes ``seconds`` to confirm each chunk: a poll that outlasts the poll lease's ttl."""

    seconds: float = 0.4

    def __call__(self, chunk: SourceChunk) -> None:
        time.sleep(self.seconds)
        super().__call__(chunk)


def test_a_poll_longer_than_the_lease_ttl_keeps_the_route_from_a_second_router(
    api: MarketplaceApi, store_url: str, make_source: SourceFactory
) -> None:
    three_pages(api)
    first_sink, second_sink = SlowSink(), RecordingSink()
    with Store(store_url) as first_store, Store(store_url) as second_store:
        # Five one-record chunks at 0.4 s each: the first poll lasts 2 s, four times the lease's ttl.
        first = make_source(first_sink, first_store, poll=0.05, chunk_size=1, lease_ttl=0.5)
        second = make_source(
            second_sink, second_store, poll=0.05, lease_ttl=0.5, headers={"X-Poller": "second"}
        )
        first_stop, second_stop = threading.Event(), threading.Event()
        first_thread = threading.Thread(target=first.run, args=(first_stop,), daemon=True)
        second_thread = threading.Thread(target=second.run, args=(second_stop,), daemon=True)
        first_thread.start()
        try:
            wait_until(lambda: len(api.requests) >= 1, 5.0, "the first router's first page")
            second_thread.start()
            wait_until(lambda: len(first_sink.record_ids()) == 5, 10.0, "the first router's long poll")
            assert second_sink.chunks == []
            assert [r for r in api.requests if r.headers.get("x-poller") == "second"] == []

            first_stop.set()
            first_thread.join(timeout=5)
            api.pages["p3"] = page([stock("C1"), stock("C2")], None)
            wait_until(lambda: second_sink.record_ids() == ["C2"], 5.0, "the second router taking over")
        finally:
            first_stop.set()
            second_stop.set()
            first_thread.join(timeout=5)
            second_thread.join(timeout=5)
    assert first_sink.record_ids() == ["A1", "A2", "B1", "B2", "C1"]
