"""No secret leaves the router: not in its logs, dead letters, audit trail, `router status` or CLI errors.

The target here is hostile in the most ordinary way: it refuses every event and its error body echoes
the request line (with the URL's ``access_token``) and the ``Authorization`` header it was sent.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from state import Store
from tests.integration.harness import RouterProcess, wait_until, write_config, write_pos_file

pytestmark = pytest.mark.slow

QUERY_TOKEN = "qtok-7f3a9c1e5b"
# "@" and "/" in a password used to end the masked part of a URL early.
PASSWORD = "p@ss/w0rd-9"
USERNAME = "erp-basic"
BASIC_VALUE = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
ENV = {"ERP_QUERY_TOKEN": QUERY_TOKEN, "ERP_PASSWORD": PASSWORD}
LEAKS = (QUERY_TOKEN, PASSWORD, quote(PASSWORD, safe=""), BASIC_VALUE)


@contextmanager
def echoing_target() -> Iterator[str]:
    """A loopback target answering 422 with the request line and Authorization header in the body."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.dumps(
                {
                    "title": "rejected",
                    "request": f"POST http://{self.headers['Host']}{self.path}",
                    "authorization": self.headers.get("Authorization"),
                }
            ).encode()
            self.send_response(422)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _config(folder: Path, *, broker_url: str, prefix: str, target: str) -> Path:
    """The harness's POS route, its ERP target given a query token and basic auth from the environment."""
    path = write_config(
        folder,
        broker_url=broker_url,
        prefix=prefix,
        targets={"erp": target},
        retry={"attempts": 1, "initial": "50ms", "max": "50ms", "max_age": "10s"},
    )
    config = json.loads(path.read_text(encoding="utf-8"))
    erp = config["targets"]["erp"]
    erp["url"] += "?access_token=${ERP_QUERY_TOKEN}"
    erp["auth"] = {"basic": {"username": USERNAME, "password": "${ERP_PASSWORD}"}}
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def _cli(config: Path, *args: str, env: Mapping[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", *args, "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **env},
    )


def _assert_no_leak(where: str, text: str) -> None:
    for secret in LEAKS:
        assert secret not in text, f"{secret!r} leaked into {where}:\n{text}"


def test_an_echoing_target_leaks_no_secret_to_logs_dead_letters_audit_or_status(
    tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    with echoing_target() as target:
        config = _config(tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, target=target)
        # Row 1 is refused and dead-lettered; row 2, same SKU and store, is parked behind it.
        write_pos_file(tmp_path / "inbox" / "pos-0002.csv", 2, bad={2: {"SKU": "SKU-001", "STORE": "S002"}})
        store = Store(f"sqlite:///{tmp_path / 'state.db'}")
        with RouterProcess(config, env=ENV) as router:
            wait_until(lambda: len(store.list_dead_letters()) == 2, 60, "a dead and a parked letter")
            dead = store.list_dead_letters(status="dead")[0]
            # Discarding the dead letter releases the parked one; the target refuses it too, and the
            # audit trail records why with the target's answer.
            discard = _cli(config, "deadletter", "discard", str(dead.id), "--reason", "test")
            assert discard.returncode == 0, discard.stderr
            wait_until(lambda: len(store.list_dead_letters(status="dead")) == 1, 60, "the release to fail")
            status = _cli(config, "status", "--json")
            assert router.terminate() == 0, router.output()
        letters = store.list_dead_letters()
        audit = store.list_audit()
        store.close()

    refused = [letter for letter in letters if letter.status == "dead"]
    assert len(refused) == 1 and "HTTP 422 from erp" in refused[0].detail, letters
    # The echo is still useful: it says what was sent, with the secrets masked.
    assert "access_token=***" in refused[0].detail and "Basic ***" in refused[0].detail, refused[0].detail
    for letter in letters:
        _assert_no_leak(f"dead letter {letter.id}", json.dumps(letter.to_dict(), default=str))
    released = [entry for entry in audit if entry.actor != "test" and entry.action == "deadletter.dead"]
    assert released and "HTTP 422" in json.dumps(released[0].to_dict()), audit
    _assert_no_leak("the audit trail", json.dumps([entry.to_dict() for entry in audit], default=str))
    output = router.output()
    assert "dead-lettered at erp" in output and "failed again at erp" in output, output
    _assert_no_leak("the router's log", output)
    assert status.returncode == 0, status.stderr
    [erp] = json.loads(status.stdout)["targets"]
    assert erp["location"].endswith("/inventory?access_token=***"), erp
    _assert_no_leak("router status --json", status.stdout + status.stderr)


def test_status_masks_a_broker_password_holding_at_and_slash(tmp_path: Path) -> None:
    config = _config(
        tmp_path, broker_url=f"amqp://router:{PASSWORD}@127.0.0.1:1//", prefix="router", target="http://x"
    )

    status = _cli(config, "status", "--json")

    assert status.returncode == 1
    report = json.loads(status.stdout)
    assert report["broker"] == "amqp://router:***@127.0.0.1:1//", report
    assert any("unreachable" in error for error in report["errors"]), report
    _assert_no_leak("router status --json", status.stdout + status.stderr)
