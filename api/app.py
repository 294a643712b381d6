"""The FastAPI application factory."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.limits import BodyLimits
from api.routes import health, interfaces, rules, sources, stats
from api.service import FirewallService
from api.settings import Settings

if TYPE_CHECKING:
    from api.fleet.agent import FleetAgent

__all__ = ["create_app"]

DESCRIPTION = """
Live control of the xdpfw XDP firewall. Rules are map updates: a rule is enforced in the
kernel when its POST returns. Mutating calls need `Authorization: Bearer <token>`
(the token is in `<state-dir>/token`); reads need it too unless the API listens on loopback only.
"""


def create_app(
    settings: Settings, service: FirewallService, token: str, fleet: FleetAgent | None = None
) -> FastAPI:
    app = FastAPI(title="xdpfw", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.service = service
    app.state.token = token
    install_error_handlers(app)
    # Outside routing: the token and the size of a body are checked before FastAPI reads it.
    app.add_middleware(BodyLimits, settings=settings, token=token)
    if fleet is not None:  # fleet mode: its write routes first, so they shadow the local ones
        from api.routes import fleet as fleet_routes

        fleet_routes.install(app, fleet)
    app.include_router(health.router)
    app.include_router(rules.router)
    app.include_router(sources.router)
    app.include_router(stats.router)
    app.include_router(stats.metrics_router)
    app.include_router(interfaces.router)
    if not settings.loopback_only:
        _require_token_for_reads(app)
    return app


def _require_token_for_reads(app: FastAPI) -> None:
    """Off loopback, reads need the token too: say so in the OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})[
                "HTTPBearer"
            ] = {"type": "http", "scheme": "bearer"}
            for path, ops in schema.get("paths", {}).items():
                if path not in ("/healthz", "/livez") and "get" in ops:
                    ops["get"]["security"] = [{"HTTPBearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
