"""Benchmark: a large POS file through the real router on RabbitMQ, against the raw pika floor.

Prints, from one run on this machine:
- the raw floor: plain pika at its best, publishing persistent messages into a quorum queue with
  pipelined publisher confirms (a window of 1,000) and consuming them back (messages/s), for
  single-event messages and for chunk-sized messages;
- the router: a ROWS-row POS file dropped into the inbox until every event reached a loopback
  HTTP target taking micro-batches of BATCH events (``--batch 1``: one event per request), the file
  read in chunks of CHUNK records (events/s end to end), and the ratio to the floor;
- the router process's peak RSS (VmHWM), so a large file can be checked to stream in flat memory;
- the router process's CPU time per event while the file went through: on a shared machine it moves
  far less than the rates do.

Usage: .venv/bin/python bench/throughput.py [--rows 100000] [--batch 500] [--chunk 500] [--amqp URL]
       [--profile FILE (py-spy while the file goes through, collapsed stacks per thread)]
Absolute figures on shared machines are noise; compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kombu import Connection

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.floor import FLOOR_WINDOW, pika_pipelined_floor
from router.broker import BrokerSettings, Topology
from router.simulated import SimulatedTarget
from tests.integration.harness import RouterProcess, wait_until, write_config, write_pos_file


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _delete_router_queues(amqp_url: str, prefix: str, partitions: int) -> None:
    """Remove the queues and exchange the benchmark's router declared, so runs leave nothing behind."""
    topology = Topology(BrokerSettings(url=amqp_url, prefix=prefix))
    queues = [topology.ingress_queue("pos-sales"), *topology.delivery_queues("erp", partitions)]
    with Connection(amqp_url) as connection:
        for queue in queues:
            queue(connection.default_channel).delete()
        connection.default_channel.exchange_delete(prefix)


def _profile(pid: int, output: str | None) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the router's threads (on CPU only) until stopped, as collapsed stacks."""
    if output is None:
        return None
    command = ["py-spy", "record", "--threads", "--format", "raw", "--rate", "100", "--nonblocking"]
    command += ["-o", output, "--pid", str(pid)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL)


def router_run(
    amqp_url: str, rows: int, batch: int, chunk: int, profile: str | None = None
) -> tuple[float, int, float, float]:
    """(events/s end to end, peak RSS KiB, file size MiB, router CPU ms/event) for one file through
    `router run`."""
    with tempfile.TemporaryDirectory(prefix="bench-") as folder, SimulatedTarget("erp") as erp:
        root = Path(folder)
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        config = write_config(
            root,
            broker_url=amqp_url,
            prefix=prefix,
            targets={"erp": erp.url},
            batch={"erp": batch},
            chunk_size=chunk,
        )
        staged = write_pos_file(root / f"pos-{rows}.csv", rows)
        size_mib = staged.stat().st_size / 2**20
        with RouterProcess(config) as router:
            time.sleep(1.0)  # let the process start and declare its topology before the clock starts
            profiler = _profile(router.process.pid, profile)
            started = time.perf_counter()
            cpu_before = cpu_seconds(router.process.pid)
            staged.rename(root / "inbox" / staged.name)
            hwm = 0
            deadline = 600.0

            def done() -> bool:
                nonlocal hwm
                hwm = max(hwm, vm_hwm_kib(router.process.pid))
                return len(erp.events) >= rows

            wait_until(done, deadline, f"{rows} events at the target")
            elapsed = time.perf_counter() - started
            cpu_ms_per_event = (cpu_seconds(router.process.pid) - cpu_before) * 1000 / rows
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(60)
            router.terminate()
        _delete_router_queues(amqp_url, prefix, partitions=4)
        return rows / elapsed, hwm, size_mib, cpu_ms_per_event


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=500, help="events per request to the target")
    parser.add_argument("--chunk", type=int, default=500, help="records per ingress message")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672/%2F")
    parser.add_argument("--profile", metavar="FILE", help="py-spy the router meanwhile (collapsed stacks)")
    args = parser.parse_args()

    event = json.dumps({"pad": "x" * 300}).encode()
    floor_small = pika_pipelined_floor(args.amqp, 20_000, event, consume=True)
    floor_chunk = pika_pipelined_floor(args.amqp, 400, event * args.batch, consume=True)
    events_per_s, hwm_kib, size_mib, cpu_ms = router_run(
        args.amqp, args.rows, args.batch, args.chunk, args.profile
    )
    print(f"raw floor, pika, {FLOOR_WINDOW} confirms in flight, published and consumed:")
    print(f"  1 event/message                 : {floor_small:10.0f} messages/s")
    print(
        f"  {args.batch}-event-sized messages      : {floor_chunk:10.0f} messages/s "
        f"({floor_chunk * args.batch:.0f} events/s if each carried {args.batch})"
    )
    print(f"router, {args.rows} rows ({size_mib:.1f} MiB) : {events_per_s:10.0f} events/s end to end")
    print(f"ratio router events/s ÷ floor messages/s (1 event/message): {events_per_s / floor_small:.2f}")
    print(f"router process peak RSS            : {hwm_kib / 1024:10.1f} MiB")
    print(f"router process CPU per event       : {cpu_ms:10.3f} ms")


if __name__ == "__main__":
    main()
