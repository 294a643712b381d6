"""The FastAPI application factory."""

from __future__ import annotations

from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from api.audit import AuditLog
from api.auth import Tokens
from api.errors import PROBLEM_JSON, FieldError, Problem, install_error_handlers
from api.limits import BodyLimits
from api.metrics import Exposition
from api.routes import events, health, interfaces, limits, lookup, rules, sources, stats
from api.service import FirewallService
from api.settings import Settings

if TYPE_CHECKING:
    from api.fleet.agent import FleetAgent

__all__ = ["DOCS_ASSETS", "create_app"]

DESCRIPTION = """
Live control of the xdpfw XDP firewall. Rules are map updates: a rule is enforced in the
kernel when its POST returns. Mutating calls need `Authorization: Bearer <token>`
(the admin token is in `<state-dir>/token`; the read-only token in `<state-dir>/read-token`
may only read); reads need a token too unless the API listens on loopback only. Peers on the
local unix socket need none. Every error answer is an RFC 9457 problem
(`application/problem+json`; docs/errors.md).
"""

# /docs and /redoc load their JavaScript and CSS from here, not from a CDN: they work on a
# host with no network. The files come from the fastapi-offline package (MIT; Swagger UI is
# Apache-2.0, ReDoc MIT), a dependency of xdpfw.
DOCS_ASSETS = "/docs-assets"


def create_app(
    settings: Settings, service: FirewallService, token: str, read_token: str | None = None,
    fleet: FleetAgent | None = None,
) -> FastAPI:
    app = FastAPI(
        title="xdpfw", version="0.1.0", description=DESCRIPTION, docs_url=None, redoc_url=None
    )
    tokens = Tokens(token, read_token)
    app.state.settings = settings
    app.state.service = service
    app.state.token = token
    app.state.metrics = Exposition(service, settings.metrics_top_rules)
    app.state.tokens = tokens
    install_error_handlers(app)
    # Outside routing: the token and the size of a body are checked before FastAPI reads it.
    app.add_middleware(BodyLimits, settings=settings, token=tokens)
    # Outermost: one line per change, with the caller BodyLimits (or a dependency) named.
    app.add_middleware(AuditLog)
    if fleet is not None:  # fleet mode: its write routes first, so they shadow the local ones
        from api.routes import fleet as fleet_routes

        fleet_routes.install(app, fleet)
    app.include_router(health.router)
    app.include_router(rules.router)
    app.include_router(sources.router)
    app.include_router(stats.router)
    app.include_router(stats.metrics_router)
    app.include_router(interfaces.router)
    app.include_router(lookup.router)
    app.include_router(events.router)  # X-ray
    app.include_router(limits.router)  # issue 16
    _offline_docs(app)
    _openapi_problems(app, reads_need_token=not settings.loopback_only)
    return app


def _offline_docs(app: FastAPI) -> None:
    static = resources.files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(static)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="xdpfw API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url="/openapi.json",
            title="xdpfw API",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


_PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
# What any operation may answer whatever it does (the error table of api/errors.py).
_ALWAYS = {
    "404": "no such path or resource",
    "405": "the path has no such method (see the Allow header)",
    "422": "invalid request: `errors[]` names each field",
    "500": "a kernel call failed (`errno`), or an unexpected error (see the service log)",
}


def _openapi_problems(app: FastAPI, *, reads_need_token: bool) -> None:
    """Every 4xx/5xx of every operation is a Problem, as `application/problem+json` (the
    health probes' 503, which answer their own body, excepted); off loopback, reads need the
    bearer token too."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        comps = schema.setdefault("components", {})
        schemas = comps.setdefault("schemas", {})
        ref = "#/components/schemas/{model}"
        problem = Problem.model_json_schema(ref_template=ref)
        schemas.update(problem.pop("$defs", {}))
        schemas["Problem"] = problem
        schemas["FieldError"] = FieldError.model_json_schema(ref_template=ref)
        for name in ("HTTPValidationError", "ValidationError", "ErrorOut"):
            schemas.pop(name, None)
        if reads_need_token:
            comps.setdefault("securitySchemes", {})["HTTPBearer"] = {
                "type": "http", "scheme": "bearer"
            }  # fmt: skip
        for path, ops in schema.get("paths", {}).items():
            probe = path in ("/healthz", "/livez")
            for method, op in ops.items():
                if reads_need_token and method == "get" and not probe:
                    op["security"] = [{"HTTPBearer": []}]
                responses = op.setdefault("responses", {})
                for code, text in _ALWAYS.items():
                    responses.setdefault(code, {"description": text})
                for code, response in responses.items():
                    if code[0] not in "45" or (probe and code == "503"):
                        continue
                    response["content"] = {PROBLEM_JSON: {"schema": _PROBLEM_REF}}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
