"""The console's pages and actions under ``/console/``, served by the router's HTTP listener.

Pages read the store (and the broker, for the overview); actions go through the same code as the CLI
(router.replay.Replayer and state), audited with the signed-in operator's name. Every page
is rendered with autoescaping (dead letters hold hostile partner data) and sent with security headers;
every POST is refused with 403 unless it carries the session's CSRF token and the console's origin.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles

from deadletter import STAGES, STATUSES, DeadLetter, DeadLetterStateError
from ops.secrets import redact
from router.broker import BrokerUnavailable
from router.config import RouterConfig
from router.console.auth import COOKIE, LOGIN_COOKIE, ConsoleAuth, Operator, csrf_ok, same_origin
from router.console.filters import BadFilter, LetterFilter, parse_time
from router.console.guards import PREFIX, SecurityHeaders, bounded, refused
from router.console.views import HERE, circuit, lag_p95, payload_diff, pretty, templates
from router.replay import Replayer, ReplayError, ReplayReport
from router.status import collect_status
from state import Store, StoreUnavailable

PAGE_SIZE = 50
PREVIEW_ROWS = 20
MAX_FORM_BYTES = 4 * 1024 * 1024
"""A console form's largest body: an edited payload fits, a body meant to exhaust memory does not."""
MAX_LOGIN_BYTES = 16 * 1024
PARKED = "parked"
"""The reason of a letter held behind an earlier dead letter of its key: a consequence, not a failure."""
LAST_ERROR_PAGES = 10


class Console:
    """The console for one configuration and store; :meth:`routes` mounts it under ``/console``."""

    def __init__(self, config: RouterConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.auth = ConsoleAuth(config.console)
        self.templates = templates()

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
                    return refused("the credentials given are not valid for the console", 403)
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
                return refused("sign in to the console first; nothing was changed", 403)
            if not same_origin(request):
                return refused(
                    "this form was not sent from the console's own pages; nothing was changed", 403
                )
            if not bounded(request, MAX_FORM_BYTES):
                return refused(f"a console form is at most {MAX_FORM_BYTES} bytes, with Content-Length", 413)
            form = await request.form()
            if not csrf_ok(operator, str(form.get("csrf") or "")):
                return refused("the form's CSRF token is missing or not this session's; reload the page", 403)
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
            if not bounded(request, MAX_LOGIN_BYTES):
                return refused(f"a sign-in form is at most {MAX_LOGIN_BYTES} bytes, with Content-Length", 413)
            form = await request.form()
            name, password = str(form.get("user") or ""), str(form.get("password") or "")
            if not same_origin(request) or not self.auth.login_csrf_ok(request, str(form.get("csrf") or "")):
                return refused("this sign-in form was not sent from the console's own page; reload it", 403)
            if await run_in_threadpool(self.auth.check_password, name, password):
                redirect = RedirectResponse(next_page, status_code=303)
                redirect.set_cookie(
                    COOKIE,
                    self.auth.session_cookie(name),
                    max_age=int(self.config.console.session_ttl),
                    path=PREFIX,
                    httponly=True,
                    samesite="strict",
                    secure=self.config.console.secure_cookie,
                )
                redirect.delete_cookie(LOGIN_COOKIE, path=PREFIX)
                return redirect
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
            target["circuit"] = circuit(target["name"])
            target["lag_p95"] = lag_p95(target["name"])
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
            draft=draft if draft is not None else pretty(letter.payload),
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
        context: dict[str, Any] = {
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
        page: dict[str, Any] = {"operator": operator, "values": values, "targets": list(self.config.targets)}
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


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


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
