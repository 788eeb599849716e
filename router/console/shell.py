"""The console's shell: rendering, the sign-in page, and the guards every page and action passes.

Every page is rendered with autoescaping (dead letters hold hostile partner data) and sent with
security headers; a page needs a signed-in operator, and every POST is refused with 403 unless it
carries the session's CSRF token and the console's origin. A store or broker that cannot be reached
is a 503 problem page.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ops.secrets import redact
from router.broker import BrokerUnavailable
from router.config import RouterConfig
from router.console.auth import COOKIE, LOGIN_COOKIE, ConsoleAuth, Operator, csrf_ok, same_origin
from router.console.guards import PREFIX, bounded, refused
from router.console.views import templates
from state import Store, StoreUnavailable

MAX_FORM_BYTES = 4 * 1024 * 1024
"""A console form's largest body: an edited payload fits, a body meant to exhaust memory does not."""
MAX_LOGIN_BYTES = 16 * 1024

Handler = Callable[[Request, Operator], Awaitable[Response]]
"""A page or action, called with the signed-in operator."""


class ConsoleShell:
    """What the console's pages stand on: the configuration, the store, sign-in and rendering."""

    def __init__(self, config: RouterConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.auth = ConsoleAuth(config.console)
        self.templates = templates()

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

    def _page(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` as a GET page: an operator not signed in is sent to the sign-in page."""
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

    def _action(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` as a POST action: signed in, same origin, a bounded form with the CSRF token."""
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

    async def _safely(self, request: Request, operator: Operator, handler: Handler) -> Response:
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
