"""``fluidsrv serve``: run the web server."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser("serve", help="run the web server")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--device", help='"auto", "cpu" or a CUDA device such as "cuda:0"')
    parser.add_argument("--generator", help='"embedded" or a path to a generator checkpoint')
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Start uvicorn with the app built from the settings."""
    import uvicorn

    from fluidsrv.logs import install_redaction
    from fluidsrv.settings import Settings
    from fluidsrv.web import create_app

    settings = Settings.from_env(host=args.host, port=args.port, device=args.device, generator=args.generator)
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        # frames beyond this close the socket at once; the app answers smaller oversized messages with an error
        ws_max_size=2 * settings.max_ws_message_bytes,
    )
    install_redaction()  # uvicorn.Config has configured its loggers: the filter goes on their handlers now
    uvicorn.Server(config).run()
    return 0
