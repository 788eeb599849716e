"""`router status`: what is configured, how deep the queues are and which dead letters are open."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ops.secrets import redact_data
from router.assembly import broker_settings
from router.broker import Topology, connect, queue_depth
from router.config import RouterConfig, redact_url
from router.partitions import partition_holders
from router.terminal import data_text
from state import Store


def collect_status(config: RouterConfig) -> dict[str, Any]:
    """A JSON-ready report; problems reaching the broker or the store go under ``errors``."""
    broker = broker_settings(config)
    topology = Topology(broker)
    report: dict[str, Any] = {
        "config": str(config.path),
        "broker": broker.display,
        "store": redact_url(config.store.url),
        "routes": [],
        "targets": [],
        "errors": [],
    }
    depths: dict[str, int | None] = {}
    if broker.is_memory:
        report["notes"] = ["embedded memory:// broker: queues live inside a running `router run` process"]
    else:
        try:
            with connect(broker) as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
                for route in config.routes:
                    depths[topology.ingress_name(route.name)] = queue_depth(
                        connection, topology.ingress_queue(route.name)
                    )
                for name, target in config.targets.items():
                    for n in range(target.partitions):
                        depths[topology.delivery_name(name, n)] = queue_depth(
                            connection, topology.delivery_queue(name, n)
                        )
        except Exception as error:
            report["errors"].append(f"broker {broker.display} unreachable: {error}")
    open_letters: dict[str, int] = {}
    parked_keys: dict[str, int] = {}
    holders: dict[str, dict[int, str]] = {}
    try:
        store = Store(config.store.resolved_url(config.base_dir))
        try:
            for route in config.routes:
                open_letters[route.name] = store.count_open(route.name)
            for name in config.targets:
                parked_keys[name] = store.count_parked_keys(name)
                holders[name] = partition_holders(store, name)
        finally:
            store.close()
    except Exception as error:
        report["errors"].append(f"store {redact_url(config.store.url)} unreachable: {error}")
    for route in config.routes:
        report["routes"].append(
            {
                "name": route.name,
                "source": route.source.type,
                "enabled": route.enabled,
                "format": route.format,
                "deliver": [rule.target for rule in route.deliver_rules()],
                "ingress_depth": depths.get(topology.ingress_name(route.name)),
                "deadletters_open": open_letters.get(route.name),
            }
        )
    for name, target in config.targets.items():
        partition_depths = [depths.get(topology.delivery_name(name, n)) for n in range(target.partitions)]
        known = [d for d in partition_depths if d is not None]
        report["targets"].append(
            {
                "name": name,
                "type": target.type,
                "location": target.location,
                "partitions": target.partitions,
                "max_in_flight": target.in_flight_limit,
                "queue_depth": sum(known) if known else None,
                "parked_keys": parked_keys.get(name),
                "holders": _by_holder(holders.get(name, {})),
                "unheld": sorted(set(range(target.partitions)) - set(holders.get(name, {}))),
            }
        )
    # Errors quote URLs and exception text; whatever holds a secret is masked before anyone sees it.
    redacted: dict[str, Any] = redact_data(report)
    return redacted


def _by_holder(holders: dict[int, str]) -> dict[str, list[int]]:
    """Process -> the partitions it consumes now."""
    grouped: dict[str, list[int]] = {}
    for partition, holder in sorted(holders.items()):
        grouped.setdefault(holder, []).append(partition)
    return grouped


def _ranges(partitions: list[int]) -> str:
    """``[0, 1, 2, 5]`` as ``0-2,5``."""
    spans: list[list[int]] = []
    for partition in partitions:
        if spans and partition == spans[-1][1] + 1:
            spans[-1][1] = partition
        else:
            spans.append([partition, partition])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def render_status(report: dict[str, Any], console: Console) -> None:
    """Print the report as two tables and any errors."""
    console.print(
        f"[bold]config[/] {report['config']}   [bold]broker[/] {report['broker']}   "
        f"[bold]store[/] {report['store']}"
    )
    routes = Table(
        "route", "source", "format", "deliver", "ingress queue", "open dead letters", title="Routes"
    )
    for route in report["routes"]:
        routes.add_row(
            route["name"] if route["enabled"] else f"{route['name']} (disabled)",
            route["source"],
            route["format"],
            ", ".join(route["deliver"]),
            _cell(route["ingress_depth"]),
            _cell(route["deadletters_open"]),
        )
    console.print(routes)
    targets = Table("target", "type", "location", "partitions", "queued", "parked keys", title="Targets")
    for target in report["targets"]:
        targets.add_row(
            target["name"],
            target["type"],
            target["location"],
            str(target["partitions"]),
            _cell(target["queue_depth"]),
            _cell(target["parked_keys"]),
        )
    console.print(targets)
    consumers = Table("target", "process", "partitions", title="Partition consumers")
    for target in report["targets"]:
        for holder, partitions in target["holders"].items():
            consumers.add_row(target["name"], holder, _ranges(partitions))
        if target["unheld"]:
            consumers.add_row(target["name"], "(none)", _ranges(target["unheld"]))
    console.print(consumers)
    for note in report.get("notes", []):
        console.print(f"[dim]{note}[/]")
    for error in report["errors"]:
        console.print(Text.assemble(("error:", "red"), " ", data_text(error, multiline=True)))
