"""Server settings: defaults, overridden by ``FLUIDSRV_*`` environment variables and CLI flags."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_WEIGHTS_DIR = REPO_ROOT / "weights"
AUTO_PREVIEWERS = ("student", "generator")  # what previewer=auto tries, in order


def default_cache_dir() -> Path:
    """Return the user's weights cache (``$FLUIDSRV_CACHE`` or ``$XDG_CACHE_HOME/fluidsrv``)."""
    if "FLUIDSRV_CACHE" in os.environ:
        return Path(os.environ["FLUIDSRV_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "fluidsrv"


def default_data_dir() -> Path:
    """Return where sessions spill to disk (``$XDG_DATA_HOME/fluidsrv``)."""
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "fluidsrv"


class SettingsError(ValueError):
    """A setting has a value the server cannot use (the message names the variable)."""


@dataclass(frozen=True)
class Settings:
    """Everything the server can be configured with; each field maps to ``FLUIDSRV_<NAME>``."""

    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    weights_dir: Path = EMBEDDED_WEIGHTS_DIR
    cache_dir: Path = field(default_factory=default_cache_dir)
    data_dir: Path = field(default_factory=default_data_dir)
    # "embedded", a path to a rosinality / e4e / fluidsrv checkpoint, or "random:RES" (untrained, for development)
    generator: str = "embedded"
    # each stage: plugin names in order of preference; the first available one is used
    detector: str = "dlib,yunet,mediapipe"
    encoder: str = "e4e,project"
    directions: str = "named,sefa,ganspace"  # every available source contributes sliders
    segmenter: str = "bisenet,landmarks"
    inpainter: str = "lama,telea"
    previewer: str = "auto"  # "auto" = "student,generator": see stage_preferences
    finetune: str = "lowrank"  # pivotal tuning per session: "lowrank", "full" or "none"
    finetune_steps: int = 0  # at most this many PTI steps; 0: the resolution's default (100 at 128², 350 at 1024²)
    # the fine-tune's own device time per prepare, in seconds: the step count is chosen from its first steps' time
    # so it fits (other sessions' work in between does not count); 0 = unbounded
    prepare_seconds: float = 0.0
    # previews and finalize on CUDA: "auto" (bf16 autocast, fp16 without bf16; channels-last), "bf16", "fp16" or
    # "fp32" (off); see fluidsrv.precision
    inference_precision: str = "auto"
    # previews and finalize: "transfer" lays the render's change over the photo's own pixels
    # (photo + edited − reconstructed, see fluidsrv.compose); "replace" shows the render as it is
    photo_detail: str = "transfer"
    # "replace" mode: how the new head is predicted outside the inner crop (fluidsrv.outer_seg): "inner" (the inner
    # parse alone: old hair there is inpainted), "affine" or "tps" (the old outer map moved by the landmarks' motion)
    outer_seg: str = "affine"
    # per-plugin options, keyed "stage.name", e.g. {"encoder.project": {"steps": 200}}; JSON in the env
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    plugin_allow: tuple[str, ...] | None = None  # entry-point plugin names allowed; None = all
    admin_token: str = ""  # needed to switch plugins at run time (POST /api/config/stages); empty = disabled
    max_upload_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 50_000_000
    max_sessions: int = 64
    max_uploads_per_minute: int = 30  # per client address
    max_ws_message_bytes: int = 64 * 1024
    max_ws_messages_per_second: float = 120.0
    session_memory_budget_bytes: int = 2 * 1024**3  # device tensors (w+, tuned weights) held by sessions
    session_host_budget_bytes: int = 4 * 1024**3  # uploads, pixels and crops held by sessions
    session_ttl_seconds: float = 6 * 3600.0
    # fairness and admission on the one device worker
    max_sockets_per_session: int = 4  # websockets open at once on one session (more are refused)
    max_concurrent_prepares: int = 1  # faces prepared at once; later ones wait in line (told their place)
    prepare_grace_seconds: float = 120.0  # a prepare keeps running this long after its last client left
    long_job_share: float = 0.5  # share of the worker that preparing faces keeps while previews / finalize wait
    # bounded decoding: pixels being decoded at once (server-wide), and per client address each minute
    decode_pixel_budget: int = 100_000_000
    client_pixels_per_minute: int = 250_000_000
    # addresses (comma-separated IPs or CIDRs) whose X-Forwarded-For / -Proto are believed; empty = none
    forwarded_allow_ips: str = ""
    # where the stages run: "local" (this process) or "ray" (Ray Serve deployments; see docs/scale-out.md)
    backend: str = "local"
    ray_address: str = ""  # the Ray cluster to join ("ray://HOST:10001", "auto"); empty = start a local one
    ray_config: Path | None = None  # YAML of each deployment's replicas / autoscaling / actor options
    # where sessions are stored: files under data_dir, unless a database is set, then PostgreSQL (small records)
    # and S3-compatible object storage (large parts); the ray backend needs them, so every replica sees the same
    database_url: str = ""  # postgresql://USER:PASSWORD@HOST:PORT/DB
    s3_endpoint: str = ""  # http://HOST:PORT of the S3 server; empty = AWS
    s3_bucket: str = "fluidsrv"
    s3_region: str = "us-east-1"
    s3_access_key: str = ""  # empty: boto3's own credential chain (AWS_ACCESS_KEY_ID, ...)
    s3_secret_key: str = ""
    # the live identity meter (how far the edit drifted from the person): "auto" (an ArcFace ONNX model in the
    # cache, else dlib's descriptor), "dlib", "arcface" or "off"; measured at most identity_rate times a second
    identity_meter: str = "auto"
    identity_model: Path | None = None  # an ArcFace ONNX model file; None: looked for in cache_dir
    identity_rate: float = 2.0

    def __post_init__(self) -> None:
        choices = {"finetune": ("lowrank", "full", "none"), "photo_detail": ("transfer", "replace"),
                   "outer_seg": ("inner", "affine", "tps"),
                   "inference_precision": ("auto", "bf16", "fp16", "fp32"), "backend": ("local", "ray"),
                   "identity_meter": ("auto", "dlib", "arcface", "off")}
        for name, allowed in choices.items():
            value = getattr(self, name)
            if value not in allowed:
                raise SettingsError(f"FLUIDSRV_{name.upper()} must be one of {', '.join(allowed)}, not {value!r}")
        positive = ("max_sockets_per_session", "max_concurrent_prepares", "decode_pixel_budget",
                    "client_pixels_per_minute")
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"FLUIDSRV_{name.upper()} must be at least 1, not {getattr(self, name)!r}")
        if self.prepare_grace_seconds < 0:
            raise SettingsError("FLUIDSRV_PREPARE_GRACE_SECONDS must not be negative")
        if self.prepare_seconds < 0 or self.finetune_steps < 0:
            raise SettingsError("FLUIDSRV_PREPARE_SECONDS and FLUIDSRV_FINETUNE_STEPS must not be negative")
        if self.backend == "ray" and self.ray_address and not self.database_url:
            raise SettingsError("on a Ray cluster sessions live in PostgreSQL and S3, so that every node sees them: "
                                "set FLUIDSRV_DATABASE_URL and FLUIDSRV_S3_ENDPOINT / FLUIDSRV_S3_BUCKET")
        if not self.identity_rate > 0:
            raise SettingsError(f"FLUIDSRV_IDENTITY_RATE must be above 0, not {self.identity_rate!r}")
        if not 0.0 < self.long_job_share < 1.0:
            raise SettingsError(f"FLUIDSRV_LONG_JOB_SHARE must be between 0 and 1, not {self.long_job_share!r}")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
        """Return settings from ``FLUIDSRV_*`` variables, then ``overrides`` (CLI flags) on top."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            raw = env.get(f"FLUIDSRV_{item.name.upper()}")
            if raw is not None:
                try:
                    values[item.name] = _parse(item.name, str(item.type), raw)
                except ValueError as error:
                    raise SettingsError(f"FLUIDSRV_{item.name.upper()}={raw!r} is not valid: {error}") from error
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def resolved_device(self) -> str:
        """Return the torch device string, resolving "auto"."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def stage_preferences(self, stage: str) -> list[str]:
        """Return the plugin names configured for ``stage``, most preferred first."""
        raw = str(getattr(self, stage))
        names = [name.strip() for name in raw.split(",") if name.strip()]
        if stage == "previewer":  # "auto": the student when one is made for the generator, else the generator
            names = [part for name in names for part in (AUTO_PREVIEWERS if name == "auto" else (name,))]
        return names


def _parse(name: str, type_name: str, raw: str) -> Any:
    if "Path" in type_name:
        return Path(raw).expanduser()
    if "dict" in type_name:
        value = json.loads(raw)
        if not isinstance(value, dict):
            raise ValueError(f"FLUIDSRV_{name.upper()} must be a JSON object")
        return value
    if "tuple" in type_name:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    if type_name.startswith("int"):
        return int(raw)
    if type_name.startswith("float"):
        return float(raw)
    return raw
