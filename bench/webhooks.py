"""Benchmark: signed, durable partner webhooks through the real `router run`, against the raw pika floor.

Prints, from one run on this machine:
- the raw floor: plain pika publishing persistent messages of the same size into a quorum queue with
  pipelined publisher confirms (a window of 1,000 unconfirmed messages), in messages/s;
- the router: `router run --only http` (quorum ingress queue on the real RabbitMQ, webhook-id ledger
  in SQLite), loaded by wrk (Debian package ``wrk``) with CONNECTIONS keep-alive connections, each
  request signed (Standard Webhooks) under its own webhook-id; accepted requests/s, p50/p99 latency,
  the messages found in the ingress queue (must equal the 202s), and the ratio to the floor.
Without wrk, the bench's own client processes load the router instead (slower: they measure less).

Usage: .venv/bin/python bench/webhooks.py [--duration 15] [--connections 16] [--workers 1]
       [--amqp URL] [--store URL] [--profile FILE (py-spy, collapsed stacks)]
Absolute figures on a shared machine are noise; compare the ratio, and repeat.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from kombu import Connection

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.floor import FLOOR_WINDOW, pika_pipelined_floor
from connectors.signatures import sign
from router.broker import BrokerSettings, Topology, queue_depth
from tests.integration.harness import RouterProcess, wait_until

ROUTE = "bench-partner"
SECRET = "whsec_YmVuY2gtd2ViaG9vay1zZWNyZXQ="
EVENTS_PER_REQUEST = 5
WRK_SCRIPT = Path(__file__).with_name("webhooks.lua")
NOW = int(time.time())
"""The webhook-timestamp of every request: prepared before the load, well within the route's tolerance."""


def request_body(number: int) -> bytes:
    events = [
        {
            "sku": f"SKU-{number:07d}-{line}",
            "warehouse": "W01",
            "on_hand": 3,
            "counted_at": "2026-11-24T10:00:00Z",
        }
        for line in range(EVENTS_PER_REQUEST)
    ]
    return json.dumps({"events": events}, separators=(",", ":")).encode()


def signed(number: int, run: str) -> tuple[str, str, bytes]:
    """A request's webhook-id, signature and body; the timestamp is the caller's (now)."""
    body = request_body(number)
    webhook_id = f"msg_{run}_{number}"
    return webhook_id, sign(SECRET, webhook_id, NOW, body), body


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_config(folder: Path, amqp: str, prefix: str, store: str, port: int, workers: int) -> Path:
    http: dict[str, Any] = {"listen": f"127.0.0.1:{port}"}
    if workers > 1:
        http["workers"] = workers
    config = {
        "version": 1,
        "broker": {"url": amqp, "queue_type": "quorum", "prefix": prefix},
        "store": {"url": store},
        "http": http,
        "targets": {"wms": {"type": "http", "url": "http://127.0.0.1:9/stock", "partitions": 1}},
        "routes": [
            {
                "name": ROUTE,
                "source": {"type": "webhook", "secret": SECRET, "max_body": "64KiB", "tolerance": "10m"},
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
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")  # JSON is YAML
    return path


@dataclass
class Load:
    """What one load run measured."""

    tool: str
    elapsed: float
    statuses: dict[int, int]
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)


def run_wrk(url: str, requests: int, connections: int, duration: float, run: str, folder: Path) -> Load:
    """Load with wrk: each thread cycles through its own share of pre-signed requests."""
    data = folder / "requests.txt"
    with data.open("w", encoding="utf-8") as handle:
        for number in range(requests):
            webhook_id, signature, body = signed(number, run)
            handle.write(f"{webhook_id}\t{NOW}\t{signature}\t{body.decode()}\n")
    threads = min(2, connections)
    command = [
        "wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--latency", "--timeout", "10s",
        "-s", str(WRK_SCRIPT), f"{url}/webhooks/{ROUTE}",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_REQUESTS": str(data), "BENCH_THREADS": str(threads)},
    )
    elapsed = time.perf_counter() - started
    summary = next(
        json.loads(line.removeprefix("BENCH "))
        for line in done.stdout.splitlines()
        if line.startswith("BENCH ")
    )
    return Load(
        tool=f"wrk -t{threads} -c{connections} -d{duration:g}s",
        elapsed=summary["duration_us"] / 1e6 or elapsed,
        statuses={int(status): count for status, count in summary["statuses"].items()},
        p50_ms=summary["p50_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        errors=summary["errors"],
    )


def send_share(url: str, numbers: range, run: str) -> tuple[list[float], dict[int, int]]:
    """One client process's share of the load: latencies and status counts of its signed webhooks."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as http:
        for number in numbers:
            webhook_id, signature, body = signed(number, run)
            headers = {
                "content-type": "application/json",
                "webhook-id": webhook_id,
                "webhook-timestamp": str(NOW),
                "webhook-signature": signature,
            }
            sent = time.perf_counter()
            response = http.post(f"/webhooks/{ROUTE}", content=body, headers=headers)
            latencies.append(time.perf_counter() - sent)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    return latencies, statuses


def run_clients(url: str, requests: int, clients: int, run: str) -> Load:
    """Load with client processes (no wrk): each sends its share sequentially on one connection."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(clients, mp_context=context) as pool:
        shares = [range(n, requests, clients) for n in range(clients)]
        started = time.perf_counter()
        for own_latencies, own_statuses in pool.map(send_share, [url] * clients, shares, [run] * clients):
            latencies.extend(own_latencies)
            for status, count in own_statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        elapsed = time.perf_counter() - started
    ordered = sorted(latencies)
    return Load(
        tool=f"{clients} httpx client processes",
        elapsed=elapsed,
        statuses=statuses,
        p50_ms=ordered[len(ordered) // 2] * 1000,
        p99_ms=ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] * 1000,
        errors=0,
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds of wrk load")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="http.workers of the router")
    parser.add_argument("--requests", type=int, help="signed requests prepared (default: 5,000/s of load)")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    parser.add_argument("--store", help="webhook-id ledger store URL (default: a temporary SQLite file)")
    parser.add_argument("--no-wrk", action="store_true", help="use the bench's own client processes")
    parser.add_argument(
        "--profile", metavar="FILE", help="py-spy the router during the load (collapsed stacks)"
    )
    arguments = parser.parse_args()
    use_wrk = not arguments.no_wrk and shutil.which("wrk") is not None
    requests = arguments.requests or int(5000 * arguments.duration)

    floor = pika_pipelined_floor(arguments.amqp, 20_000, request_body(0))
    print(
        f"raw pika floor (persistent, quorum queue, {FLOOR_WINDOW} confirms in flight): "
        f"{floor:,.0f} messages/s"
    )

    run = uuid.uuid4().hex[:8]
    prefix = f"benchwh{run}"
    broker = BrokerSettings(url=arguments.amqp, queue_type="quorum", prefix=prefix)
    queue = Topology(broker).ingress_queue(ROUTE)
    with tempfile.TemporaryDirectory(prefix="bench-webhooks-") as name:
        folder = Path(name)
        port = free_port()
        store = arguments.store or f"sqlite:///{folder / 'state.db'}"
        config = write_config(folder, arguments.amqp, prefix, store, port, arguments.workers)
        url = f"http://127.0.0.1:{port}"
        router = RouterProcess(config, "--only", "http")
        try:
            wait_until(lambda: _serves(url), 30, "the router's listener")
            if arguments.workers > 1:
                # The other processes start after the first serves; their start-up CPU is not the load's.
                wait_until(lambda: len(_children(router.process.pid)) == arguments.workers - 1, 30, "workers")
                time.sleep(5)
            profiler = _profile(router, arguments.profile, arguments.duration)
            cpu_before = _cpu_seconds(router.process.pid)
            if use_wrk:
                load = run_wrk(url, requests, arguments.connections, arguments.duration, run, folder)
            else:
                load = run_clients(url, min(requests, 4000), arguments.connections, run)
            cpu = _cpu_seconds(router.process.pid) - cpu_before
            if profiler is not None:
                profiler.wait(60)
            with Connection(arguments.amqp) as admin:
                queued = queue_depth(admin, queue)
        finally:
            exit_code = router.terminate()
            with Connection(arguments.amqp) as admin:
                queue.bind(admin.default_channel).delete()
                admin.default_channel.exchange_delete(prefix)
        problems = [line for line in router.output().splitlines() if '"WARNING"' in line or '"ERROR"' in line]
        if exit_code != 0 or problems:
            print(f"router exit code {exit_code}; {len(problems)} warnings or errors, the first:")
            print("\n".join(problems[:5]))

    rate = load.accepted / load.elapsed
    print(
        f"router ({load.tool}, {arguments.workers} http worker(s), {EVENTS_PER_REQUEST} events per request): "
        f"statuses {dict(sorted(load.statuses.items()))}, socket errors {load.errors}, "
        f"{queued} messages in the ingress queue"
    )
    print(f"accepted requests/s: {rate:,.0f}  ({rate * EVENTS_PER_REQUEST:,.0f} events/s)")
    print(f"latency p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms")
    # CPU per request holds still on a shared machine where the rates do not.
    print(f"router CPU per accepted request: {cpu / max(1, load.accepted) * 1000:.2f} ms")
    print(f"ratio to the raw pika floor: {rate / floor:.2f}")
    # Every 202 is one message in the queue; the few more are requests in flight when the load stopped.
    complete = queued is not None and load.accepted <= queued <= load.accepted + arguments.connections
    return 0 if complete and set(load.statuses) <= {200, 202} else 1


def _profile(router: RouterProcess, output: str | None, duration: float) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the router (all its processes) during the load, as collapsed stacks."""
    if output is None:
        return None
    command = ["py-spy", "record", "--subprocesses", "--gil", "--format", "raw", "--rate", "200"]
    command += ["--nonblocking"]
    command += ["-d", str(int(duration)), "-o", output, "--pid", str(router.process.pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def _stats() -> dict[int, list[str]]:
    """/proc/<pid>/stat of every process, split into fields from the state on."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                found[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
    return found


def _children(pid: int) -> list[int]:
    return [child for child, fields in _stats().items() if int(fields[1]) == pid]


def _cpu_seconds(pid: int) -> float:
    """CPU seconds (user and system) used so far by ``pid`` and its child processes (http.workers)."""
    return sum(
        (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for process, fields in _stats().items()
        if process == pid or int(fields[1]) == pid
    )


def _serves(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    sys.exit(main())
