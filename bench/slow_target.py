"""Benchmark: delivery to a slow target, every partition in flight, one and two `router run` processes.

Real parts: RabbitMQ, a SQLite store, `router run --only delivery` child processes and a loopback HTTP
target that answers each request after ``--latency`` seconds. The events (``--events`` over ``--keys``
sequence keys) are published to the target's partition queues in messages the size the transform stage
makes (a 500-record chunk split over the partitions) once every process holds its share of the
partitions; the clock runs from the target's first request to its last event. Each run checks that every
event arrived and that each key's events arrived in order. Each figure is also given as a share of what
bare httpx threads (one per partition) get from the same target on this machine at that moment, since
a loaded machine cannot reach the ideal whatever the router does; and the router's CPU per event.

Scenarios (``--scenario``; by default single, batch and scale):
- ``single``: one event per request at ``--latency`` and at 100 ms; events/s and the share of the ideal
  (partitions x 1000 / latency in ms);
- ``batch``: micro-batches of 100 at ``--latency`` (ideal: partitions x 100 x 1000 / latency);
- ``scale``: ``max_in_flight`` = partitions / 2, so one process cannot use every partition: events/s
  with one process and with two, and their ratio;
- ``cpu``: a target answering at once, so the router's CPU is the limit: events/s with one process and
  with two (each Python process uses about one core);
- ``backlog``: ``--backlog`` events (default 1,000,000) queued before the router starts, delivered in
  micro-batches of 100 by a target answering at once; the router's RSS sampled across the run.

Usage: .venv/bin/python bench/slow_target.py [--events 10000] [--keys 1400] [--partitions 16]
       [--latency 0.02] [--scenario single batch scale cpu backlog] [--backlog 1000000] [--amqp URL]
Absolute figures on shared machines are noise; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from kombu import Connection

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from canonical.ids import partition_for
from router.broker import BrokerSettings, Topology, open_publisher
from router.messages import PartitionBatch
from router.partitions import partition_holders
from router.simulated import SimulatedTarget, TargetBehaviour
from state import Store
from tests.integration.harness import RouterProcess, wait_until, write_config

CHUNK = 500
T0 = datetime(2026, 11, 28, 9, 0, tzinfo=UTC)


@dataclass(frozen=True)
class Run:
    """One scenario's settings."""

    label: str
    latency: float
    processes: int = 1
    batch: int | None = None
    max_in_flight: int | None = None


@dataclass(frozen=True)
class Figures:
    events: int
    seconds: float
    rss_kib: list[list[int]]
    cpu_seconds: float
    """CPU time the router processes used while delivering (user and system)."""

    @property
    def per_second(self) -> float:
        return self.events / self.seconds


def events_for(count: int, keys: int) -> list[dict[str, Any]]:
    """``count`` sale events spread over ``keys`` sequence keys; ``record`` orders the events of a key."""
    return [
        {
            "event_id": f"bench-{n}",
            "type": "sale",
            "sequence_key": f"SKU-{n % keys:05d}|0614141000012",
            "sku": f"SKU-{n % keys:05d}",
            "location": "0614141000012",
            "quantity": "1",
            "occurred_at": (T0 + timedelta(milliseconds=n)).isoformat(),
            "source": {"route": "pos-sales", "system": "bench", "message_id": f"m-{n // CHUNK}", "record": n},
        }
        for n in range(count)
    ]


def publish(broker: BrokerSettings, events: Sequence[dict[str, Any]], partitions: int) -> None:
    """Publish like the transform stage: each chunk of CHUNK events as one message per partition."""
    topology = Topology(broker)
    with open_publisher(broker, topology) as sink:
        for start in range(0, len(events), CHUNK):
            per_partition: dict[int, list[dict[str, Any]]] = {}
            for event in events[start : start + CHUNK]:
                per_partition.setdefault(partition_for(event["sequence_key"], partitions), []).append(event)
            for partition, batch in per_partition.items():
                body = PartitionBatch(target="erp", partition=partition, events=batch, route="pos-sales")
                sink.publish(topology.delivery_queue("erp", partition), body)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def in_order(events: Sequence[dict[str, Any]]) -> bool:
    """Whether each key's first deliveries came in record order (a repeat does not count)."""
    seen: set[str] = set()
    last: dict[str, int] = {}
    for event in events:
        if event["event_id"] in seen:
            continue
        seen.add(event["event_id"])
        record = event["source"]["record"]
        if record < last.get(event["sequence_key"], -1):
            return False
        last[event["sequence_key"]] = record
    return True


def configure(root: Path, amqp: str, prefix: str, target_url: str, partitions: int, run: Run) -> Path:
    path = write_config(
        root,
        broker_url=amqp,
        prefix=prefix,
        targets={"erp": target_url},
        retry={"attempts": 20, "initial": "50ms", "max": "500ms", "max_age": "2m"},
    )
    config = json.loads(path.read_text(encoding="utf-8"))
    target = config["targets"]["erp"]
    target["partitions"] = partitions
    if run.max_in_flight is not None:
        target["max_in_flight"] = run.max_in_flight
    if run.batch is not None:
        target["batch"] = {"max_events": run.batch, "max_wait": "50ms"}
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


@contextmanager
def routers(config: Path, count: int) -> Iterator[list[RouterProcess]]:
    with ExitStack() as stack:
        processes = [stack.enter_context(RouterProcess(config, "--only", "delivery")) for _ in range(count)]
        yield processes
        for process in processes:
            process.terminate()


def balanced(store: Store, partitions: int, processes: int) -> bool:
    holders = partition_holders(store, "erp")
    return len(holders) == partitions and len(set(holders.values())) == processes


def measure(
    amqp: str, run: Run, events: list[dict[str, Any]], partitions: int, *, backlog: bool = False
) -> Figures:
    """Deliver ``events`` under ``run``; raises when one is missing or a key is out of order."""
    behaviour = TargetBehaviour(latency=run.latency)
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    broker = BrokerSettings(url=amqp, prefix=prefix)
    with (
        tempfile.TemporaryDirectory(prefix="bench-") as folder,
        SimulatedTarget("erp", behaviour) as erp,
    ):
        root = Path(folder)
        config = configure(root, amqp, prefix, erp.url, partitions, run)
        store = Store(f"sqlite:///{root / 'state.db'}")
        try:
            if backlog:
                publish(broker, events, partitions)
            with routers(config, run.processes) as processes:
                if not backlog:
                    wait_until(lambda: balanced(store, partitions, run.processes), 120, "partitions shared")
                    publish(broker, events, partitions)
                samples: list[list[int]] = [[] for _ in processes]
                sampling = threading.Event()

                def sample() -> None:
                    while not sampling.wait(1.0):
                        for series, process in zip(samples, processes, strict=True):
                            series.append(rss_kib(process.process.pid))

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                deadline = 60 + 10 * len(events) / 100
                wait_until(lambda: erp.accepted > 0, deadline, "the first request")
                first = time.monotonic()
                cpu_before = sum(cpu_seconds(p.process.pid) for p in processes)
                wait_until(lambda: erp.accepted >= len(events), deadline, f"{len(events)} events")
                elapsed = time.monotonic() - first
                cpu = sum(cpu_seconds(p.process.pid) for p in processes) - cpu_before
                sampling.set()
                sampler.join()
        finally:
            store.close()
            _delete_queues(amqp, prefix, partitions)
    received = erp.events
    if {e["event_id"] for e in received} != {e["event_id"] for e in events}:
        raise AssertionError(f"{run.label}: events lost")
    if not in_order(received):
        raise AssertionError(f"{run.label}: a key's events arrived out of order")
    return Figures(len(events), elapsed, samples, cpu)


def _delete_queues(amqp: str, prefix: str, partitions: int) -> None:
    topology = Topology(BrokerSettings(url=amqp, prefix=prefix))
    with Connection(amqp) as connection:
        for queue in [topology.ingress_queue("pos-sales"), *topology.delivery_queues("erp", partitions)]:
            queue(connection.default_channel).delete()
        connection.default_channel.exchange_delete(prefix)


def client_floor(latency: float, concurrency: int, seconds: float = 5.0) -> float:
    """Requests/s of ``concurrency`` bare httpx threads against the same loopback target: what this
    machine allows now, whatever the router does."""
    with (
        SimulatedTarget("floor", TargetBehaviour(latency=latency)) as target,
        httpx.Client(limits=httpx.Limits(max_connections=concurrency)) as client,
    ):
        until = time.monotonic() + seconds
        counts: list[int] = []

        def post() -> None:
            answered = 0
            while time.monotonic() < until:
                try:
                    client.post(f"{target.url}/inventory", json={"event_id": str(answered)})
                    answered += 1
                except httpx.TransportError:  # counted as nothing, like a request the router retries
                    continue
            counts.append(answered)

        threads = [threading.Thread(target=post) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return sum(counts) / seconds


def ideal(run: Run, partitions: int) -> float:
    """Events/s if every partition always had a request in flight that took exactly the latency."""
    return partitions * (run.batch or 1) / run.latency


def report(run: Run, figures: Figures, partitions: int) -> None:
    share = figures.per_second / ideal(run, partitions)
    floor = client_floor(run.latency, partitions) * (run.batch or 1)
    print(
        f"{run.label:<44} {figures.per_second:8.0f} events/s  {share:5.2f} of ideal "
        f"{ideal(run, partitions):.0f}, {figures.per_second / floor:5.2f} of bare httpx {floor:.0f}  "
        f"({figures.events} events in {figures.seconds:.1f}s, "
        f"router CPU {1000 * figures.cpu_seconds / figures.events:.2f} ms/event)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--keys", type=int, default=1_400)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument(
        "--scenario",
        nargs="+",
        choices=["single", "batch", "scale", "cpu", "backlog"],
        default=["single", "batch", "scale"],
    )
    args = parser.parse_args()
    partitions = args.partitions
    events = events_for(args.events, args.keys)
    print(f"{args.events} events over {args.keys} keys, {partitions} partitions")
    if "single" in args.scenario:
        for latency in (args.latency, 0.1):
            run = Run(f"1 event/request, {latency * 1000:.0f} ms", latency)
            report(run, measure(args.amqp, run, events, partitions), partitions)
    if "batch" in args.scenario:
        run = Run(f"batches of 100, {args.latency * 1000:.0f} ms", args.latency, batch=100)
        report(run, measure(args.amqp, run, events, partitions), partitions)
    if "scale" in args.scenario:
        half = max(partitions // 2, 1)
        rates = []
        for processes in (1, 2):
            label = f"{processes} process(es), max_in_flight {half}, {args.latency * 1000:.0f} ms"
            run = Run(label, args.latency, processes=processes, max_in_flight=half)
            figures = measure(args.amqp, run, events, partitions)
            report(run, figures, partitions)
            rates.append(figures.per_second)
        print(f"{'two processes ÷ one':<44} {rates[1] / rates[0]:8.2f}")
    if "cpu" in args.scenario:
        rates = []
        for processes in (1, 2):
            run = Run(f"{processes} process(es), target answering at once", 0.0, processes=processes)
            figures = measure(args.amqp, run, events, partitions)
            print(
                f"{run.label:<44} {figures.per_second:8.0f} events/s  "
                f"(router CPU {1000 * figures.cpu_seconds / figures.events:.2f} ms/event)"
            )
            rates.append(figures.per_second)
        print(f"{'two processes ÷ one':<44} {rates[1] / rates[0]:8.2f}")
    if "backlog" in args.scenario:
        run = Run(f"backlog of {args.backlog}, batches of 100", 0.0, batch=100)
        figures = measure(args.amqp, run, events_for(args.backlog, args.keys), partitions, backlog=True)
        rss = [kib for series in figures.rss_kib for kib in series]
        series = figures.rss_kib[0]
        quarter = max(len(series) // 4, 1)
        print(
            f"{run.label:<44} {figures.per_second:8.0f} events/s; router RSS MiB: first quarter max "
            f"{max(series[:quarter]) / 1024:.1f}, last quarter max {max(series[-quarter:]) / 1024:.1f}, "
            f"peak {max(rss) / 1024:.1f} over {len(series)} samples"
        )


if __name__ == "__main__":
    main()
