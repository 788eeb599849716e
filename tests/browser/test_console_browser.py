"""The console driven in a real headless Chromium: a dead letter caused by a real 422 from a real loopback
target is found, edited, replayed and reaches the target in order for its key (the real `router run` on
the real RabbitMQ); an unauthenticated request and a cross-site form post are refused.

Set CONSOLE_SCREENSHOTS to a folder to keep screenshots of the pages the test goes through.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import Select, WebDriverWait

from router.console.passwords import hash_password
from router.simulated import SimulatedTarget, TargetBehaviour
from state import Store
from tests.integration.console_harness import PASSWORD, Running, add_letter, console_config
from tests.integration.harness import (
    RouterProcess,
    in_order_per_key,
    wait_until,
    write_config,
    write_pos_file,
)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REFUSED = "T0000010"
"""The sale the ERP refuses (422) until an operator corrects its quantity; rows 121 and 232 share its key."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _shot(browser: WebDriver, name: str) -> None:
    """The whole page as a PNG in $CONSOLE_SCREENSHOTS (nothing without it)."""
    folder = os.environ.get("CONSOLE_SCREENSHOTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    size = browser.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    page = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": page}
    )
    (Path(folder) / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))


def _wait(browser: WebDriver, text: str, timeout: float = 20) -> None:
    try:
        WebDriverWait(browser, timeout).until(
            expected_conditions.text_to_be_present_in_element((By.TAG_NAME, "body"), text)
        )
    except TimeoutException:
        body = browser.find_element(By.TAG_NAME, "body").text
        where = f"{text!r} not on {browser.current_url} after {timeout}s"
        raise AssertionError(f"{where}; the page says:\n{body}") from None


def _sign_in(browser: WebDriver, base: str, then: str) -> None:
    browser.get(f"{base}{then}")
    _wait(browser, "Sign in")
    assert "/console/login" in browser.current_url
    browser.find_element(By.NAME, "user").send_keys("alice")
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
    WebDriverWait(browser, 20).until(lambda b: "/console/login" not in b.current_url)


def test_a_422_dead_letter_is_found_edited_and_replayed_in_order_in_the_browser(
    chrome: WebDriver, tmp_path: Path, rabbitmq_url: str, rabbitmq_namespace: str
) -> None:
    refused_quantity: dict[str, Any] = {}

    def refuse(event: Any) -> bool:
        # The ERP refuses the sale until its quantity is corrected (whatever it first was).
        if event.get("transaction_id") != REFUSED:
            return False
        return refused_quantity.setdefault("quantity", event.get("quantity")) == event.get("quantity")

    port = _free_port()
    with SimulatedTarget("erp", TargetBehaviour(reject=refuse)) as erp:
        config = write_config(
            tmp_path, broker_url=rabbitmq_url, prefix=rabbitmq_namespace, targets={"erp": erp.url}
        )
        document = json.loads(config.read_text())
        document["http"] = {"listen": f"127.0.0.1:{port}"}
        document["console"] = {"users": {"alice": hash_password(PASSWORD)}}
        config.write_text(json.dumps(document))
        base = f"http://127.0.0.1:{port}"
        write_pos_file(tmp_path / "inbox" / "pos-0200.csv", 300)
        with RouterProcess(config) as router, Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
            wait_until(lambda: len(erp.events) >= 297, 90, "every event of the other keys")
            wait_until(lambda: len(store.list_dead_letters(status="parked")) == 2, 30, "2 events parked")
            [dead] = store.list_dead_letters(status="dead")
            assert "HTTP 422" in dead.detail and dead.payload["transaction_id"] == REFUSED
            key = dead.sequence_key

            # Unauthenticated: the letter's page sends the browser to sign in and shows none of its data.
            browser = chrome
            browser.get(f"{base}/console/letters/{dead.id}")
            _wait(browser, "Sign in")
            assert REFUSED not in browser.page_source
            _sign_in(browser, base, "/console/letters")
            _shot(browser, "1-login-then-letters")

            # Find it: filter the dead letters of the ERP by status.
            Select(browser.find_element(By.NAME, "target")).select_by_visible_text("erp")
            Select(browser.find_element(By.NAME, "status")).select_by_visible_text("dead")
            browser.find_element(By.CSS_SELECTOR, "form.filters button").click()
            _wait(browser, "1 matching")
            browser.find_element(By.LINK_TEXT, f"#{dead.id}").click()
            _wait(browser, f"Dead letter #{dead.id}")
            assert "HTTP 422" in browser.find_element(By.CSS_SELECTOR, "pre.answer").text

            # Edit the quantity; the console validates the event, stores it and replays the letter.
            area = browser.find_element(By.NAME, "payload")
            payload = json.loads(area.get_attribute("value") or "")
            original = payload["quantity"]
            payload["quantity"] = str(int(original) + 1)
            area.clear()
            area.send_keys(json.dumps(payload))
            browser.find_element(By.CSS_SELECTOR, "form.edit input[name=reason]").send_keys(
                "ERP max per line"
            )
            browser.find_element(By.CSS_SELECTOR, "form.edit button").click()
            _wait(browser, "edited and replayed")
            _shot(browser, "2-letter-edited-and-replayed")
            assert "Edited by alice" in browser.page_source

            wait_until(lambda: len(erp.events) >= 300, 60, "the corrected sale and the two parked behind it")
            wait_until(lambda: store.list_dead_letters(status="dead") == [], 30, "the letter to leave dead")
            browser.get(f"{base}/console/")
            _wait(browser, "Targets")
            _shot(browser, "3-overview")
            assert router.terminate() == 0, router.output()
            statuses = [letter.status for letter in store.list_dead_letters()]
            actors = {entry.actor for entry in store.list_audit(f"deadletter:{dead.id}")}

    released = [event for event in erp.events if event["sequence_key"] == key]
    assert [event["transaction_id"] for event in released] == [REFUSED, "T0000121", "T0000232"]
    assert released[0]["quantity"] != refused_quantity["quantity"]
    assert len({event["event_id"] for event in erp.events}) == 300 == len(erp.events)
    assert in_order_per_key(erp.events)
    assert statuses == ["replayed", "replayed", "replayed"]
    assert "alice" in actors


class _Attacker(ThreadingHTTPServer):
    """Another origin on loopback serving a page that posts a form to the console as soon as it loads."""

    def __init__(self, action: str) -> None:
        page = (
            "<!doctype html><html><body><form id=f method=post action='" + action + "'>"
            "<input name=reason value='pwned'><input name=csrf value='guess'></form>"
            "<script>document.getElementById('f').submit()</script></body></html>"
        ).encode()

        class Page(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *_: Any) -> None:
                return

        super().__init__(("127.0.0.1", 0), Page)
        self.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server_address[1]}/"

    def __enter__(self) -> _Attacker:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *_: object) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def console(tmp_path: Path) -> Iterator[Running]:
    router = Running(console_config(tmp_path, {"users": {"alice": hash_password(PASSWORD)}}))
    try:
        yield router
    finally:
        router.stop()


def test_an_unauthenticated_request_and_a_cross_site_form_post_are_refused(
    chrome: WebDriver, console: Running, tmp_path: Path
) -> None:
    letter_id = add_letter(tmp_path)
    action = f"{console.console_url}/console/letters/{letter_id}/discard"
    unauthenticated = httpx.post(action, data={"reason": "x"}, timeout=10)
    assert unauthenticated.status_code == 403

    with _Attacker(action) as attacker:
        chrome.get(attacker.url)  # not signed in: no session to ride on
        _wait(chrome, "403 refused")
        assert "sign in" in chrome.find_element(By.TAG_NAME, "body").text

        _sign_in(chrome, console.console_url, "/console/")
        chrome.get(attacker.url)  # signed in, the cookie goes along (same site): Origin and CSRF refuse it
        _wait(chrome, "403 refused")
        assert "not sent from the console" in chrome.find_element(By.TAG_NAME, "body").text

    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        letter = store.get_dead_letter(letter_id)
        assert letter is not None and letter.status == "dead"
        assert store.list_audit(f"deadletter:{letter_id}") == []
