"""The FastAPI application factory."""

from __future__ import annotations

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routes import health, interfaces, rules, stats
from api.service import FirewallService
from api.settings import Settings

__all__ = ["create_app"]

DESCRIPTION = """
Live control of the xdpfw XDP firewall. Rules are map updates: a rule is enforced in the
kernel when its POST returns. Mutating calls need `Authorization: Bearer <token>`
(the token is in `<state-dir>/token`); reads need it too unless the API listens on loopback only.
"""


def create_app(settings: Settings, service: FirewallService, token: str) -> FastAPI:
    app = FastAPI(title="xdpfw", version="0.1.0", description=DESCRIPTION)
    app.state.settings = settings
    app.state.service = service
    app.state.token = token
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(rules.router)
    app.include_router(stats.router)
    app.include_router(stats.metrics_router)
    app.include_router(interfaces.router)
    return app
