"""The Ray Serve application of ``fluidsrv serve --backend ray``: the ingress and how the deployments are bound.

The ingress is the web application itself (REST + websockets, the same protocol as one box), its service running
the stages on :class:`~fluidsrv.backends.ray_stages.RayStages`; the stage replicas are in
:mod:`fluidsrv.backends.ray_replicas`. This module composes the two, as :mod:`fluidsrv.cli.serve` does for one box.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from fluidsrv.backends.ray_replicas import (
    DetectReplica,
    FinalizeReplica,
    PrepareReplica,
    PreviewReplica,
    deployment_options,
    serve_options,
)
from fluidsrv.backends.ray_stages import PREVIEWS_PER_REPLICA, RayStages, StageHandles
from fluidsrv.settings import Settings, SettingsError

APP_NAME = "fluidsrv"


@serve.ingress()
class IngressReplica:
    """The web application (REST + websocket), its service on :class:`RayStages` over the stage deployments."""

    def __init__(self, settings: Settings, previews_in_flight: int, detect: DeploymentHandle,
                 prepare: DeploymentHandle, preview: DeploymentHandle, finalize: DeploymentHandle) -> None:
        from fluidsrv.logs import install_redaction

        logging.basicConfig(level=logging.INFO)
        install_redaction()  # tokens never reach the replica's log
        self.settings = settings
        self.previews_in_flight = previews_in_flight
        self.handles = StageHandles(detect=detect, prepare=prepare, preview=preview, finalize=finalize)

    def __serve_build_asgi_app__(self) -> Any:
        """The Starlette app whose service runs its stages on the deployments."""
        from fluidsrv.web import create_app

        handles, in_flight = self.handles, self.previews_in_flight
        return create_app(self.settings,
                          stages=lambda runtime, executor: RayStages(handles, previews_in_flight=in_flight))


def build_application(settings: Settings, options: dict[str, dict[str, Any]] | None = None) -> Any:
    """The bound Serve application of ``settings``, each deployment with its options."""
    options = options if options is not None else deployment_options(settings.ray_config)

    def deployment(cls: type, name: str) -> Any:
        return serve.deployment(cls, name=name, **serve_options(options[name]))

    models = {name: int(options[name].get("models_per_replica", 8)) for name in ("preview", "finalize")}
    ingress_settings = dataclasses.replace(  # the ingress lets in as many prepares as the replicas can take
        settings, max_concurrent_prepares=max(settings.max_concurrent_prepares, prepare_capacity(options["prepare"])))
    detect = deployment(DetectReplica, "detect").bind(settings)
    prepare = deployment(PrepareReplica, "prepare").bind(settings)
    preview = deployment(PreviewReplica, "preview").bind(settings, models["preview"])
    finalize = deployment(FinalizeReplica, "finalize").bind(settings, models["finalize"])
    previews_in_flight = replica_count(options["preview"]) * PREVIEWS_PER_REPLICA
    return deployment(IngressReplica, "ingress").bind(
        ingress_settings, previews_in_flight, detect, prepare, preview, finalize)


def replica_count(entry: dict[str, Any]) -> int:
    """The most replicas a deployment's entry runs (num_replicas, or autoscaling's max_replicas)."""
    autoscaling = entry.get("autoscaling_config") or {}
    replicas = autoscaling.get("max_replicas", entry.get("num_replicas", 1))
    if not isinstance(replicas, int):  # e.g. Ray's num_replicas: "auto", whose bound the ingress cannot know
        raise SettingsError(f"FLUIDSRV_RAY_CONFIG: give num_replicas as a number, or autoscaling_config with "
                            f"max_replicas, not {replicas!r}")
    return max(1, replicas)


def prepare_capacity(entry: dict[str, Any]) -> int:
    """How many faces the prepare deployment's replicas prepare at once at most (replicas x ongoing requests)."""
    return max(1, replica_count(entry) * int(entry.get("max_ongoing_requests", 1)))


def start(settings: Settings, options: dict[str, dict[str, Any]] | None = None) -> DeploymentHandle:
    """Join (or start) the Ray cluster of ``settings``, run the application with its HTTP proxy on host:port."""
    import ray

    if not ray.is_initialized():
        # no address: a new local cluster (never one that RAY_ADDRESS or a running cluster would pick)
        ray.init(address=settings.ray_address or "local", include_dashboard=False, log_to_driver=True)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    handle: DeploymentHandle = serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
    return handle


def stop() -> None:
    """Delete the application (its replicas stop); the cluster keeps running."""
    serve.delete(APP_NAME)


def serve_until_interrupted(settings: Settings) -> None:
    """Run the application until Ctrl-C, then delete it (the cluster keeps running)."""
    start(settings)
    print(f"fluidsrv is serving on Ray Serve at http://{settings.host}:{settings.port} (Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stop()
