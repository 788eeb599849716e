"""The console's pages and actions under ``/console/``, served by the router's HTTP listener.

Pages read the store (and the broker, for the overview); actions go through the same code as the CLI
(router.replay.Replayer, router.history_replay.HistoryReplayer and state), audited with the signed-in
operator's name. Rendering, sign-in and the guards every page and action passes are
:mod:`router.console.shell`'s.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.staticfiles import StaticFiles

from deadletter import STAGES, STATUSES, DeadLetter, DeadLetterStateError
from router.console.auth import Operator
from router.console.filters import BadFilter, LetterFilter, parse_time
from router.console.guards import PREFIX, SecurityHeaders
from router.console.shell import ConsoleShell
from router.console.views import HERE, circuit, lag_p95, payload_diff, pretty
from router.history_replay import HistoryReplayer
from router.replay import Replayer, ReplayError, ReplayReport
from router.status import collect_status

PAGE_SIZE = 50
PREVIEW_ROWS = 20
PARKED = "parked"
"""The reason of a letter held behind an earlier dead letter of its key: a consequence, not a failure."""
LAST_ERROR_PAGES = 10


class Console(ConsoleShell):
    """The console for one configuration and store; :meth:`routes` mounts it under ``/console``."""

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
        replayer = HistoryReplayer(self.config, self.store, operator.name)
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
