"""Helpers for end-to-end tests: a config on disk, POS files, and the real `router run` as a process."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

STORES = {"S001": "0614141000012", "S002": "0614141000029", "S003": "0614141000036"}


def write_config(
    folder: Path,
    *,
    broker_url: str | list[str],
    prefix: str,
    targets: Mapping[str, str],
    batch: Mapping[str, int | None] | None = None,
    retry: Mapping[str, Any] | None = None,
    chunk_size: int = 500,
    queue_type: str = "quorum",
    circuit_breaker: Mapping[str, Any] | None = None,
    store_url: str | None = None,
) -> Path:
    """A routes.yaml for one POS file route delivering to ``targets`` (name -> base URL); every target
    gets ``circuit_breaker`` when given."""
    (folder / "stores.csv").write_text(
        "store_code,gln\n" + "".join(f"{code},{gln}\n" for code, gln in STORES.items()), encoding="utf-8"
    )
    config: dict[str, Any] = {
        "version": 1,
        "broker": {"url": broker_url, "queue_type": queue_type, "prefix": prefix},
        "store": {"url": store_url or f"sqlite:///{folder / 'state.db'}"},
        "http": {"listen": "127.0.0.1:0", "enabled": False},
        "lookups": {"stores": {"file": "stores.csv", "key": "store_code", "value": "gln"}},
        "targets": {
            name: {
                "type": "http",
                "url": f"{url}/inventory",
                "partitions": 4,
                "timeout": "5s",
                "retry": dict(retry or {"attempts": 20, "initial": "50ms", "max": "500ms", "max_age": "2m"}),
                **({"batch": {"max_events": size, "max_wait": "50ms"}} if (batch or {}).get(name) else {}),
                **({"circuit_breaker": dict(circuit_breaker)} if circuit_breaker else {}),
            }
            for name, url in targets.items()
            for size in [(batch or {}).get(name)]
        },
        "routes": [
            {
                "name": "pos-sales",
                "source": {
                    "type": "file",
                    "path": "inbox",
                    "pattern": "*.csv",
                    "stable_for": "0s",
                    "poll": "100ms",
                    "archive": "archive",
                    "errors": "errors",
                },
                "format": "csv",
                "records": "rows",
                "chunk_size": chunk_size,
                "map": {
                    "type": "sale",
                    "sku": {"column": "SKU"},
                    "location": {"column": "STORE", "lookup": "stores"},
                    "quantity": {"column": "QTY", "as": "decimal"},
                    "occurred_at": {"column": "SOLD_AT", "as": "datetime", "tz": "America/New_York"},
                    "transaction_id": {"column": "TXN"},
                },
                "deliver": list(targets),
            }
        ],
    }
    for sub in ("inbox", "archive", "errors"):
        (folder / sub).mkdir(exist_ok=True)
    path = folder / "routes.yaml"
    # JSON is YAML; the loader reads it like any routes.yaml.
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def write_pos_file(path: Path, rows: int, *, bad: Mapping[int, Mapping[str, str]] | None = None) -> Path:
    """A POS export of ``rows`` sales over a few SKUs and stores; ``bad`` overrides cells of given rows."""
    stores = list(STORES)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["TXN", "SKU", "STORE", "QTY", "SOLD_AT"])
        writer.writeheader()
        for n in range(1, rows + 1):
            row = {
                "TXN": f"T{n:07d}",
                "SKU": f"SKU-{n % 37:03d}",
                "STORE": stores[n % len(stores)],
                "QTY": str(1 + n % 5),
                "SOLD_AT": f"2026-11-24 {8 + (n // 3600) % 12:02d}:{(n // 60) % 60:02d}:{n % 60:02d}",
            }
            row.update((bad or {}).get(n, {}))
            writer.writerow(row)
    return path


def in_order_per_key(events: list[dict[str, Any]]) -> bool:
    """Whether each sequence key's first deliveries follow its file's transaction order (files dropped
    together have no order between them; a repeat of an event already delivered, within a crash window,
    does not count as reordering)."""
    seen: set[str] = set()
    per_key: dict[tuple[str, str], list[str]] = {}
    for event in events:
        if event["event_id"] not in seen:
            seen.add(event["event_id"])
            stream = (event["source"].get("file", ""), event["sequence_key"])
            per_key.setdefault(stream, []).append(event["transaction_id"])
    return all(transactions == sorted(transactions) for transactions in per_key.values())


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class RouterProcess:
    """The real `router run` in a child process, stopped with SIGTERM."""

    def __init__(self, config: Path, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.log = config.parent / f"router-{os.getpid()}-{time.monotonic_ns()}.log"
        command = [sys.executable, "-m", "router.cli", "--log-json", "run", "-c", str(config), *args]
        self._log_handle = self.log.open("w")
        self.process = subprocess.Popen(
            command, stdout=self._log_handle, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM, then wait for the drain; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log_handle.close()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)
        self._log_handle.close()

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def __enter__(self) -> RouterProcess:
        return self

    def __exit__(self, *_: object) -> None:
        if self.process.poll() is None:
            self.kill()
