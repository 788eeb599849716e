"""Console tests' helpers: a config with a ``console:`` section, dead letters in its store, and the
router's HTTP stage running in-process on loopback."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from router.config import load_config
from router.runtime import RouterRuntime
from state import Store
from tests.integration.harness import write_config

PASSWORD = "open sesame 7"
HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>'


def console_config(
    folder: Path,
    console: Mapping[str, Any] | None,
    *,
    broker_url: str = "memory://",
    prefix: str = "console",
    **http: Any,
) -> Path:
    """A memory:// routes.yaml listening on a free port, with ``console`` as its console: section."""
    path = write_config(folder, broker_url=broker_url, prefix=prefix, targets={"erp": "http://127.0.0.1:9"})
    document = json.loads(path.read_text())
    document["http"] = {"listen": "127.0.0.1:0", **http}
    if console is not None:
        document["console"] = dict(console)
    path.write_text(json.dumps(document))
    return path


def add_letter(folder: Path, **fields: Any) -> int:
    """A dead letter in the folder's store (a delivery letter with hostile text unless ``fields`` say)."""
    with Store(f"sqlite:///{folder / 'state.db'}") as store:
        return store.add_dead_letter(
            **{
                "route": "pos-sales",
                "stage": "delivery",
                "reason": "rejected",
                "detail": f"HTTP 422 from erp: {HOSTILE}",
                "payload": {"event_id": "e-1", "sequence_key": "k-1", "note": HOSTILE},
                "target": "erp",
                "event_id": "e-1",
                "sequence_key": "k-1",
                **fields,
            }
        )


class Running:
    """The router's HTTP stage for one config, and the base URLs of its listener(s)."""

    def __init__(self, path: Path) -> None:
        self.runtime = RouterRuntime(load_config(path), only=("http",))
        self.runtime.start()
        assert self.runtime.listener is not None
        self.url = f"http://127.0.0.1:{self.runtime.listener.port}"
        console = self.runtime.console_listener
        self.console_url = f"http://127.0.0.1:{console.port}" if console else self.url

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.console_url, timeout=10, follow_redirects=False, **kwargs)

    def stop(self) -> None:
        self.runtime.stop(timeout=5)


def csrf_of(page: httpx.Response) -> str:
    """The CSRF token of the first form on a console page."""
    match = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert match, page.text
    return match.group(1)


@contextmanager
def signed_in(router: Running, user: str = "alice", password: str = PASSWORD) -> Iterator[httpx.Client]:
    """An HTTP client signed in to the console through its login form."""
    with router.client() as client:
        form = client.get("/console/login")
        answer = client.post(
            "/console/login",
            data={"user": user, "password": password, "csrf": csrf_of(form)},
            headers={"Origin": router.console_url},
        )
        assert answer.status_code == 303, answer.text
        yield client


def letter_status(folder: Path, letter_id: int) -> str:
    """The status of a dead letter in the folder's store."""
    with Store(f"sqlite:///{folder / 'state.db'}") as store:
        letter = store.get_dead_letter(letter_id)
        assert letter is not None
        return letter.status
