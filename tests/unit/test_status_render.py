"""`router status` as text: which process holds which partitions of each target, as ranges."""

from __future__ import annotations

from io import StringIO

from rich.console import Console

from router.status import render_status


def test_the_partition_consumers_table_names_each_holder_and_the_unheld_partitions() -> None:
    target = {
        "name": "erp",
        "type": "http",
        "location": "http://erp",
        "partitions": 16,
        "max_in_flight": 16,
        "queue_depth": 0,
        "parked_keys": 0,
        "holders": {"host-a:101:1a2b3c4d": [0, 1, 2, 3, 5], "host-b:202:5e6f7a8b": [6, 7, 8, 9, 10, 11, 12]},
        "unheld": [4, 13, 14, 15],
    }
    report = {"config": "routes.yaml", "broker": "amqp://", "store": "sqlite://", "routes": []}
    output = StringIO()

    render_status({**report, "targets": [target], "errors": []}, Console(file=output, width=200))

    lines = output.getvalue().splitlines()
    assert any("host-a:101:1a2b3c4d" in line and "0-3,5" in line for line in lines)
    assert any("host-b:202:5e6f7a8b" in line and "6-12" in line for line in lines)
    assert any("(none)" in line and "4,13-15" in line for line in lines)
