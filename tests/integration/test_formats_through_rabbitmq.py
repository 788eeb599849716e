"""Each shipped route of a non-flat format through the real `router run` on RabbitMQ.

The route definitions are the shipped ones (routes.yaml and tests/routes/edi/config.yml) and the
expectations are those of their route unit tests, so what `router test` proves in-process is shown
to hold through the broker, the transform worker and the delivery to a loopback target too.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from router.route_tests import compare_events, load_test_file
from router.simulated import SimulatedTarget
from tests.integration.harness import RouterProcess, wait_until, write_config

pytestmark = [pytest.mark.slow, pytest.mark.rabbitmq]

ROOT = Path(__file__).parents[2]
ROUTES = ROOT / "tests" / "routes"


def _shipped_route(config: Path, name: str) -> dict[str, Any]:
    document = YAML(typ="safe").load(config.read_text(encoding="utf-8"))
    [route] = [route for route in document["routes"] if route["name"] == name]
    return route


@pytest.mark.parametrize(
    ("config", "test_file"),
    [
        (ROOT / "routes.yaml", ROUTES / "legacy-pos.yaml"),
        (ROUTES / "edi" / "config.yml", ROUTES / "edi" / "x12-846.yaml"),
        (ROUTES / "edi" / "config.yml", ROUTES / "edi" / "edifact-desadv.yaml"),
        (ROUTES / "edi" / "config.yml", ROUTES / "edi" / "edifact-invrpt.yaml"),
    ],
    ids=["fixed-width", "x12-846", "edifact-desadv", "edifact-invrpt"],
)
def test_a_shipped_route_maps_its_sample_into_the_events_its_route_test_expects(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str, config: Path, test_file: Path
) -> None:
    tests = load_test_file(test_file)
    case = next(case for case in tests.cases if case.input.file is not None and case.expect)
    assert case.input.file is not None and case.expect is not None
    sample = test_file.parent / case.input.file
    route = _shipped_route(config, tests.route)
    route.pop("enabled", None)
    route["source"] = {
        "type": "file",
        "path": "inbox",
        "pattern": "*",
        "stable_for": "0s",
        "poll": "100ms",
        "archive": "archive",
        "errors": "errors",
    }
    with SimulatedTarget("erp") as erp, SimulatedTarget("wms") as wms:
        targets = {"erp": erp, "wms": wms}
        path = write_config(
            tmp_path,
            broker_url=rabbitmq_url,
            prefix=rabbitmq_namespace,
            targets={name: target.url for name, target in targets.items() if name in route["deliver"]},
        )
        document = json.loads(path.read_text(encoding="utf-8"))
        document["routes"] = [route]
        path.write_text(json.dumps(document), encoding="utf-8")
        (tmp_path / "inbox" / sample.name).write_bytes(sample.read_bytes())

        def mismatches() -> list[str]:
            routed: dict[str, list[str]] = {}
            for name in route["deliver"]:
                for event in targets[name].events:
                    routed.setdefault(event["event_id"], []).append(name)
            first = targets[route["deliver"][0]].events
            arrived = sorted(first, key=lambda event: event["source"]["record"])
            return compare_events(case.expect, arrived, routed)

        with RouterProcess(path) as router:
            wait_until(lambda: (tmp_path / "archive" / sample.name).exists(), 60, f"{sample.name} archived")
            # Each target is delivered to on its own: wait until every one has what it should get.
            with contextlib.suppress(AssertionError):
                wait_until(lambda: not mismatches(), 60, "every expected event at every target")
            assert router.terminate() == 0, router.output()

    assert mismatches() == []
