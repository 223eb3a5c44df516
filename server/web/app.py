"""The dashboard's HTTP routes (Starlette + Jinja2): pages, report files, login and operator actions.

Every page is server-rendered HTML; its `#live` part re-polls itself with htmx (`hx-select`), so
new reports and state changes appear without a reload. Pages are read-only for everyone; the
POST routes act only for a logged-in operator with the form's CSRF token (server/web/auth.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from server.gate import format_figure
from server.registry import Registry, RegistryError
from server.reports import LATENCY_PNG, REPORT_JSON, draw_missing_plot
from server.rollout import RolloutManager
from server.web import views
from server.web.actions import ActionError, Actions
from server.web.auth import SESSION_COOKIE, SESSION_TTL_S, Session, Sessions, csrf_ok, same_origin

_LOGGER = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SECURITY_HEADERS = {
    # Only our own scripts, styles and images: no inline script, no CDN, no framing.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}


@dataclass(frozen=True)
class DashboardConfig:
    """What the dashboard serves and who may act.

    `token`: the operator token (None: nobody can log in, the dashboard is read-only).
    `search_paths`: compression search outputs (search.json or its folder) for the Models page.
    `allowed_hosts`: Host header values accepted (guards a loopback dashboard against DNS rebinding).
    """

    token: str | None = None
    search_paths: tuple[Path, ...] = ()
    poll_s: float = 2.0
    fleet_cache_s: float = 1.0
    allowed_hosts: tuple[str, ...] = ("*",)
    secure_cookie: bool = False


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0.0, time.time() - ts)
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.0f} h ago"
    return f"{s / 86400:.0f} d ago"


def _num(value: Any, spec: str = ".3g", unit: str = "") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else str(value)
    return f"{value:{spec}}{unit}"


def _size(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(when=_when, ago=_ago, num=_num, size=_size, figure=format_figure)
    return env


def create_app(registry: Registry, server: Any = None, config: DashboardConfig | None = None) -> Starlette:
    """The dashboard for `registry`; operator actions need `server` (a started EdgeGuideServer) and a token."""
    config = config or DashboardConfig()
    env = _templates()
    sessions = Sessions(config.token)
    fleet = views.FleetCache(registry, config.fleet_cache_s)
    actions = Actions(server) if server is not None else None
    rollouts = server.rollouts if server is not None else RolloutManager(registry, None)  # type: ignore[arg-type]

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(SESSION_COOKIE))

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = session_of(request)
        flash = ""
        if session is not None and session.flash:
            flash, session.flash = session.flash, ""
        html = env.get_template(name).render(
            request=request, operator=session is not None, csrf=session.csrf if session else "",
            can_act=actions is not None and sessions.enabled, login_possible=sessions.enabled,
            flash=flash, poll_ms=int(config.poll_s * 1000), path=request.url.path,
            charts=name in ("deployment.html", "models.html"),
            qs=str(request.url.query), **context)
        return HTMLResponse(html, status_code=status, headers={"Cache-Control": "no-store"})

    def not_found(request: Request, what: str) -> HTMLResponse:
        return render(request, "error.html", status=404, title="Not found", message=what)

    async def index(request: Request) -> Response:
        return RedirectResponse("/fleet", status_code=303)

    async def fleet_page(request: Request) -> Response:
        query = views.FleetQuery.from_params(request.query_params)
        rows = await run_in_threadpool(fleet.rows)
        page = views.fleet_page(rows, query)
        return render(request, "fleet.html", title="Fleet", page=page, query=query, sort_keys=views.SORT_KEYS,
                      page_sizes=views.PAGE_SIZES)

    async def device_page(request: Request) -> Response:
        device_id = request.path_params["device_id"]
        device = await run_in_threadpool(registry.find_device, device_id)
        if device is None:
            return not_found(request, f"device {device_id!r} has never been seen")
        deployments = await run_in_threadpool(lambda: registry.deployments(device_id=device_id, limit=50))
        events = await run_in_threadpool(lambda: registry.events(device_id=device_id, limit=100_000)[-50:])
        row = next((r for r in await run_in_threadpool(fleet.rows) if r.device_id == device_id), None)
        return render(request, "device.html", title=f"Device {device_id}", device=device, row=row,
                      deployments=deployments, events=list(reversed(events)))

    async def deployments_page(request: Request) -> Response:
        deps = await run_in_threadpool(lambda: registry.deployments(limit=200))
        all_rollouts = await run_in_threadpool(rollouts.rollouts)
        return render(request, "deployments.html", title="Deployments and rollouts", deployments=deps,
                      rollouts=list(reversed(all_rollouts))[:50])

    async def deployment_page(request: Request) -> Response:
        dep_id = request.path_params["deployment_id"]
        try:
            view = await run_in_threadpool(views.deployment_view, registry, dep_id)
        except RegistryError:
            return not_found(request, f"no deployment {dep_id!r}")
        return render(request, "deployment.html", title=f"Deployment {dep_id}", view=view, dep=view.record)

    async def report_file(request: Request) -> Response:
        dep_id, name = request.path_params["deployment_id"], request.path_params["name"]
        if name not in views.REPORT_FILES or views.find_deployment(registry, dep_id) is None:
            return PlainTextResponse("not found", status_code=404)
        path = registry.reports_dir / dep_id / name
        if name == LATENCY_PNG and not path.is_file() and path.with_name(REPORT_JSON).is_file():
            # Not drawn while many deployments ended together (see ReportQueue): drawn now, once.
            await run_in_threadpool(draw_missing_plot, registry, dep_id)
        if not path.is_file():
            return PlainTextResponse("not found", status_code=404)
        media = {"report.md": "text/plain; charset=utf-8", "report.json": "application/json",
                 "latency.png": "image/png"}[name]
        return FileResponse(path, media_type=media)

    async def rollout_page(request: Request) -> Response:
        rollout_id = request.path_params["rollout_id"]
        try:
            rollout = await run_in_threadpool(rollouts.get, rollout_id)
        except RegistryError:
            return not_found(request, f"no rollout {rollout_id!r}")
        return render(request, "rollout.html", title=f"Rollout {rollout_id}", rollout=rollout,
                      stages=views.rollout_stages(rollout))

    async def models_page(request: Request) -> Response:
        artifacts = await run_in_threadpool(registry.artifacts)
        found, errors = await run_in_threadpool(views.searches, list(config.search_paths))
        devices = await run_in_threadpool(registry.devices)
        return render(request, "models.html", title="Models", artifacts=artifacts, searches=found,
                      search_errors=errors, runtime_support=views.runtime_support, recipe_text=views.recipe_text,
                      device_ids=[d.device_id for d in devices[:5000]])

    async def login_page(request: Request) -> Response:
        return render(request, "login.html", title="Operator login", error="")

    async def login(request: Request) -> Response:
        client = request.client.host if request.client else "?"
        if not same_origin(request.headers.get("origin"), request.headers.get("referer"),
                           request.headers.get("host")):
            return render(request, "login.html", status=403, title="Operator login",
                          error="refused: the form was posted from another site")
        if not sessions.enabled:
            return render(request, "login.html", status=403, title="Operator login",
                          error="no operator token is configured on this server: the dashboard is read-only")
        if sessions.throttled(client):
            return render(request, "login.html", status=429, title="Operator login",
                          error="too many failed logins: wait a minute")
        form = await request.form()
        session_id = sessions.login(str(form.get("token", "")), client)
        if session_id is None:
            return render(request, "login.html", status=403, title="Operator login", error="wrong token")
        response = RedirectResponse("/fleet", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_id, max_age=int(SESSION_TTL_S), httponly=True,
                            samesite="strict", secure=config.secure_cookie, path="/")
        return response

    async def logout(request: Request) -> Response:
        form = await request.form()
        if csrf_ok(session_of(request), form.get("csrf")):
            sessions.logout(request.cookies.get(SESSION_COOKIE))
        response = RedirectResponse("/fleet", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    def action(run: Callable[[Actions, Any], str], back: Callable[[Any], str]
               ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            session = session_of(request)
            form = await request.form()
            if actions is None or not sessions.enabled:
                return render(request, "error.html", status=403, title="Read-only",
                              message="this dashboard is read-only (no operator token or no running server)")
            if session is None:
                return render(request, "error.html", status=403, title="Log in first",
                              message="actions need an operator session: log in with the operator token")
            if not same_origin(request.headers.get("origin"), request.headers.get("referer"),
                               request.headers.get("host")) or not csrf_ok(session, form.get("csrf")):
                _LOGGER.warning("dashboard: refused %s without a valid CSRF token", request.url.path)
                return render(request, "error.html", status=403, title="Refused",
                              message="refused: the form's CSRF token is missing or wrong (reload the page)")
            try:
                session.flash = await run_in_threadpool(run, actions, form)
                status = "ok"
            except ActionError as exc:
                session.flash = f"refused: {exc}"
                status = "refused"
            _LOGGER.info("dashboard action %s: %s", request.url.path, status)
            return RedirectResponse(back(form), status_code=303)
        return endpoint

    def text(form: Any, name: str) -> str:
        return str(form.get(name, "")).strip()[:2000]

    def number(form: Any, name: str, default: float) -> float:
        try:
            return float(form.get(name) or default)
        except ValueError:
            raise ActionError(f"{name} must be a number, got {form.get(name)!r}") from None

    routes = [
        Route("/", index),
        Route("/fleet", fleet_page),
        Route("/devices/{device_id}", device_page),
        Route("/deployments", deployments_page),
        Route("/deployments/{deployment_id}", deployment_page),
        Route("/deployments/{deployment_id}/files/{name}", report_file),
        Route("/rollouts/{rollout_id}", rollout_page),
        Route("/models", models_page),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/actions/deploy", action(lambda a, f: a.deploy(text(f, "model"), text(f, "device")),
                                        lambda f: "/deployments"), methods=["POST"]),
        Route("/actions/cancel", action(lambda a, f: a.cancel(text(f, "deployment")),
                                        lambda f: f"/deployments/{text(f, 'deployment')}"), methods=["POST"]),
        Route("/actions/rollout", action(
            lambda a, f: a.start_rollout(text(f, "model"), text(f, "groups"), text(f, "devices"),
                                         int(number(f, "waves", 1)), number(f, "max_failure_pct", 20.0)),
            lambda f: "/deployments"), methods=["POST"]),
        Route("/actions/abort", action(lambda a, f: a.abort_rollout(text(f, "rollout")),
                                       lambda f: f"/rollouts/{text(f, 'rollout')}"), methods=["POST"]),
        Route("/actions/rollback", action(lambda a, f: a.rollback_device(text(f, "device")),
                                          lambda f: f"/devices/{text(f, 'device')}"), methods=["POST"]),
        Route("/healthz", lambda request: PlainTextResponse("ok")),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]

    async def add_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.url.path.startswith("/static/"):  # versioned with the package: no revalidation per page
            response.headers["Cache-Control"] = "public, max-age=3600"
        return response

    from starlette.middleware.base import BaseHTTPMiddleware

    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(config.allowed_hosts)),
                  Middleware(BaseHTTPMiddleware, dispatch=add_headers)]
    return Starlette(routes=routes, middleware=middleware)
