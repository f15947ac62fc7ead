"""The web layer: HTTP routes and the websocket over :class:`fluidsrv.service.EditService`."""

from fluidsrv.web.app import create_app

__all__ = ["create_app"]
