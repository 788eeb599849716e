"""The console's access control on a real loopback listener: closed unless configured, sign-in, CSRF and
Origin checks on every form, bearer token and trusted proxy header, a listener of its own, safe output.

The router runs in-process (HTTP stage only, memory:// broker); requests are real HTTP over loopback.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ops.secrets import redact
from router.console.passwords import hash_password
from state import Store
from tests.integration.console_harness import (
    HOSTILE,
    PASSWORD,
    Running,
    add_letter,
    console_config,
    csrf_of,
    letter_status,
    signed_in,
)


@pytest.fixture
def running(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Running]:
    marker = request.node.get_closest_marker("console")
    console, http = (
        (marker.args[0], marker.kwargs) if marker else ({"users": {"alice": hash_password(PASSWORD)}}, {})
    )
    router = Running(console_config(tmp_path, console, **http))
    try:
        yield router
    finally:
        router.stop()


@pytest.mark.console(None)
def test_without_a_console_section_the_console_is_closed_and_says_why(
    running: Running, tmp_path: Path
) -> None:
    letter_id = add_letter(tmp_path)
    with running.client() as client:
        for path in ("/console", "/console/", "/console/letters"):
            answer = client.get(path)
            assert answer.status_code == 404 and "console is not configured" in answer.text
        refused = client.post(f"/console/letters/{letter_id}/discard", data={"reason": "x"})
        assert refused.status_code == 404
        assert client.get("/healthz").status_code == 200
    assert letter_status(tmp_path, letter_id) == "dead"


def test_unauthenticated_requests_are_sent_to_sign_in_or_refused(running: Running, tmp_path: Path) -> None:
    letter_id = add_letter(tmp_path)
    with running.client() as client:
        page = client.get(f"/console/letters/{letter_id}")
        assert page.status_code == 303 and page.headers["location"].startswith("/console/login?next=")
        assert HOSTILE not in page.text and "e-1" not in page.text
        post = client.post(f"/console/letters/{letter_id}/discard", data={"reason": "no"})
        assert post.status_code == 403 and "sign in" in post.text
        wrong = client.post(
            "/console/login",
            data={"user": "alice", "password": "guess", "csrf": csrf_of(client.get("/console/login"))},
            headers={"Origin": running.console_url},
        )
        assert wrong.status_code == 401 and "wrong password" in wrong.text
        basic = client.get("/console/", auth=("alice", "guess"))
        assert basic.status_code == 403
    assert letter_status(tmp_path, letter_id) == "dead"


def test_a_cross_site_post_or_one_without_the_sessions_csrf_token_is_refused(
    running: Running, tmp_path: Path
) -> None:
    letter_id = add_letter(tmp_path)
    with signed_in(running) as client:
        token = csrf_of(client.get(f"/console/letters/{letter_id}"))
        evil = client.post(
            f"/console/letters/{letter_id}/discard",
            data={"reason": "evil", "csrf": token},
            headers={"Origin": "http://127.0.0.1:1"},
        )
        assert evil.status_code == 403 and "not sent from the console" in evil.text
        by_referer = client.post(
            f"/console/letters/{letter_id}/discard",
            data={"reason": "evil", "csrf": token},
            headers={"Referer": "http://attacker.example/page"},
        )
        assert by_referer.status_code == 403
        tokenless = client.post(
            f"/console/letters/{letter_id}/discard",
            data={"reason": "evil"},
            headers={"Origin": running.console_url},
        )
        assert tokenless.status_code == 403 and "CSRF" in tokenless.text
        assert letter_status(tmp_path, letter_id) == "dead"
        done = client.post(
            f"/console/letters/{letter_id}/discard",
            data={"reason": "duplicate of a corrected order", "csrf": token},
            headers={"Origin": running.console_url},
        )
        assert done.status_code == 200 and "discarded" in done.text
    assert letter_status(tmp_path, letter_id) == "discarded"
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        [entry] = store.list_audit(f"deadletter:{letter_id}")
    assert (
        entry.actor == "alice" and entry.detail and entry.detail["reason"] == "duplicate of a corrected order"
    )


def test_pages_escape_hostile_data_and_carry_security_headers(running: Running, tmp_path: Path) -> None:
    letter_id = add_letter(tmp_path)
    with signed_in(running) as client:
        for path in (f"/console/letters/{letter_id}", "/console/letters", "/console/"):
            page = client.get(path)
            assert page.status_code == 200, page.text
            assert "<script>alert" not in page.text and "<img src=x" not in page.text
            assert page.headers["content-security-policy"].startswith("default-src 'self'")
            assert page.headers["x-frame-options"] == "DENY"
            assert page.headers["cache-control"] == "no-store"
        assert "&lt;script&gt;alert" in client.get(f"/console/letters/{letter_id}").text
    with running.client() as client:
        form = client.get("/console/login")
        signed = client.post(
            "/console/login",
            data={"user": "alice", "password": PASSWORD, "csrf": csrf_of(form)},
            headers={"Origin": running.console_url},
        )
    set_cookie = signed.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie and "path=/console" in set_cookie


def test_another_operators_change_is_shown_as_a_conflict_not_an_error(
    running: Running, tmp_path: Path
) -> None:
    letter_id = add_letter(tmp_path)
    with signed_in(running) as client:
        token = csrf_of(client.get(f"/console/letters/{letter_id}"))
        with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
            store.set_status(letter_id, "discarded", actor="bob", reason="not ours")
        answer = client.post(
            f"/console/letters/{letter_id}/replay",
            data={"csrf": token, "reason": "retry"},
            headers={"Origin": running.console_url},
        )
    assert answer.status_code == 409
    assert "not replayed" in answer.text and "discarded by bob" in answer.text
    assert letter_status(tmp_path, letter_id) == "discarded"


def test_an_edit_that_is_not_valid_is_refused_and_nothing_changes(running: Running, tmp_path: Path) -> None:
    letter_id = add_letter(tmp_path, payload={"event_id": "e-1", "sequence_key": "k-1", "type": "sale"})
    with signed_in(running) as client:
        token = csrf_of(client.get(f"/console/letters/{letter_id}"))
        for payload, expected in (
            ('{"event_id": "e-1",', "not JSON (line 1"),
            ('{"event_id": "e-1", "sequence_key": "k-1", "type": "sale"}', "the edited event is not valid"),
            ('{"event_id": "e-2", "sequence_key": "k-1"}', "event_id must stay"),
        ):
            answer = client.post(
                f"/console/letters/{letter_id}/edit",
                data={"csrf": token, "payload": payload},
                headers={"Origin": running.console_url},
            )
            assert answer.status_code == 400 and expected in answer.text, answer.text
    assert letter_status(tmp_path, letter_id) == "dead"


@pytest.mark.console({"token": "console-token-0123456789"})
def test_a_bearer_token_signs_in_as_api_token_and_is_masked(running: Running, tmp_path: Path) -> None:
    letter_id = add_letter(tmp_path)
    assert redact("token is console-token-0123456789") == "token is ***"
    with running.client(headers={"Authorization": "Bearer console-token-0123456789"}) as client:
        page = client.get(f"/console/letters/{letter_id}")
        assert page.status_code == 200
        no_csrf = client.post(f"/console/letters/{letter_id}/replay", data={})
        assert no_csrf.status_code == 403
        done = client.post(f"/console/letters/{letter_id}/replay", data={"csrf": csrf_of(page)})
        assert done.status_code == 200, done.text
    with running.client(headers={"Authorization": "Bearer wrong"}) as client:
        assert client.get("/console/").status_code == 403
    with Store(f"sqlite:///{tmp_path / 'state.db'}") as store:
        assert [entry.actor for entry in store.list_audit(f"deadletter:{letter_id}")] == ["api-token"]


@pytest.mark.console({"trusted_header": "X-Remote-User"}, console_listen="127.0.0.1:0")
def test_a_trusted_proxy_header_names_the_operator_when_configured(running: Running) -> None:
    with running.client() as client:
        assert client.get("/console/", headers={"X-Remote-User": "carol"}).status_code == 200
        assert client.get("/console/").status_code == 303


def test_a_proxy_header_is_ignored_unless_configured(running: Running) -> None:
    with running.client() as client:
        assert client.get("/console/", headers={"X-Remote-User": "carol"}).status_code == 303


@pytest.mark.console({"users": {"alice": hash_password(PASSWORD)}}, console_listen="127.0.0.1:0")
def test_console_listen_keeps_the_console_off_the_webhook_port(running: Running) -> None:
    assert running.console_url != running.url
    with httpx.Client(base_url=running.url) as partners:
        answer = partners.get("/console/login")
        assert answer.status_code == 404 and "http.console_listen" in answer.text
        assert partners.get("/healthz").status_code == 200
    with signed_in(running) as client:
        assert client.get("/console/").status_code == 200


def test_an_oversized_form_is_refused_before_it_is_read(running: Running, tmp_path: Path) -> None:
    letter_id = add_letter(tmp_path)
    with running.client() as client:
        login = client.post(
            "/console/login", content=b"user=" + b"a" * 100_000, headers={"Origin": running.console_url}
        )
        assert login.status_code == 413
    with signed_in(running) as client:
        huge = client.post(
            f"/console/letters/{letter_id}/edit",
            content=b"payload=" + b"x" * (5 * 1024 * 1024),
            headers={"Origin": running.console_url, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert huge.status_code == 413
    assert letter_status(tmp_path, letter_id) == "dead"
