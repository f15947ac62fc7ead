"""Checkpoint files of a training run folder, shared by the GAN and the encoder trainers.

A checkpoint is ``checkpoint-SSSSSSS.safetensors`` (the networks in fp16, with the training config and counters
in its metadata) plus a sibling ``checkpoint-SSSSSSS-optim.safetensors`` holding the Adam state worth keeping:
the second moments in bf16 (fp32's range: squared gradients underflow fp16) and the step counts; first moments
only where a trainer asks for them. Files are written under a temporary name and renamed, so a run killed
mid-write leaves no torn file. Each file should stay within :data:`CHECKPOINT_BUDGET_BYTES`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
CHECKPOINT_GLOB = "checkpoint-*[0-9].safetensors"
CHECKPOINT_BUDGET_BYTES = 16 * 2**20
"""Largest checkpoint (and optimizer-state) file: the most a remote GPU run can hand back per file."""

ModulePart = tuple[str, nn.Module]
"""A network and the key prefix of its tensors in a checkpoint, e.g. ``("G", generator)``."""

OptimizerPart = tuple[str, nn.Module, torch.optim.Adam]
"""A network, its key prefix and the Adam optimizer of its parameters."""


# ------------------------------------------------------------------------------------------ file names


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Return the checkpoint file of ``step`` in a run folder."""
    return Path(run_dir) / f"checkpoint-{step:07d}.safetensors"


def optimizer_path(checkpoint: Path) -> Path:
    """Return the optimizer-state file that belongs to a checkpoint file."""
    return checkpoint.with_name(checkpoint.stem + "-optim.safetensors")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Return the newest ``checkpoint-*.safetensors`` of a run folder (by step), or None."""
    candidates = sorted(Path(run_dir).glob(CHECKPOINT_GLOB))
    return candidates[-1] if candidates else None


def resume_checkpoint(resume: Path) -> Path:
    """Return the checkpoint ``resume`` names: the file itself, or a run folder's newest checkpoint.

    Raises FileNotFoundError when there is no such checkpoint.
    """
    path = latest_checkpoint(resume) if Path(resume).is_dir() else Path(resume)
    if path is None or not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from in {resume}")
    return path


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of a run folder, with their optimizer files."""
    assert keep >= 1, keep
    for old in sorted(Path(run_dir).glob(CHECKPOINT_GLOB))[:-keep]:
        old.unlink()
        optimizer_path(old).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------ safetensors IO


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file under a temporary name and rename it, so a killed run leaves no torn file."""
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return all tensors and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
    return tensors, metadata


def read_metadata(path: Path) -> dict[str, str]:
    """Return the metadata of a safetensors file without reading its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _check_format(path: Path, metadata: dict[str, str], checkpoint_format: str) -> dict[str, str]:
    if metadata.get("format") != checkpoint_format:
        raise ValueError(f"{path} is not a {checkpoint_format} file (format={metadata.get('format')!r})")
    return metadata


def read_checkpoint(path: Path, checkpoint_format: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return the tensors and metadata of a checkpoint; ValueError unless its format is ``checkpoint_format``."""
    tensors, metadata = read_safetensors(Path(path))
    return tensors, _check_format(path, metadata, checkpoint_format)


def read_checkpoint_metadata(path: Path, checkpoint_format: str) -> dict[str, str]:
    """Return the metadata of a checkpoint; ValueError unless its format is ``checkpoint_format``."""
    return _check_format(path, read_metadata(Path(path)), checkpoint_format)


# ------------------------------------------------------------------------------------------ networks


def half_state(parts: Sequence[ModulePart]) -> dict[str, torch.Tensor]:
    """The state dicts of the networks under their prefixes, floating-point tensors in fp16, on the CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in parts:
        for key, value in module.state_dict().items():
            value = value.detach().cpu()
            tensors[f"{prefix}.{key}"] = (value.half() if value.is_floating_point() else value).contiguous()
    return tensors


def load_state(parts: Sequence[ModulePart], tensors: dict[str, torch.Tensor]) -> None:
    """Load the networks from :func:`half_state` tensors (floating-point ones back in fp32), strictly."""
    for prefix, module in parts:
        state = {
            key[len(prefix) + 1 :]: value.float() if value.is_floating_point() else value
            for key, value in tensors.items()
            if key.startswith(prefix + ".")
        }
        module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------------ Adam state


def adam_moments(parts: Sequence[OptimizerPart], first_moments: bool = False) -> dict[str, torch.Tensor]:
    """The Adam state worth keeping, by parameter name: bf16 second moments, steps (and bf16 first moments)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module, optimizer in parts:
        for name, param in module.named_parameters():
            state = optimizer.state.get(param)
            if not state:
                continue
            key = f"{prefix}.{name}"
            out[f"{key}.exp_avg_sq"] = state["exp_avg_sq"].detach().to("cpu", torch.bfloat16).contiguous()
            out[f"{key}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).detach().cpu().reshape(())
            if first_moments:
                out[f"{key}.exp_avg"] = state["exp_avg"].detach().to("cpu", torch.bfloat16).contiguous()
    return out


def restore_adam_moments(parts: Sequence[OptimizerPart], moments: dict[str, torch.Tensor]) -> None:
    """Load :func:`adam_moments` into the optimizers; first moments not stored restart at zero."""
    for prefix, module, optimizer in parts:
        names = {id(param): name for name, param in module.named_parameters()}
        (group,) = optimizer.param_groups
        state: dict[int, dict[str, torch.Tensor]] = {}
        for index, param in enumerate(group["params"]):
            key = f"{prefix}.{names[id(param)]}"
            if f"{key}.exp_avg_sq" not in moments:
                continue
            second = moments[f"{key}.exp_avg_sq"].float()
            assert second.shape == param.shape, f"{key}: optimizer state {tuple(second.shape)} vs {tuple(param.shape)}"
            first = moments.get(f"{key}.exp_avg")
            state[index] = {
                "step": moments[f"{key}.step"].float(),
                "exp_avg": torch.zeros_like(second) if first is None else first.float(),
                "exp_avg_sq": second,
            }
        saved = optimizer.state_dict()
        saved["state"] = state
        optimizer.load_state_dict(saved)


# ------------------------------------------------------------------------------------------ whole checkpoints


def write_checkpoint(
    path: Path,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    optimizers: Sequence[OptimizerPart],
    formats: tuple[str, str],
    first_moments: bool = False,
) -> tuple[Path, Path]:
    """Write a checkpoint and its optimizer file (``formats``: their format names); return both paths.

    ``metadata`` is stored after the format name and version. Files over the budget are written with a warning.
    """
    checkpoint_format, optimizer_format = formats
    path = Path(path)
    atomic_save(tensors, path, {"format": checkpoint_format, "format_version": FORMAT_VERSION, **metadata})
    optim = optimizer_path(path)
    moments = adam_moments(optimizers, first_moments)
    atomic_save(moments, optim, {"format": optimizer_format, "format_version": FORMAT_VERSION})
    for written in (path, optim):
        if written.stat().st_size > CHECKPOINT_BUDGET_BYTES:
            log.warning("%s is %.1f MiB, over the 16 MiB checkpoint budget", written, written.stat().st_size / 2**20)
    return path, optim


def restore_optimizers(checkpoint: Path, optimizers: Sequence[OptimizerPart]) -> None:
    """Load a checkpoint's optimizer file into ``optimizers``; keep fresh Adam moments (with a warning) without one."""
    optim = optimizer_path(Path(checkpoint))
    if not optim.exists():
        log.warning("no optimizer state %s: resuming with fresh Adam moments", optim)
        return
    moments, _ = read_safetensors(optim)
    restore_adam_moments(optimizers, moments)
