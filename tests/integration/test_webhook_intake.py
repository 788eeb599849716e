"""The grouped webhook intake on the real RabbitMQ and SQLite: confirm windows, failed groups, kill -9.

A 202 means RabbitMQ confirmed the message and its webhook-id is in the ledger; these tests hold the
intake to that when requests are grouped, when the broker refuses part of a group, and when the
router process is killed in the middle of a burst.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from kombu import Connection, Queue

from connectors.chunks import SourceChunk
from connectors.signatures import sign
from connectors.webhooks.intake import Admission, IntakeUnavailable, Unavailable, WebhookIntake
from router.broker import BrokerSettings, BrokerUnavailable, Topology, queue_depth
from router.confirms import ConfirmWindow, Outgoing
from router.ingress import IngressGroupPublisher, chunk_message
from router.messages import encode_body
from state import Store
from tests.integration.harness import RouterProcess, wait_until
from transforms.parsers import RawRecord

ROUTE = "partner-burst"
SECRET = "whsec_a2lsbC1uaW5lLWJ1cnN0LXNlY3JldA=="

pytestmark = pytest.mark.rabbitmq


@pytest.fixture
def broker(rabbitmq_url: str, rabbitmq_namespace: str) -> BrokerSettings:
    return BrokerSettings(url=rabbitmq_url, queue_type="quorum", prefix=rabbitmq_namespace)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    yield store
    store.close()


def drain(broker: BrokerSettings, queue: Queue) -> list[dict[str, Any]]:
    """Every message in ``queue``, consumed (a single-active-consumer quorum queue refuses basic.get)."""
    messages: list[dict[str, Any]] = []
    with Connection(broker.url) as connection:
        expected = queue_depth(connection, queue) or 0

        def take(body: Any, message: Any) -> None:
            messages.append(json.loads(message.body))
            message.ack()

        with connection.Consumer(queue, callbacks=[take], prefetch_count=500):
            deadline = time.monotonic() + 30
            while len(messages) < expected and time.monotonic() < deadline:
                connection.drain_events(timeout=5)
    assert len(messages) == expected, f"took {len(messages)} of {expected} messages"
    return messages


def rejecting_queue(broker: BrokerSettings, name: str) -> Queue:
    """A queue that holds no message: RabbitMQ nacks every publish to it (a quorum queue takes one first)."""
    return Queue(
        f"{broker.prefix}.{name}",
        Topology(broker).exchange,
        routing_key=f"{broker.prefix}.{name}",
        durable=True,
        queue_arguments={"x-queue-type": "classic", "x-max-length": 0, "x-overflow": "reject-publish"},
    )


def chunk(webhook_id: str, body: str = "same") -> tuple[SourceChunk, str, str]:
    """A webhook's chunk, its id and its body hash."""
    record = {"sku": webhook_id, "body": body}
    return (
        SourceChunk(ROUTE, "webhook", f"webhook:{ROUTE}:{webhook_id}", {"webhook_id": webhook_id}, [
            RawRecord(1, None, record)
        ]),
        webhook_id,
        hashlib.sha256(json.dumps(record).encode()).hexdigest(),
    )  # fmt: skip


class Gate:
    """Wraps a group publisher: holds the first group until released, and records each group's size."""

    def __init__(self, publish: Callable[[Sequence[SourceChunk]], None]) -> None:
        self._publish = publish
        self.sizes: list[int] = []
        self.entered = threading.Event()
        self.released = threading.Event()

    def __call__(self, chunks: Sequence[SourceChunk]) -> None:
        self.sizes.append(len(chunks))
        self.entered.set()
        self.released.wait(10)
        self._publish(chunks)


async def admit_in_two_groups(
    intake: WebhookIntake,
    gate: Gate,
    first: tuple[SourceChunk, str, str],
    rest: list[tuple[SourceChunk, str, str]],
) -> list[Admission | BaseException]:
    """Admit ``first`` alone, then ``rest`` while the first group is held, so that they form one group."""
    held = asyncio.create_task(intake.admit(*first))
    while not gate.entered.is_set():
        await asyncio.sleep(0.005)
    waiting = [asyncio.create_task(intake.admit(*webhook)) for webhook in rest]
    await asyncio.sleep(0.1)  # every task has queued its request
    gate.released.set()
    return await asyncio.gather(held, *waiting, return_exceptions=True)


async def admit_all(intake: WebhookIntake, webhooks: list[tuple[SourceChunk, str, str]]) -> list[Admission]:
    return await asyncio.gather(*(intake.admit(*webhook) for webhook in webhooks))


def test_a_group_goes_out_under_one_confirm_window_and_arrives_in_order(broker: BrokerSettings) -> None:
    queue = Topology(broker).ingress_queue(ROUTE)
    window = ConfirmWindow(broker)
    try:
        window.publish([Outgoing(queue, encode_body({"n": n}), {"message_id": f"m{n}"}) for n in range(300)])
        window.publish([Outgoing(queue, encode_body({"n": 300}))])
    finally:
        window.close()

    assert [message["n"] for message in drain(broker, queue)] == list(range(301))


def test_a_nack_fails_the_whole_group_and_the_window_recovers(broker: BrokerSettings) -> None:
    queue = Topology(broker).ingress_queue(ROUTE)
    window = ConfirmWindow(broker)
    try:
        with pytest.raises(BrokerUnavailable, match="nacked"):
            window.publish(
                [Outgoing(queue, encode_body({"n": 1})), Outgoing(rejecting_queue(broker, "full"), b"{}")]
            )
        window.publish([Outgoing(queue, encode_body({"n": 2}))])
    finally:
        window.close()

    # The message RabbitMQ took stays (the caller reported none of the group as accepted).
    assert [message["n"] for message in drain(broker, queue)] == [1, 2]


def test_a_failed_confirm_fails_every_request_of_its_group_and_records_no_id(
    broker: BrokerSettings, store: Store
) -> None:
    window = ConfirmWindow(broker)
    refusing = rejecting_queue(broker, "refusing")
    gate = Gate(
        lambda chunks: window.publish([Outgoing(refusing, encode_body(chunk_message(c))) for c in chunks])
    )
    intake = WebhookIntake(gate, store)
    webhooks = [chunk(f"msg_{n}") for n in range(21)]
    try:
        outcomes = asyncio.run(admit_in_two_groups(intake, gate, webhooks[0], webhooks[1:]))
    finally:
        intake.close()
        window.close()

    assert gate.sizes == [1, 20]
    assert all(isinstance(outcome, IntakeUnavailable) for outcome in outcomes), outcomes
    assert {outcome.dependency for outcome in outcomes if isinstance(outcome, IntakeUnavailable)} == {
        Unavailable.BROKER
    }
    assert store.webhook_bodies([(ROUTE, webhook_id) for _, webhook_id, _ in webhooks]) == {}


def test_concurrent_requests_are_published_once_per_id_and_remembered(
    broker: BrokerSettings, store: Store
) -> None:
    publisher = IngressGroupPublisher(broker)
    gate = Gate(publisher)
    intake = WebhookIntake(gate, store)
    fresh = [chunk(f"msg_{n}") for n in range(1, 18)]
    # In the same group: a redelivery of msg_1, and msg_2's id reused for another body.
    repeats = [chunk("msg_1"), chunk("msg_2", body="other")]
    try:
        outcomes = asyncio.run(admit_in_two_groups(intake, gate, chunk("msg_0"), [*fresh, *repeats]))
        again = asyncio.run(admit_all(intake, fresh))
    finally:
        intake.close()
        publisher.close()

    assert gate.sizes == [1, 17]  # one group: each id once, the repeats not published
    assert outcomes == [Admission.ACCEPTED] * 18 + [Admission.DUPLICATE, Admission.CONFLICT]
    assert set(again) == {Admission.DUPLICATE}
    queued = Counter(
        message["origin"]["webhook_id"] for message in drain(broker, Topology(broker).ingress_queue(ROUTE))
    )
    assert queued == Counter(f"msg_{n}" for n in range(18))
    assert len(store.webhook_bodies([(ROUTE, f"msg_{n}") for n in range(18)])) == 18


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def webhook_config(folder: Path, broker: BrokerSettings, port: int, workers: int = 1) -> Path:
    config = {
        "version": 1,
        "broker": {"url": broker.url, "queue_type": "quorum", "prefix": broker.prefix},
        "store": {"url": f"sqlite:///{folder / 'state.db'}"},
        "http": {"listen": f"127.0.0.1:{port}", "workers": workers},
        "targets": {"wms": {"type": "http", "url": "http://127.0.0.1:9/stock", "partitions": 1}},
        "routes": [
            {
                "name": ROUTE,
                "source": {"type": "webhook", "secret": SECRET, "tolerance": "10m"},
                "format": "json",
                "records": "events",
                "map": {
                    "type": "stock.snapshot",
                    "sku": {"path": "sku"},
                    "location": {"path": "warehouse"},
                    "quantity": {"path": "on_hand", "as": "decimal"},
                    "occurred_at": {"path": "counted_at", "as": "datetime"},
                },
                "deliver": ["wms"],
            }
        ],
    }
    path = folder / "routes.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path


def post(client: httpx.Client, number: int) -> int | None:
    """Send webhook ``number`` (always the same id and body); its status, or None when no answer came."""
    body = json.dumps(
        {
            "events": [
                {
                    "sku": f"SKU-{number}",
                    "warehouse": "W1",
                    "on_hand": 1,
                    "counted_at": "2026-11-24T10:00:00Z",
                }
            ]
        }
    ).encode()
    webhook_id, timestamp = f"burst_{number}", int(time.time())
    headers = {
        "content-type": "application/json",
        "webhook-id": webhook_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(SECRET, webhook_id, timestamp, body),
    }
    try:
        return client.post(f"/webhooks/{ROUTE}", content=body, headers=headers).status_code
    except httpx.HTTPError:
        return None


def serves(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_kill_9_during_a_burst_loses_no_accepted_webhook_and_doubles_none(
    broker: BrokerSettings, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = webhook_config(tmp_path, broker, port)
    queue = Topology(broker).ingress_queue(ROUTE)
    requests, connections = 1500, 16
    statuses: dict[int, int | None] = {}
    lock = threading.Lock()

    def send_share(share: range) -> None:
        with httpx.Client(base_url=url, timeout=10) as client:
            for number in share:
                status = post(client, number)
                with lock:
                    statuses[number] = status

    with RouterProcess(config, "--only", "http") as router:
        wait_until(lambda: serves(url), 30, "the router's listener")
        with ThreadPoolExecutor(connections) as pool:
            sent = [pool.submit(send_share, range(n, requests, connections)) for n in range(connections)]
            wait_until(lambda: sum(status == 202 for status in statuses.values()) >= 150, 60, "150 accepted")
            router.kill()
            for share in sent:
                share.result(60)

    accepted = {number for number, status in statuses.items() if status == 202}
    # Not accepted: no answer (the kill), or a 503 (a group the broker did not confirm in time).
    unanswered = {number for number, status in statuses.items() if status != 202}
    assert set(statuses.values()) <= {202, 503, None}, Counter(statuses.values())
    assert accepted and unanswered, "the kill did not land in the middle of the burst"
    with Connection(broker.url) as connection:
        assert queue_depth(connection, queue) is not None
    queued = Counter(message["origin"]["webhook_id"] for message in drain(broker, queue))
    # Every 202 is in the queue exactly once; a request never answered was published at most once.
    assert all(queued[f"burst_{number}"] == 1 for number in accepted)
    assert max(queued.values()) == 1

    with RouterProcess(config, "--only", "http") as router:
        wait_until(lambda: serves(url), 30, "the restarted router's listener")
        with httpx.Client(base_url=url, timeout=10) as client:
            resent = {number: post(client, number) for number in sorted(accepted)}
            retried = {number: post(client, number) for number in sorted(unanswered)}
        assert router.terminate() == 0

    assert set(resent.values()) == {200}
    assert set(retried.values()) <= {200, 202}
    requeued = Counter(message["origin"]["webhook_id"] for message in drain(broker, queue))
    # The redeliveries of accepted ids enqueued nothing; the retries of unanswered ones enqueued only
    # those the broker had not confirmed before the kill (at most once more, for a publish confirmed
    # whose id had not reached the ledger: downstream deduplicates it by event id).
    assert not any(f"burst_{number}" in requeued for number in accepted)
    assert all(queued[f"burst_{number}"] + requeued[f"burst_{number}"] >= 1 for number in unanswered)


def children(pid: int) -> list[int]:
    """The live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry.name))
    return found


@pytest.mark.slow
def test_http_workers_share_the_port_are_restarted_when_killed_and_drain_on_sigterm(
    broker: BrokerSettings, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = webhook_config(tmp_path, broker, port, workers=3)

    def post_once(number: int) -> int | None:
        # A new connection for each request: the kernel spreads connections over the processes.
        with httpx.Client(base_url=url, timeout=10) as client:
            return post(client, number)

    with RouterProcess(config, "--only", "http") as router:
        wait_until(lambda: serves(url) and len(children(router.process.pid)) == 2, 30, "three HTTP processes")
        [first_worker, _] = children(router.process.pid)
        with ThreadPoolExecutor(16) as pool:
            statuses = list(pool.map(post_once, range(200)))
            os.kill(first_worker, signal.SIGKILL)
            wait_until(
                lambda: (
                    first_worker not in children(router.process.pid)
                    and len(children(router.process.pid)) == 2
                ),
                30,
                "the killed worker restarted",
            )
            wait_until(lambda: serves(url), 30, "the listener")
            statuses += list(
                pool.map(lambda n: post(httpx.Client(base_url=url, timeout=10), n), range(200, 400))
            )
        workers = children(router.process.pid)
        assert router.terminate() == 0
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)

    assert Counter(statuses) == Counter({202: 400})
    queued = Counter(
        message["origin"]["webhook_id"] for message in drain(broker, Topology(broker).ingress_queue(ROUTE))
    )
    assert queued == Counter(f"burst_{n}" for n in range(400))
