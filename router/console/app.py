"""The console's pages and actions under ``/console/``, served by the router's HTTP listener.

Pages read the store (and the broker, for the overview); actions go through the same code as the CLI
(router.replay.Replayer and state), audited with the signed-in operator's name. Every page
is rendered with autoescaping (dead letters hold hostile partner data) and sent with security headers;
every POST is refused with 403 unless it carries the session's CSRF token and the console's origin.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deadletter import STAGES, STATUSES, DeadLetter, DeadLetterStateError
from ops import metrics
from ops.secrets import redact
from router.broker import BrokerUnavailable
from router.config import RouterConfig
from router.console.auth import COOKIE, LOGIN_COOKIE, ConsoleAuth, Operator, csrf_ok, same_origin
from router.replay import Replayer, ReplayError, ReplayReport
from router.status import collect_status
from state import Store, StoreUnavailable

PREFIX = "/console"
PAGE_SIZE = 50
PREVIEW_ROWS = 20
MAX_FORM_BYTES = 4 * 1024 * 1024
"""A console form's largest body: an edited payload fits, a body meant to exhaust memory does not."""
MAX_LOGIN_BYTES = 16 * 1024
PARKED = "parked"
"""The reason of a letter held behind an earlier dead letter of its key: a consequence, not a failure."""
LAST_ERROR_PAGES = 10
HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
}
NO_STORE = {"cache-control": "no-store"}
FILTERS = ("route", "target", "stage", "reason", "status", "key", "since", "until")
"""The dead-letter filters a page or a bulk replay takes (``key`` is the sequence key)."""


class SecurityHeaders:
    """Adds the console's security headers to every response, and no-store to all but static assets."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        static = str(scope.get("path", "")).startswith(f"{PREFIX}/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = {**SECURITY_HEADERS, **({} if static else NO_STORE)}
                headers = [(k, v) for k, v in message.get("headers", []) if k.decode("latin-1") not in extra]
                headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class BadFilter(ValueError):
    """A filter value an operator typed that cannot be used (an unknown stage, a malformed time)."""


@dataclass(frozen=True)
class LetterFilter:
    """The dead-letter filters of a page or a bulk replay, as typed (``values``) and as the store wants."""

    values: dict[str, str]

    @classmethod
    def read(cls, source: Mapping[str, Any]) -> LetterFilter:
        return cls(
            {name: str(source[name]).strip() for name in FILTERS if str(source.get(name) or "").strip()}
        )

    def store_filters(self) -> dict[str, Any]:
        """Keyword arguments for Store.list_dead_letters; BadFilter for a value it cannot take."""
        given = dict(self.values)
        if "stage" in given and given["stage"] not in STAGES:
            raise BadFilter(f"stage {given['stage']!r} is not one of {', '.join(STAGES)}")
        if "status" in given and given["status"] not in STATUSES:
            raise BadFilter(f"status {given['status']!r} is not one of {', '.join(STATUSES)}")
        if "key" in given:
            given["sequence_key"] = given.pop("key")
        for name in ("since", "until"):
            if name in given:
                given[name] = parse_time(name, given[name])
        return given

    def query(self, **extra: Any) -> str:
        return urlencode({**self.values, **{k: v for k, v in extra.items() if v is not None}})


def parse_time(name: str, value: str) -> datetime:
    """An ISO 8601 time typed in a form; without an offset it is taken as UTC (the console shows UTC)."""
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise BadFilter(f"{name} {value!r} is not an ISO 8601 time such as 2026-11-24T09:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _pretty(value: Any) -> str:
    # ensure_ascii escapes C1 controls and bidi marks, so hostile text cannot reorder what is shown.
    return json.dumps(value, indent=2, ensure_ascii=True, sort_keys=True, default=str)


def payload_diff(old: Any, new: Any) -> list[str]:
    """The unified diff of two payloads as shown in the console (pretty JSON, sorted keys)."""
    lines = difflib.unified_diff(
        _pretty(old).splitlines(), _pretty(new).splitlines(), "before", "after", lineterm=""
    )
    return list(lines)[2:]


def _templates() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    environment.filters["pretty"] = _pretty
    environment.filters["utc"] = lambda moment: "-" if moment is None else f"{moment:%Y-%m-%d %H:%M:%S}"
    environment.filters["cell"] = lambda value: "-" if value is None or value == "" else value
    return environment


def _lag_p95(target: str) -> str:
    """The 95th percentile of event lag at ``target`` seen by this process, as a bucket's bound."""
    buckets: list[tuple[float, float]] = []
    for family in metrics.REGISTRY.collect():
        if family.name != "router_event_lag_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("target") == target:
                buckets.append((float(sample.labels["le"]), sample.value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return "-"
    bound = next(bound for bound, count in buckets if count >= 0.95 * total)
    if math.isinf(bound):
        return f"> {_duration(buckets[-2][0])}"
    return f"≤ {_duration(bound)}"


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:g} {unit}"
    return f"{seconds:g} s"


def _circuit(target: str) -> str:
    state = metrics.REGISTRY.get_sample_value("router_circuit_open", {"target": target})
    return "unknown" if state is None else ("open" if state else "closed")


class Console:
    """The console for one configuration and store; :meth:`routes` mounts it under ``/console``."""

    def __init__(self, config: RouterConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.auth = ConsoleAuth(config.console)
        self.templates = _templates()

    def routes(self) -> list[BaseRoute]:
        pages: list[BaseRoute] = [
            Route("/", self._page(self.overview), methods=["GET"]),
            Route("/login", self.login, methods=["GET", "POST"]),
            Route("/logout", self._action(self.logout), methods=["POST"]),
            Route("/letters", self._page(self.letters), methods=["GET"]),
            Route("/letters/replay", self._action(self.bulk_replay), methods=["POST"]),
            Route("/letters/{id:int}", self._page(self.letter), methods=["GET"]),
            Route("/letters/{id:int}/{verb:str}", self._action(self.act), methods=["POST"]),
            Route("/history", self._page(self.history_form), methods=["GET"]),
            Route("/history", self._action(self.history), methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        return [Mount(PREFIX, app=SecurityHeaders(Router(routes=pages)))]

    # Rendering and guards

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        operator = context.pop("operator", None)
        html = self.templates.get_template(name).render(
            prefix=PREFIX, operator=operator, path=request.url.path, **context
        )
        return Response(html, status_code=status, media_type="text/html; charset=utf-8")

    def problem(self, request: Request, operator: Operator, status: int, message: str) -> Response:
        """The problem page: what was refused or not found, with its HTTP status."""
        return self.render(request, "problem.html", status, operator=operator, message=message)

    def _page(
        self, handler: Callable[[Request, Operator], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def page(request: Request) -> Response:
            # Off the event loop: checking a Basic password runs scrypt.
            operator = await run_in_threadpool(self.auth.operator, request)
            if operator is None:
                if request.headers.get("authorization"):
                    return _refused("the credentials given are not valid for the console", 403)
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                return RedirectResponse(f"{PREFIX}/login?{urlencode({'next': target})}", status_code=303)
            return await self._safely(request, operator, handler)

        return page

    def _action(
        self, handler: Callable[[Request, Operator], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def action(request: Request) -> Response:
            operator = await run_in_threadpool(self.auth.operator, request)
            if operator is None:
                return _refused("sign in to the console first; nothing was changed", 403)
            if not same_origin(request):
                return _refused(
                    "this form was not sent from the console's own pages; nothing was changed", 403
                )
            if not _bounded(request, MAX_FORM_BYTES):
                return _refused(f"a console form is at most {MAX_FORM_BYTES} bytes, with Content-Length", 413)
            form = await request.form()
            if not csrf_ok(operator, str(form.get("csrf") or "")):
                return _refused(
                    "the form's CSRF token is missing or not this session's; reload the page", 403
                )
            return await self._safely(request, operator, handler)

        return action

    async def _safely(
        self,
        request: Request,
        operator: Operator,
        handler: Callable[[Request, Operator], Awaitable[Response]],
    ) -> Response:
        try:
            return await handler(request, operator)
        except (StoreUnavailable, BrokerUnavailable) as error:
            return self.problem(request, operator, 503, redact(str(error)))

    # Sign-in

    async def login(self, request: Request) -> Response:
        nonce, token = self.auth.login_csrf(request)
        next_page = request.query_params.get("next") or f"{PREFIX}/"
        if not next_page.startswith(f"{PREFIX}/") or next_page.startswith("//"):
            next_page = f"{PREFIX}/"
        problem = None
        status = 200
        if request.method == "POST":
            if not _bounded(request, MAX_LOGIN_BYTES):
                return _refused(
                    f"a sign-in form is at most {MAX_LOGIN_BYTES} bytes, with Content-Length", 413
                )
            form = await request.form()
            name, password = str(form.get("user") or ""), str(form.get("password") or "")
            if not same_origin(request) or not self.auth.login_csrf_ok(request, str(form.get("csrf") or "")):
                return _refused("this sign-in form was not sent from the console's own page; reload it", 403)
            if await run_in_threadpool(self.auth.check_password, name, password):
                response = RedirectResponse(next_page, status_code=303)
                response.set_cookie(
                    COOKIE,
                    self.auth.session_cookie(name),
                    max_age=int(self.config.console.session_ttl),
                    path=PREFIX,
                    httponly=True,
                    samesite="strict",
                    secure=self.config.console.secure_cookie,
                )
                response.delete_cookie(LOGIN_COOKIE, path=PREFIX)
                return response
            problem, status = "unknown user or wrong password", 401
        response = self.render(
            request,
            "login.html",
            status,
            csrf=token,
            next_page=next_page,
            problem=problem,
            passwords=bool(self.config.console.users),
        )
        response.set_cookie(
            LOGIN_COOKIE,
            nonce,
            path=PREFIX,
            httponly=True,
            samesite="strict",
            secure=self.config.console.secure_cookie,
        )
        return response

    async def logout(self, request: Request, operator: Operator) -> Response:
        response = RedirectResponse(f"{PREFIX}/login", status_code=303)
        response.delete_cookie(COOKIE, path=PREFIX)
        return response

    # Pages

    async def overview(self, request: Request, operator: Operator) -> Response:
        report = await run_in_threadpool(collect_status, self.config)
        last_errors = await run_in_threadpool(self._last_errors)
        for target in report["targets"]:
            target["circuit"] = _circuit(target["name"])
            target["lag_p95"] = _lag_p95(target["name"])
            target["last_error"] = last_errors.get(target["name"])
        return self.render(request, "overview.html", operator=operator, report=report)

    def _last_errors(self) -> dict[str, DeadLetter]:
        """Each target's newest failure: its newest letter that is not merely parked behind another."""
        latest: dict[str, DeadLetter] = {}
        for name in self.config.targets:
            after = None
            for _ in range(LAST_ERROR_PAGES):
                page = self.store.list_dead_letters(
                    target=name, newest_first=True, after_id=after, limit=PAGE_SIZE
                )
                failure = next((letter for letter in page if letter.reason != PARKED), None)
                if failure is not None or len(page) < PAGE_SIZE:
                    if failure is not None:
                        latest[name] = failure
                    break
                after = page[-1].id
        return latest

    async def letters(self, request: Request, operator: Operator) -> Response:
        chosen = LetterFilter.read(request.query_params)
        after = _int(request.query_params.get("after"))
        try:
            filters = chosen.store_filters()
        except BadFilter as error:
            return self._letters_page(request, operator, chosen, [], 0, None, str(error), 400)

        def read() -> tuple[list[DeadLetter], int]:
            page = self.store.list_dead_letters(after_id=after, limit=PAGE_SIZE + 1, **filters)
            return page, self.store.count_dead_letters(**filters)

        page, total = await run_in_threadpool(read)
        more = len(page) > PAGE_SIZE
        page = page[:PAGE_SIZE]
        next_after = page[-1].id if more else None
        return self._letters_page(request, operator, chosen, page, total, next_after, None, 200, after=after)

    def _letters_page(
        self,
        request: Request,
        operator: Operator,
        chosen: LetterFilter,
        page: list[DeadLetter],
        total: int,
        next_after: int | None,
        problem: str | None,
        status: int,
        after: int | None = None,
    ) -> Response:
        return self.render(
            request,
            "letters.html",
            status,
            operator=operator,
            letters=page,
            total=total,
            pages=max(1, math.ceil(total / PAGE_SIZE)),
            filters=chosen,
            after=after,
            next_query=chosen.query(after=next_after) if next_after else None,
            first_query=chosen.query(),
            problem=problem,
            options=self._options(),
        )

    def _options(self) -> dict[str, list[str]]:
        return {
            "route": [route.name for route in self.config.routes],
            "target": list(self.config.targets),
            "stage": list(STAGES),
            "status": list(STATUSES),
        }

    async def letter(
        self,
        request: Request,
        operator: Operator,
        *,
        notice: str | None = None,
        problem: str | None = None,
        status: int = 200,
        draft: str | None = None,
    ) -> Response:
        letter_id = int(request.path_params["id"])
        letter = await run_in_threadpool(self.store.get_dead_letter, letter_id)
        if letter is None:
            return self.problem(request, operator, 404, f"dead letter {letter_id} does not exist")
        history = await run_in_threadpool(self.store.list_audit, f"deadletter:{letter_id}")
        edits = [
            {
                "at": entry.at,
                "actor": entry.actor,
                "diff": payload_diff(entry.detail.get("old_payload"), entry.detail.get("new_payload")),
            }
            for entry in history
            if entry.action == "deadletter.edited" and entry.detail
        ]
        return self.render(
            request,
            "letter.html",
            status,
            operator=operator,
            letter=letter,
            history=history,
            edits=edits,
            notice=notice,
            problem=problem,
            draft=draft if draft is not None else _pretty(letter.payload),
        )

    # Actions

    async def act(self, request: Request, operator: Operator) -> Response:
        """replay, edit or discard one letter; a lost race or a refused edit is shown on the letter's page."""
        letter_id, verb = int(request.path_params["id"]), request.path_params["verb"]
        form = await request.form()
        reason = str(form.get("reason") or "").strip()
        letter = await run_in_threadpool(self.store.get_dead_letter, letter_id)
        if letter is None:
            return self.problem(request, operator, 404, f"dead letter {letter_id} does not exist")
        replayer = Replayer(self.config, self.store, operator.name)
        draft = None
        try:
            if verb == "replay":
                report = await run_in_threadpool(
                    lambda: replayer.replay_letters([letter], reason=reason or "replayed from the console")
                )
            elif verb == "discard":
                if not reason:
                    raise ReplayError("say why the letter is discarded: a reason is required")
                report = await run_in_threadpool(lambda: replayer.discard([letter], reason=reason))
            elif verb == "edit":
                draft = str(form.get("payload") or "")
                report = await run_in_threadpool(
                    lambda: replayer.edit_text(
                        letter, draft, reason=reason or "payload corrected in the console"
                    )
                )
            else:
                return self.problem(request, operator, 404, f"no action {verb!r}")
        except ReplayError as error:
            return await self.letter(
                request, operator, problem=f"nothing changed: {error}", status=400, draft=draft
            )
        except DeadLetterStateError as error:
            message = f"dead letter {letter_id} was {error.change} meanwhile; nothing changed"
            return await self.letter(request, operator, problem=message, status=409)
        done = {"replay": "replayed", "discard": "discarded", "edit": "edited and replayed"}[verb]
        return await self._reported(request, operator, report, done)

    async def _reported(
        self, request: Request, operator: Operator, report: ReplayReport, done: str
    ) -> Response:
        if report.skipped:
            problem = "; ".join(
                f"dead letter {i} not {done}: {why}" for i, why in sorted(report.skipped.items())
            )
            return await self.letter(request, operator, problem=problem, status=409)
        return await self.letter(request, operator, notice=f"dead letter {request.path_params['id']} {done}")

    async def bulk_replay(self, request: Request, operator: Operator) -> Response:
        """A filtered replay: the first post previews (count and first rows), a confirmed one replays."""
        form = await request.form()
        chosen = LetterFilter.read(form)
        replayer = Replayer(self.config, self.store, operator.name)
        try:
            filters = {k: v for k, v in chosen.store_filters().items() if k != "status"}
        except BadFilter as error:
            return self.problem(request, operator, 400, str(error))
        if not filters:
            return self.problem(
                request,
                operator,
                400,
                "choose at least one filter (route, target, key...) before replaying in bulk",
            )
        letters = await run_in_threadpool(lambda: replayer.replayable(**filters))
        context = {
            "operator": operator,
            "filters": chosen,
            "count": len(letters),
            "rows": letters[:PREVIEW_ROWS],
        }
        if form.get("confirm") != "yes":
            return self.render(request, "bulk.html", preview=True, report=None, **context)
        # "why" (audited), not "reason": that is a filter on the letters' reason code.
        reason = str(form.get("why") or "").strip() or "replayed in bulk from the console"
        try:
            report = await run_in_threadpool(lambda: replayer.replay_letters(letters, reason=reason))
        except ReplayError as error:
            return self.problem(request, operator, 400, f"nothing replayed: {error}")
        status = 409 if report.skipped else 200
        return self.render(request, "bulk.html", status, preview=False, report=report, **context)

    async def history_form(self, request: Request, operator: Operator) -> Response:
        return self.render(
            request,
            "history.html",
            operator=operator,
            values={},
            preview=None,
            done=None,
            problem=None,
            targets=list(self.config.targets),
        )

    async def history(self, request: Request, operator: Operator) -> Response:
        """History replay to a restored target: preview (count and first events), then a confirmed re-send."""
        form = await request.form()
        values = {name: str(form.get(name) or "").strip() for name in ("target", "since", "until", "key")}
        replayer = Replayer(self.config, self.store, operator.name)
        page = {"operator": operator, "values": values, "targets": list(self.config.targets)}
        try:
            if not values["since"]:
                raise BadFilter("since is required: the time the target's backup was taken")
            since = parse_time("since", values["since"])
            until = parse_time("until", values["until"]) if values["until"] else None
            key = values["key"] or None
            if form.get("confirm") != "yes":
                entries = await run_in_threadpool(
                    lambda: replayer.history(values["target"], since=since, until=until, sequence_key=key)
                )
                preview = {"count": len(entries), "rows": entries[:PREVIEW_ROWS]}
                return self.render(request, "history.html", preview=preview, done=None, problem=None, **page)
            count = await run_in_threadpool(
                lambda: replayer.replay_history(values["target"], since=since, until=until, sequence_key=key)
            )
        except (BadFilter, ReplayError) as error:
            return self.render(
                request, "history.html", 400, preview=None, done=None, problem=str(error), **page
            )
        return self.render(request, "history.html", preview=None, done=count, problem=None, **page)


def _bounded(request: Request, limit: int) -> bool:
    """Whether the request says its body's length and it is within ``limit`` (read before any form)."""
    length = request.headers.get("content-length", "")
    return length.isdigit() and int(length) <= limit


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def _refused(message: str, status: int) -> Response:
    return PlainTextResponse(f"{status} refused: {message}\n", status_code=status)


def closed_console_routes(why: str) -> list[BaseRoute]:
    """``/console`` answering 404 with ``why`` (not configured, or served on ``http.console_listen``)."""

    async def closed(_: Request) -> Response:
        return PlainTextResponse(f"404 no console here: {why}\n", status_code=404)

    return [
        Route(PREFIX, closed),
        Mount(PREFIX, routes=[Route("/{rest:path}", closed, methods=["GET", "POST", "HEAD"])]),
    ]


NOT_CONFIGURED = (
    "the console is not configured; set console.users (with `router console hash-password`), console.token "
    "or console.trusted_header in routes.yaml"
)
ELSEWHERE = "the console is served on http.console_listen, not on this listener"
