"""Benchmark: signed partner webhooks accepted with broker confirms, against the raw pika floor.

Prints, from one run on this machine:
- the raw floor: plain pika publishing persistent messages one at a time with confirms (messages/s);
- the webhook receiver on a loopback uvicorn server, wired as `router run` wires it (a confirming
  kombu publisher per server thread into the route's quorum ingress queue on the real RabbitMQ, the
  webhook-id ledger in a SQLite store), loaded by client processes: accepted requests/s, p50/p99
  latency, and the ratio to the floor.

Usage: .venv/bin/python bench/webhooks.py [--requests 2000] [--clients 4] [--amqp URL] [--store URL]
Absolute figures on shared machines are noise; compare the ratio.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pika
import uvicorn
from starlette.applications import Starlette

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.signatures import sign
from connectors.webhook import WebhookSettings, webhook_routes
from deadletter.store import Store
from router.assembly import StoreWebhookLedger
from router.broker import BrokerSettings, Topology, connect, queue_depth
from router.ingress import SharedIngressSink

ROUTE = "bench-partner"
SECRET = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQ="
EVENTS_PER_REQUEST = 5


def request_body(number: int) -> bytes:
    events = [
        {
            "sku": f"SKU-{number:06d}-{line}",
            "store": "S001",
            "qty": "1.000",
            "occurred_at": "2024-05-01T10:00:00Z",
        }
        for line in range(EVENTS_PER_REQUEST)
    ]
    return json.dumps({"events": events}).encode()


def pika_floor(amqp_url: str, messages: int, body: bytes) -> float:
    """Messages/s publishing persistent messages one at a time, each waiting for its confirm."""
    # kombu spells the default vhost "//" at the end of the URL; pika needs it percent-encoded.
    pika_url = amqp_url[:-1] + "%2F" if amqp_url.endswith("//") else amqp_url
    connection = pika.BlockingConnection(pika.URLParameters(pika_url))
    channel = connection.channel()
    channel.confirm_delivery()
    queue = f"bench.floor.{uuid.uuid4().hex[:8]}"
    channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    started = time.perf_counter()
    for _ in range(messages):
        channel.basic_publish("", queue, body, properties)
    elapsed = time.perf_counter() - started
    channel.queue_delete(queue)
    connection.close()
    return messages / elapsed


def start_server(app: Starlette) -> tuple[uvicorn.Server, threading.Thread, int]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False, lifespan="off")
    )
    thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    return server, thread, int(server.servers[0].sockets[0].getsockname()[1])


def send_share(url: str, numbers: range) -> tuple[list[float], dict[int, int]]:
    """One client's share of the load: latencies and status counts of its signed webhooks."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for number in numbers:
            body = request_body(number)
            webhook_id = f"msg_{number}_{uuid.uuid4().hex[:8]}"
            timestamp = int(time.time())
            headers = {
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(timestamp),
                "webhook-signature": sign(SECRET, webhook_id, timestamp, body),
            }
            sent = time.perf_counter()
            response = http.post(f"/webhooks/{ROUTE}", content=body, headers=headers)
            latencies.append(time.perf_counter() - sent)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    return latencies, statuses


def run_clients(url: str, requests: int, clients: int) -> tuple[float, list[float], dict[int, int]]:
    """Send ``requests`` signed webhooks from ``clients`` processes: elapsed seconds, latencies, statuses."""
    # Client processes, not threads: clients sharing the server's GIL would measure the clients.
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(clients, mp_context=context) as pool:
        shares = [range(n, requests, clients) for n in range(clients)]
        started = time.perf_counter()
        for own_latencies, own_statuses in pool.map(send_share, [url] * clients, shares):
            latencies.extend(own_latencies)
            for status, count in own_statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        elapsed = time.perf_counter() - started
    return elapsed, latencies, statuses


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--store", help="webhook-id ledger store URL (default: a temporary SQLite file)")
    arguments = parser.parse_args()

    floor = pika_floor(arguments.amqp, arguments.requests, request_body(0))
    print(f"raw pika floor (publish + confirm, one at a time): {floor:,.0f} messages/s")

    # The router's own path: the per-thread confirming sink to the route's ingress queue, and the
    # webhook-id ledger in a SQLite store, as `router run` wires them.
    broker = BrokerSettings(url=arguments.amqp, queue_type="quorum", prefix=f"bench{uuid.uuid4().hex[:8]}")
    topology = Topology(broker)
    queue = topology.ingress_queue(ROUTE)
    admin = connect(broker)
    topology.declare(admin, [queue])
    sink = SharedIngressSink(broker)
    folder = tempfile.TemporaryDirectory(prefix="bench-webhooks-")
    store = Store(arguments.store or f"sqlite:///{folder.name}/state.db")
    settings = WebhookSettings(
        route=ROUTE,
        secret=SECRET,
        schema=None,
        max_body=1 << 20,
        rate_limit=None,
        tolerance=300.0,
        records="events",
    )
    app = Starlette(routes=webhook_routes({ROUTE: settings}, sink, StoreWebhookLedger(store)))
    server, thread, port = start_server(app)
    try:
        elapsed, latencies, statuses = run_clients(
            f"http://127.0.0.1:{port}", arguments.requests, arguments.clients
        )
        queued: Any = queue_depth(admin, queue)
    finally:
        server.should_exit = True
        thread.join(10)
        sink.close()
        store.close()
        folder.cleanup()
        queue.bind(admin.default_channel).delete()
        admin.channel().exchange_delete(broker.prefix)
        admin.release()

    accepted = statuses.get(202, 0)
    rate = accepted / elapsed
    print(
        f"webhooks ({arguments.clients} client processes, {EVENTS_PER_REQUEST} events each): "
        f"{accepted}/{arguments.requests} accepted (statuses {dict(sorted(statuses.items()))}), "
        f"{queued} messages in the queue"
    )
    print(f"accepted requests/s with confirms: {rate:,.0f}  ({rate * EVENTS_PER_REQUEST:,.0f} events/s)")
    p50, p99 = percentile(latencies, 0.50) * 1000, percentile(latencies, 0.99) * 1000
    print(f"latency p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"ratio to the raw pika floor: {rate / floor:.2f}")
    return 0 if accepted == arguments.requests == queued else 1


if __name__ == "__main__":
    sys.exit(main())
