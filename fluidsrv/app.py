"""The Starlette application: routes, websocket, static files and lifespan."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fluidsrv import __version__
from fluidsrv.settings import REPO_ROOT, Settings

STATIC_DIR = REPO_ROOT / "static"


async def health(request: Request) -> JSONResponse:
    """Report that the server is up."""
    return JSONResponse({"status": "ok", "version": __version__})


def create_app(settings: Settings | None = None) -> Starlette:
    """Return the fluidsrv web application for ``settings``."""
    settings = settings or Settings.from_env()
    app = Starlette(
        routes=[
            Route("/api/health", health),
            Mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static"),
        ]
    )
    app.state.settings = settings
    return app
