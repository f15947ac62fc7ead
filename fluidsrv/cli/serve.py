"""``fluidsrv serve``: run the web server."""

from __future__ import annotations

import argparse
import ipaddress
from typing import TYPE_CHECKING, Any

from fluidsrv.settings import Settings, SettingsError

if TYPE_CHECKING:
    import uvicorn


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand."""
    parser: argparse.ArgumentParser = subparsers.add_parser("serve", help="run the web server")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
    parser.add_argument("--device", help='"auto", "cpu" or a CUDA device such as "cuda:0"')
    parser.add_argument("--generator", help='"embedded" or a path to a generator checkpoint')
    parser.add_argument("--backend", choices=("local", "ray"),
                        help="where the stages run: in this process (default) or on Ray Serve (docs/scale-out.md)")
    parser.add_argument("--address", help="the Ray cluster to join with --backend ray (default: start a local one)")
    parser.set_defaults(handler=run)


def trusted_proxies(settings: Settings) -> list[str]:
    """The addresses whose ``X-Forwarded-For`` / ``-Proto`` are believed (``*``: any), checked as IPs or CIDRs."""
    entries = [entry.strip() for entry in settings.forwarded_allow_ips.split(",") if entry.strip()]
    if "*" in entries:
        return ["*"]  # uvicorn trusts everyone only for a lone "*"
    normalised = []
    for entry in entries:
        address = _address_or_network(entry)
        if address is None:
            raise SettingsError(
                f"FLUIDSRV_FORWARDED_ALLOW_IPS: {entry!r} is not an IP address or network (e.g. 10.0.0.0/8)")
        normalised.append(address)
    return normalised


def _address_or_network(entry: str) -> str | None:
    """``entry`` as uvicorn parses it (a network in its strict form, e.g. 10.0.0.1/8 → 10.0.0.0/8), or None."""
    try:
        return str(ipaddress.ip_network(entry, strict=False)) if "/" in entry else str(ipaddress.ip_address(entry))
    except ValueError:
        return None


def build_config(settings: Settings, app: Any = None) -> uvicorn.Config:
    """The uvicorn configuration ``fluidsrv serve`` runs: ``app`` (default: the app of ``settings``) and its limits."""
    import uvicorn

    from fluidsrv.web import create_app

    proxies = trusted_proxies(settings)
    return uvicorn.Config(
        app if app is not None else create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        # frames beyond this close the socket at once; the app answers smaller oversized messages with an error
        ws_max_size=2 * settings.max_ws_message_bytes,
        # forwarded headers only from the configured proxies: none at all by default (uvicorn's own default,
        # or $FORWARDED_ALLOW_IPS, would believe any loopback client, letting it pick its rate-limit address)
        proxy_headers=bool(proxies),
        forwarded_allow_ips=",".join(proxies) if proxies else "",
    )


def run(args: argparse.Namespace) -> int:
    """Start uvicorn with the app built from the settings."""
    import uvicorn

    from fluidsrv.logs import install_redaction

    settings = Settings.from_env(host=args.host, port=args.port, device=args.device, generator=args.generator,
                                 backend=args.backend, ray_address=args.address)
    if settings.backend == "ray":
        return _run_on_ray(settings)
    config = build_config(settings)
    install_redaction()  # uvicorn.Config has configured its loggers: the filter goes on their handlers now
    uvicorn.Server(config).run()
    return 0


def _run_on_ray(settings: Settings) -> int:
    """Run the application on Ray Serve until interrupted."""
    try:
        from fluidsrv.cli import serve_ray
    except ImportError as error:
        raise SettingsError(f"--backend ray needs the scaleout extra (scripts/setup scaleout): {error}") from None
    serve_ray.serve_until_interrupted(settings)
    return 0
