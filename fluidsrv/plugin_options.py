"""Reading plugin options (strings from the CLI or settings, or typed values) into checked values."""

from __future__ import annotations

from typing import Any

from fluidsrv.latents import parse_layers


def option_int(options: Any, key: str, default: int, minimum: int = 1) -> int:
    """Read an integer plugin option (strings from the CLI or settings are converted); ValueError when invalid."""
    raw = options.get(key, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"option {key!r} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"option {key!r} must be >= {minimum}, got {value}")
    return value


def option_layer_ranges(options: Any, num_ws: int, default: str) -> list[tuple[str, tuple[int, int]]]:
    """Read the ``layers`` option: comma-separated ranges (``coarse``, ``middle``, ``fine``, ``all``, ``a:b``).

    Returns (label, [start, stop)) pairs; ``all`` is every layer.
    """
    spec = str(options.get("layers", default))
    ranges = []
    for part in (piece.strip() for piece in spec.split(",")):
        if not part:
            continue
        ranges.append((part, (0, num_ws) if part == "all" else parse_layers(part, num_ws)))
    if not ranges:
        raise ValueError(f"option 'layers' names no layer range: {spec!r}")
    return ranges
