"""Checkpoint loaders and savers: rosinality / e4e ``.pt`` files and our own safetensors, strictly and safely.

Formats understood:

* **rosinality** ``.pt`` (``stylegan2-pytorch``): ``{"g_ema": state_dict, "latent_avg": [w_dim]?, ...}``
  (training checkpoints also hold ``g``, ``d``, optimizer states and ``args``; only ``g_ema`` is used).
* **e4e** ``.pt`` (``encoder4editing``): ``{"state_dict": {"encoder.*", "decoder.*"}, "latent_avg": [num_ws, w_dim],
  "opts": {...}}``; ``decoder.*`` is a rosinality generator.
* **fluidsrv** safetensors: a generator (``format=fluidsrv-generator``) or an encoder (``format=fluidsrv-encoder``),
  the network config as JSON in the metadata, averages stored as tensors.

Pickles are read only with ``torch.load(weights_only=True)`` (no code runs while loading); any key that does not
match the network, in either direction, raises :class:`CheckpointError` naming the keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fluidsrv.models.e4e import E4EConfig, Encoder4Editing
from fluidsrv.models.stylegan2 import Generator, GeneratorConfig

log = logging.getLogger(__name__)
ConfigT = TypeVar("ConfigT", GeneratorConfig, E4EConfig)

GENERATOR_FORMAT = "fluidsrv-generator"
ENCODER_FORMAT = "fluidsrv-encoder"
FORMAT_VERSION = "1"
W_AVG_KEY = "w_avg"  # tensor name of the generator's average w in our generator files
LATENT_AVG_KEY = "latent_avg"  # tensor name of the encoder's latent average in our encoder files
RESERVED_METADATA = ("format", "format_version", "config", "generator")
W_AVG_SAMPLES = 10_000  # z samples mapped to estimate w_avg when a checkpoint stores none
W_AVG_SEED = 0
_MAX_KEYS_SHOWN = 20


class CheckpointError(ValueError):
    """A checkpoint could not be read: unknown format, unsafe pickle, or keys that do not match the network."""


# ---------------------------------------------------------------------------------------------- reading files


def _sniff_format(path: Path) -> str:
    """Return ``"safetensors"`` or ``"torch"`` from the file's first bytes; raise for anything else."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    with path.open("rb") as handle:
        head = handle.read(9)
    # safetensors first: its 8-byte little-endian header length may start with any byte, 0x80 included
    header_size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if head[8:9] == b"{" and 0 < header_size <= path.stat().st_size - 8:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":  # torch's zip container (torch.save since 1.6)
        return "torch"
    if head[:1] == b"\x80":  # a bare pickle (torch's legacy format); still loaded with weights_only=True
        return "torch"
    raise CheckpointError(
        f"{path}: unrecognized checkpoint format (first bytes {head[:8]!r}); "
        "expected a torch .pt/.pth file or a .safetensors file"
    )


def _read_torch(path: Path) -> Any:
    """Load a torch checkpoint with ``weights_only=True``; unsafe content is refused, never run."""
    try:
        # argparse.Namespace (rosinality's ``args``) is a plain attribute bag: safe to allow.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds objects beyond plain tensors and containers "
            f"(torch.load(weights_only=True) said: {str(error).splitlines()[0]})"
        ) from error
    except RuntimeError as error:
        raise CheckpointError(f"{path}: not a readable torch checkpoint: {error}") from error


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return the tensors (on CPU) and the string metadata of a safetensors file."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from error
    return tensors, metadata


def read_metadata(path: str | Path) -> dict[str, str]:
    """Return the string metadata of a safetensors file without reading its tensors."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file: {error}") from error


def _metadata_config(path: Path, metadata: Mapping[str, str], expected_format: str) -> dict[str, Any]:
    """Return the JSON config of one of our safetensors files, checking its ``format`` tag."""
    found = metadata.get("format")
    if found != expected_format:
        raise CheckpointError(f"{path}: expected a {expected_format!r} safetensors file, metadata says {found!r}")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: the metadata has no valid JSON 'config': {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: the metadata 'config' is not a JSON object")
    return config


def _parse_config(config_class: type[ConfigT], data: dict[str, Any], path: Path) -> ConfigT:
    """Build a network config from its stored dict; a malformed one is a :class:`CheckpointError`."""
    try:
        return config_class.from_dict(data)
    except (AssertionError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: invalid {config_class.__name__} in the metadata: {error}") from error


def _as_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Cast floating tensors (fp16 files) to float32; leave integer buffers alone."""
    return {key: value.float() if value.is_floating_point() else value for key, value in state.items()}


# ---------------------------------------------------------------------------------------------- strict key checks


def _name_keys(keys: set[str]) -> str:
    shown = sorted(keys)[:_MAX_KEYS_SHOWN]
    more = f" … and {len(keys) - len(shown)} more" if len(keys) > len(shown) else ""
    return ", ".join(shown) + more


def check_state_dict(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Raise :class:`CheckpointError` naming every missing, unexpected or mis-shaped key of ``state``.

    Works on ``meta`` tensors too (only names and shapes are compared).
    """
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    mis_shaped = {
        f"{key} {tuple(state[key].shape)} != {expected[key]}"
        for key in set(expected) & set(state)
        if tuple(state[key].shape) != expected[key]
    }
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_name_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_name_keys(unexpected)}")
    if mis_shaped:
        problems.append(f"wrong shapes ({len(mis_shaped)}): {_name_keys(mis_shaped)}")
    if problems:
        raise CheckpointError(f"{what} does not match the network: " + "; ".join(problems))


def split_e4e_state(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split an e4e ``state_dict`` into (encoder, decoder) halves without prefixes; any other key is an error."""
    halves: dict[str, dict[str, torch.Tensor]] = {"encoder.": {}, "decoder.": {}}
    foreign: set[str] = set()
    for key, value in state.items():
        prefix = next((p for p in halves if key.startswith(p)), None)
        if prefix is None:
            foreign.add(key)
        else:
            halves[prefix][key.removeprefix(prefix)] = value
    if foreign:
        count = len(foreign)
        raise CheckpointError(f"e4e state_dict has keys outside encoder./decoder. ({count}): {_name_keys(foreign)}")
    if not halves["encoder."] or not halves["decoder."]:
        raise CheckpointError("e4e state_dict needs both encoder.* and decoder.* keys")
    return halves["encoder."], halves["decoder."]


# ---------------------------------------------------------------------------------------------- generators

_MAPPING_KEY = re.compile(r"^style\.(\d+)\.weight$")
_TO_RGB_KEY = re.compile(r"^to_rgbs\.(\d+)\.conv\.weight$")


def infer_generator_config(state: Mapping[str, torch.Tensor]) -> GeneratorConfig:
    """Infer resolution, channel widths, mapping depth and w_dim from a rosinality state dict's shapes."""
    required = ("input.input", "style.1.weight")
    absent = [key for key in required if key not in state]
    if absent:
        raise CheckpointError(f"not a rosinality generator state dict: missing keys {absent}")
    mapping_layers = sorted(int(m.group(1)) for key in state if (m := _MAPPING_KEY.match(key)))
    to_rgb_layers = sorted(int(m.group(1)) for key in state if (m := _TO_RGB_KEY.match(key)))
    if mapping_layers != list(range(1, len(mapping_layers) + 1)):
        raise CheckpointError(f"mapping layers are not style.1..style.N: {mapping_layers}")
    if to_rgb_layers != list(range(len(to_rgb_layers))):
        raise CheckpointError(f"to_rgbs layers are not numbered 0..N-1: {to_rgb_layers}")
    w_dim = int(state["style.1.weight"].shape[0])
    channels = {4: int(state["input.input"].shape[1])}
    for index in to_rgb_layers:  # to_rgbs.i and convs.2i / convs.2i+1 work at 2^(i+3) pixels
        conv_key = f"convs.{2 * index}.conv.weight"
        if conv_key not in state:
            raise CheckpointError(f"missing key {conv_key} (needed to infer the channel widths)")
        channels[2 ** (index + 3)] = int(state[conv_key].shape[1])  # [1, out, in, 3, 3]
    resolution = 2 ** (len(to_rgb_layers) + 2)
    return GeneratorConfig(resolution=resolution, w_dim=w_dim, n_mapping=len(mapping_layers), channels=channels)


def _build_generator(config: GeneratorConfig, state: Mapping[str, torch.Tensor], what: str) -> Generator:
    """Build a generator from ``config`` and load ``state`` strictly (after a key check that names problems)."""
    generator = Generator(config)
    check_state_dict(generator, state, what)
    generator.load_state_dict(_as_float32(state), strict=True)
    return generator


def _finish_generator(
    generator: Generator, w_avg: torch.Tensor | None, device: str | torch.device, source: Path
) -> tuple[Generator, torch.Tensor]:
    """Move to ``device``, fill ``G.w_avg`` (estimating it when the file stores none) and return both."""
    generator = generator.to(device).eval()
    if w_avg is None:
        log.info(
            "%s stores no average w; estimating w_avg from %d mapped z (seed %d)", source, W_AVG_SAMPLES, W_AVG_SEED
        )
        w_avg = generator.estimate_w_avg(num_samples=W_AVG_SAMPLES, seed=W_AVG_SEED)
    w_avg = w_avg.detach().float().reshape(-1).to(device)  # [w_dim]
    assert w_avg.shape == (generator.w_dim,), f"w_avg must be [{generator.w_dim}], got {tuple(w_avg.shape)}"
    with torch.no_grad():
        generator.w_avg.copy_(w_avg)
    return generator, w_avg


def _w_avg_from_latent_avg(latent_avg: torch.Tensor, w_dim: int, source: Path) -> torch.Tensor:
    """Reduce a stored ``latent_avg`` ([w_dim], [1, w_dim] or e4e's [num_ws, w_dim]) to w_avg [w_dim]."""
    if latent_avg.ndim == 1:
        return latent_avg
    if latent_avg.ndim == 2 and latent_avg.shape[-1] == w_dim:
        return latent_avg.float().mean(dim=0)  # e4e repeats one w over the layers: the mean is that w
    shape = tuple(latent_avg.shape)
    raise CheckpointError(f"{source}: latent_avg has shape {shape}, expected [{w_dim}] or [L, {w_dim}]")


def _generator_from_torch(checkpoint: Any, path: Path) -> tuple[Generator, torch.Tensor | None]:
    """Build the generator of a rosinality or e4e torch checkpoint and return it with its stored w_avg, if any."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    e4e_state = checkpoint.get("state_dict")
    if "g_ema" in checkpoint:
        state, what = checkpoint["g_ema"], f"{path} g_ema"
    elif isinstance(e4e_state, dict) and any(str(key).startswith("decoder.") for key in e4e_state):
        _, state = split_e4e_state(checkpoint["state_dict"])
        what = f"{path} decoder.*"
    else:
        raise CheckpointError(
            f"{path}: no generator found: expected a rosinality 'g_ema' or an e4e 'state_dict' with decoder.* keys; "
            f"top-level keys are {sorted(map(str, checkpoint))}"
        )
    generator = _build_generator(infer_generator_config(state), state, what)
    latent_avg = checkpoint.get("latent_avg")
    w_avg = None if latent_avg is None else _w_avg_from_latent_avg(latent_avg, generator.w_dim, path)
    return generator, w_avg


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> tuple[Generator, torch.Tensor]:
    """Load a generator and its average w [w_dim] from a rosinality / e4e ``.pt`` or our safetensors file."""
    path = Path(path)
    if _sniff_format(path) == "torch":
        generator, w_avg = _generator_from_torch(_read_torch(path), path)
    else:
        tensors, metadata = _read_safetensors(path)
        config = _parse_config(GeneratorConfig, _metadata_config(path, metadata, GENERATOR_FORMAT), path)
        w_avg = tensors.pop(W_AVG_KEY, None)
        generator = _build_generator(config, tensors, str(path))
    return _finish_generator(generator, w_avg, device, path)


def _string_metadata(extra: Mapping[str, str] | None) -> dict[str, str]:
    extra = dict(extra or {})
    clashes = sorted(set(extra) & set(RESERVED_METADATA))
    if clashes:
        raise ValueError(f"extra_metadata may not set reserved keys {clashes}")
    wrong = sorted(key for key, value in extra.items() if not isinstance(key, str) or not isinstance(value, str))
    if wrong:
        raise TypeError(f"safetensors metadata must map str to str; offending keys: {wrong}")
    return extra


def _tensors_for_file(state: Mapping[str, torch.Tensor], half: bool) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (fp16 floats when ``half``) that safetensors can write."""
    out = {}
    for key, value in state.items():
        value = value.detach().to("cpu", copy=True)
        if half and value.is_floating_point():
            value = value.half()
        out[key] = value.contiguous()
    return out


def save_generator(
    path: str | Path,
    generator: Generator,
    w_avg: torch.Tensor,
    extra_metadata: Mapping[str, str] | None = None,
    half: bool = False,
) -> None:
    """Write ``generator`` and ``w_avg`` [w_dim] as our safetensors (config JSON in the metadata; fp16 if ``half``)."""
    assert w_avg.shape == (generator.w_dim,), f"w_avg must be [{generator.w_dim}], got {tuple(w_avg.shape)}"
    metadata = _string_metadata(extra_metadata)
    config = json.dumps(generator.config.to_dict())
    metadata.update(format=GENERATOR_FORMAT, format_version=FORMAT_VERSION, config=config)
    tensors = _tensors_for_file({**generator.state_dict(), W_AVG_KEY: w_avg}, half)
    save_file(tensors, str(path), metadata=metadata)


# ---------------------------------------------------------------------------------------------- encoders


def _build_encoder(config: E4EConfig, state: Mapping[str, torch.Tensor], what: str) -> Encoder4Editing:
    """Build the encoder on the meta device (no wasted init of ~1 GB) and assign ``state`` strictly."""
    with torch.device("meta"):
        encoder = Encoder4Editing(config)
    check_state_dict(encoder, state, what)
    encoder.load_state_dict(_as_float32(state), strict=True, assign=True)
    leftovers = [name for name, value in [*encoder.named_parameters(), *encoder.named_buffers()] if value.is_meta]
    assert not leftovers, f"tensors left uninitialised after loading: {leftovers}"
    return encoder


_STYLE_CONV_KEY = re.compile(r"^styles\.(\d+)\.convs\.(\d+)\.weight$")
_UNIT_CONV_KEY = re.compile(r"^body\.(\d+)\.res_layer\.1\.weight$")


def infer_e4e_config(state: Mapping[str, torch.Tensor]) -> E4EConfig:
    """Infer an :class:`E4EConfig` from an Encoder4Editing state dict's shapes (no ``encoder.`` prefix).

    Stages are found where the unit width changes (a unit with a ``shortcut_layer`` conv starts a stage), so
    consecutive stage widths must differ, as in every IR-SE backbone; the coarse/middle/fine split is read off
    the number of strided convs in each style block.
    """
    required = ("input_layer.0.weight", "styles.0.linear.weight", "body.0.res_layer.5.fc1.weight")
    absent = [key for key in required if key not in state]
    if absent:
        raise CheckpointError(f"not an Encoder4Editing state dict: missing keys {absent}")
    convs_per_style: dict[int, int] = {}
    for key in state:
        if m := _STYLE_CONV_KEY.match(key):
            convs_per_style[int(m.group(1))] = convs_per_style.get(int(m.group(1)), 0) + 1
    num_ws = len(convs_per_style)
    if sorted(convs_per_style) != list(range(num_ws)):
        raise CheckpointError(f"style blocks are not numbered 0..N-1: {sorted(convs_per_style)}")
    coarse_convs = convs_per_style[0]  # the coarse map (input / 16) needs log2(input / 16) strided convs
    counts = [convs_per_style[i] for i in range(num_ws)]
    if any(c not in (coarse_convs, coarse_convs + 1, coarse_convs + 2) for c in counts) or counts != sorted(counts):
        raise CheckpointError(f"style blocks have unexpected conv counts {counts}")

    unit_widths = {int(m.group(1)): int(state[key].shape[0]) for key in state if (m := _UNIT_CONV_KEY.match(key))}
    num_units = len(unit_widths)
    widening_units = (u for u in range(1, num_units) if f"body.{u}.shortcut_layer.0.weight" in state)
    stage_starts = [0, *sorted(widening_units)]
    if sorted(unit_widths) != list(range(num_units)) or len(stage_starts) != 4:
        raise CheckpointError(f"cannot find 4 backbone stages in {num_units} units (stage starts {stage_starts})")
    bounds = [*stage_starts, num_units]
    style_weight = state["styles.0.linear.weight"]  # [w_dim, style_channels]
    se_squeeze = state["body.0.res_layer.5.fc1.weight"]  # [width / reduction, width, 1, 1]
    return E4EConfig(
        num_ws=num_ws,
        w_dim=int(style_weight.shape[0]),
        input_size=16 * 2**coarse_convs,
        stage_blocks=tuple(bounds[i + 1] - bounds[i] for i in range(4)),
        stage_widths=tuple(unit_widths[start] for start in stage_starts),
        style_channels=int(style_weight.shape[1]),
        se_reduction=int(se_squeeze.shape[1]) // int(se_squeeze.shape[0]),
        coarse_end=counts.count(coarse_convs),
        middle_end=counts.count(coarse_convs) + counts.count(coarse_convs + 1),
    )


def _e4e_config_from_state(encoder_state: Mapping[str, torch.Tensor], opts: Any, path: Path) -> E4EConfig:
    """Infer the encoder config from the checkpoint's shapes and cross-check it with the e4e ``opts``."""
    try:
        config = infer_e4e_config(encoder_state)
    except ValueError as error:  # CheckpointError, or E4EConfig rejecting the inferred values
        raise CheckpointError(f"{path}: {error}") from error
    if isinstance(opts, dict):
        encoder_type = opts.get("encoder_type", "Encoder4Editing")
        if encoder_type != "Encoder4Editing":
            raise CheckpointError(f"{path}: encoder_type {encoder_type!r} is not supported (only Encoder4Editing)")
        size = opts.get("stylegan_size")
        if size is not None and int(size) != config.resolution:
            raise CheckpointError(f"{path}: {config.num_ws} style blocks do not fit opts stylegan_size {size}")
    return config


def _latent_avg_rows(latent_avg: torch.Tensor, num_ws: int, source: Path) -> torch.Tensor:
    """Return ``latent_avg`` as [num_ws, w_dim] (a single stored w is repeated over the layers)."""
    latent_avg = latent_avg.detach().float()
    if latent_avg.ndim == 1:
        latent_avg = latent_avg.unsqueeze(0).expand(num_ws, -1)
    if latent_avg.ndim != 2 or latent_avg.shape[0] != num_ws:
        raise CheckpointError(f"{source}: latent_avg has shape {tuple(latent_avg.shape)}, expected [{num_ws}, w_dim]")
    return latent_avg.contiguous()  # [num_ws, w_dim]


def _encoder_from_torch(checkpoint: Any, path: Path) -> tuple[Encoder4Editing, torch.Tensor | None]:
    """Build the encoder half of an e4e torch checkpoint; return it with the stored latent_avg, if any."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise CheckpointError(f"{path}: not an e4e checkpoint (no 'state_dict')")
    encoder_state, _ = split_e4e_state(checkpoint["state_dict"])
    config = _e4e_config_from_state(encoder_state, checkpoint.get("opts"), path)
    encoder = _build_encoder(config, encoder_state, f"{path} encoder.*")
    stored = checkpoint.get("latent_avg")
    return encoder, None if stored is None else _latent_avg_rows(stored, config.num_ws, path)


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> tuple[Encoder4Editing, torch.Tensor | None]:
    """Load an encoder and its stored latent_avg [num_ws, w_dim] (None if absent) from our safetensors or e4e .pt."""
    path = Path(path)
    if _sniff_format(path) == "torch":
        encoder, latent_avg = _encoder_from_torch(_read_torch(path), path)
    else:
        tensors, metadata = _read_safetensors(path)
        config = _parse_config(E4EConfig, _metadata_config(path, metadata, ENCODER_FORMAT), path)
        stored = tensors.pop(LATENT_AVG_KEY, None)
        encoder = _build_encoder(config, tensors, str(path))
        latent_avg = None if stored is None else _latent_avg_rows(stored, config.num_ws, path)
    return encoder.to(device).eval(), None if latent_avg is None else latent_avg.to(device)


def save_encoder(
    path: str | Path,
    encoder: Encoder4Editing,
    latent_avg: torch.Tensor | None = None,
    generator_file: str | None = None,
    extra_metadata: Mapping[str, str] | None = None,
    half: bool = False,
) -> None:
    """Write ``encoder`` (and ``latent_avg`` [num_ws, w_dim] or [w_dim]) as our safetensors, config in the metadata.

    ``generator_file`` names the generator it was trained for, relative to the encoder file's folder;
    :func:`load_e4e` loads that generator when none is passed to it.
    """
    metadata = _string_metadata(extra_metadata)
    metadata.update(format=ENCODER_FORMAT, format_version=FORMAT_VERSION, config=json.dumps(encoder.config.to_dict()))
    if generator_file is not None:
        metadata["generator"] = generator_file
    state = dict(encoder.state_dict())
    if latent_avg is not None:
        state[LATENT_AVG_KEY] = _latent_avg_rows(latent_avg, encoder.config.num_ws, Path(path))
    save_file(_tensors_for_file(state, half), str(path), metadata=metadata)


def load_e4e(
    path: str | Path, device: str | torch.device = "cpu", generator_path: str | Path | None = None
) -> tuple[Encoder4Editing, Generator, torch.Tensor]:
    """Load (encoder, generator, latent_avg [num_ws, w_dim]) from an official e4e ``.pt`` or our encoder file.

    The generator comes from ``generator_path`` when given, else from the e4e file's ``decoder.*`` half, else
    from the ``generator`` file named in our encoder file's metadata. ``latent_avg`` falls back to the
    generator's w_avg repeated over the layers.
    """
    path = Path(path)
    generator: Generator | None = None
    if _sniff_format(path) == "torch":
        checkpoint = _read_torch(path)  # read once: official e4e files are ~1 GB
        encoder, latent_avg = _encoder_from_torch(checkpoint, path)
        encoder, latent_avg = encoder.to(device).eval(), None if latent_avg is None else latent_avg.to(device)
        if generator_path is None:
            generator, w_avg = _finish_generator(*_generator_from_torch(checkpoint, path), device, path)
        del checkpoint
    else:
        encoder, latent_avg = load_encoder(path, device)
        if generator_path is None:
            named = read_metadata(path).get("generator")
            if named is None:
                raise CheckpointError(f"{path} names no generator file; pass generator_path=")
            generator_path = path.parent / named
    if generator is None:
        assert generator_path is not None
        generator, w_avg = load_generator(generator_path, device)
    num_ws, w_dim = encoder.config.num_ws, encoder.config.w_dim
    if generator.num_ws != num_ws or generator.w_dim != w_dim:
        raise CheckpointError(
            f"encoder {path} predicts [{num_ws}, {w_dim}] codes but the generator "
            f"{generator_path or path} takes [{generator.num_ws}, {generator.w_dim}]"
        )
    if latent_avg is None:
        latent_avg = w_avg.unsqueeze(0).expand(num_ws, -1).contiguous()  # [num_ws, w_dim]
    return encoder, generator, latent_avg
