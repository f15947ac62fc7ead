"""The preview student: an autoencoder and a modulator that imitate one generator's edits, and its file format.

A :class:`Student` renders an edit of a face in one modulator + decoder pass: ``decode(modulate(code, Δw, w))``
where ``code`` is the autoencoder's code of the face, ``Δw`` [num_ws, w_dim] the slider change of ws and ``w``
the face's mean w (centred on the generator's ``w_avg``). One student is trained per generator (see
:mod:`fluidsrv.training.student`) and tuned per session (see :mod:`fluidsrv.distill`).

Files are safetensors (fp16) whose metadata holds ``format`` = :data:`STUDENT_FORMAT`, the config as JSON and the
fingerprint of the generator it was trained for (:func:`fluidsrv.encoder_arch.generator_fingerprint`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fluidsrv.encoder_arch import FINGERPRINT_KEY
from fluidsrv.models.autoencoder import AutoencoderConfig, FaceAutoencoder
from fluidsrv.models.modulator import Modulator, ModulatorConfig
from fluidsrv.models.stylegan2 import Generator

STUDENT_FORMAT = "fluidsrv-student"
MAX_STUDENT_SIDE = 256  # a student sees and draws faces at most this large (1024² generators: 256²)


class StudentError(ValueError):
    """A student file is unreadable or does not fit the generator."""


@dataclass(frozen=True)
class StudentConfig:
    """The shapes of a student's autoencoder and modulator."""

    autoencoder: AutoencoderConfig
    modulator: ModulatorConfig

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {"autoencoder": self.autoencoder.to_dict(), "modulator": self.modulator.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudentConfig:
        """Build from :meth:`to_dict` output."""
        return cls(AutoencoderConfig.from_dict(data["autoencoder"]), ModulatorConfig.from_dict(data["modulator"]))

    def suits(self, generator: Generator) -> str | None:
        """Why this student cannot imitate ``generator`` (its ws shape differs), or None when it can."""
        modulator = self.modulator
        if (modulator.num_ws, modulator.w_dim) != (generator.num_ws, generator.w_dim):
            return (f"the student edits [{modulator.num_ws}, {modulator.w_dim}] codes; the generator has "
                    f"[{generator.num_ws}, {generator.w_dim}]")
        return None


def student_config_for(generator: Generator) -> StudentConfig:
    """The default student shape for ``generator``: faces at min(resolution, 256)², a 512×4×4 code."""
    side = min(generator.resolution, MAX_STUDENT_SIDE)
    return StudentConfig(
        AutoencoderConfig(resolution=side, out_resolution=side),
        ModulatorConfig(num_ws=generator.num_ws, w_dim=generator.w_dim))


class Student(nn.Module):
    """The autoencoder, the modulator and the generator's ``w_avg`` the modulator's w input is centred on."""

    w_avg: torch.Tensor

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config
        self.autoencoder = FaceAutoencoder(config.autoencoder)
        self.modulator = Modulator(config.modulator)
        self.register_buffer("w_avg", torch.zeros(config.modulator.w_dim))

    @property
    def side(self) -> int:
        """The side of the faces the student draws."""
        return self.config.autoencoder.out_resolution

    def to_student_side(self, image: torch.Tensor) -> torch.Tensor:
        """Resize images [N, 3, H, W] to the student's output side (area-like, antialiased)."""
        side = self.side
        if image.shape[-1] == side and image.shape[-2] == side:
            return image
        return F.interpolate(image, size=(side, side), mode="bilinear", antialias=True, align_corners=False)

    def face_w(self, ws: torch.Tensor) -> torch.Tensor:
        """The modulator's w input of faces ``ws`` [N, num_ws, w_dim]: their mean w minus ``w_avg``: [N, w_dim]."""
        return ws.mean(dim=1) - self.w_avg

    def edit(self, code: torch.Tensor, delta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Images [N, 3, S, S] of codes [N, C, 4, 4] edited by ``delta`` [N, num_ws, w_dim] (``w`` [N, w_dim])."""
        return self.autoencoder.decode(self.modulator(code, delta, w))

    def forward(self, code: torch.Tensor, delta: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`edit` (so ``torch.func.functional_call`` can run it with substituted tensors)."""
        return self.edit(code, delta, w)


def save_student(student: Student, path: Path, generator: Generator, extra: Mapping[str, str] | None = None) -> None:
    """Write ``student`` (fp16) for ``generator`` to ``path`` (atomically)."""
    from fluidsrv.encoder_arch import generator_fingerprint

    tensors = {name: tensor.detach().to("cpu", torch.float16).contiguous()
               for name, tensor in student.state_dict().items()}
    metadata = {"format": STUDENT_FORMAT, "config": json.dumps(student.config.to_dict()),
                FINGERPRINT_KEY: generator_fingerprint(generator), **dict(extra or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # a killed writer leaves no torn student file
    save_file(tensors, str(partial), metadata=metadata)
    os.replace(partial, path)


def read_student_metadata(path: Path) -> dict[str, str]:
    """The metadata of a student file; StudentError when it is not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
    except Exception as error:  # safetensors raises several types for a broken file
        raise StudentError(f"{path} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != STUDENT_FORMAT:
        raise StudentError(f"{path} is not a fluidsrv student (format={metadata.get('format')!r})")
    return metadata


def load_student(path: Path, device: torch.device | str = "cpu") -> tuple[Student, dict[str, str]]:
    """Load a student file (fp32 on ``device``, eval mode, frozen) and its metadata."""
    metadata = read_student_metadata(path)
    tensors = load_file(str(path))
    try:
        student = Student(StudentConfig.from_dict(json.loads(metadata["config"])))
        student.load_state_dict({name: tensor.float() for name, tensor in tensors.items()}, strict=True)
    except (KeyError, ValueError, RuntimeError) as error:
        raise StudentError(f"{path}: the student does not match its config: {error}") from error
    return student.to(device).eval().requires_grad_(False), metadata
