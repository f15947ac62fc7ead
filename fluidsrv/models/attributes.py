"""A small CNN that estimates age (years) and gender from an aligned face: fluidsrv's own attribute scorer.

It reads FFHQ-aligned faces resized to ``config.input_size`` (64 px by default) and returns the age in years
and a gender logit (positive = male). Small enough to train on a CPU in minutes
(:mod:`fluidsrv.training.attributes`); used to find and measure attribute directions.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

CLASSIFIER_FORMAT = "fluidsrv-attributes"
FORMAT_VERSION = "1"
AGE_SCALE = 10.0  # the age head predicts years / AGE_SCALE (keeps its targets near unit scale)
AGE_OFFSET = 30.0  # ... around this many years
STEM_STRIDE = 4  # the stem is a 4×4 stride-4 conv: the cheapest way down from the input resolution


@dataclass(frozen=True)
class AttributeNetConfig:
    """Architecture of :class:`AttributeNet`; JSON round-trip via :meth:`to_dict` / :meth:`from_dict`."""

    input_size: int = 64  # side of the square input (faces are resized to it)
    widths: tuple[int, ...] = (48, 96, 192)  # stem width (a 4×4 stride-4 "patchify" conv), then stride-2 blocks

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(width) for width in self.widths))
        assert len(self.widths) >= 2 and all(width > 0 for width in self.widths), f"bad widths {self.widths}"
        smallest = STEM_STRIDE * 2 ** (len(self.widths) - 1)
        assert self.input_size % smallest == 0, f"input_size {self.input_size} must be a multiple of {smallest}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict."""
        return {"input_size": self.input_size, "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttributeNetConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        assert not unknown, f"unknown AttributeNetConfig keys: {sorted(unknown)}"
        return cls(input_size=int(data["input_size"]), widths=tuple(data["widths"]))


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel, stride=stride, padding=kernel // 2 if kernel % 2 else 0, bias=False
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class AttributeNet(nn.Module):
    """Stride-4 patchify stem, stride-2 conv blocks, global pooling, two heads: age (years) and a gender logit."""

    def __init__(self, config: AttributeNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or AttributeNetConfig()
        widths = self.config.widths
        layers: list[nn.Module] = [_conv_bn_relu(3, widths[0], stride=STEM_STRIDE, kernel=STEM_STRIDE)]
        for in_width, out_width in itertools.pairwise(widths):
            layers.append(nn.Sequential(_conv_bn_relu(in_width, out_width, 2), _conv_bn_relu(out_width, out_width, 1)))
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], 2)  # [age / AGE_SCALE - offset, gender logit]

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Resize images [N, 3, H, W] in [-1, 1] to the network's input size (area filter when shrinking)."""
        assert images.ndim == 4 and images.shape[1] == 3, f"expected [N, 3, H, W], got {tuple(images.shape)}"
        size = self.config.input_size
        if images.shape[-2:] == (size, size):
            return images
        mode = "area" if images.shape[-1] > size else "bilinear"
        return F.interpolate(images, size=(size, size), mode=mode)  # [N, 3, size, size]

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (age in years [N], gender logit [N], positive = male) for images [N, 3, H, W] in [-1, 1]."""
        x = self.features(self.prepare(images))  # [N, C, h, w]
        out = self.head(x.mean(dim=(2, 3)))  # [N, 2]
        age = out[:, 0] * AGE_SCALE + AGE_OFFSET  # [N]
        return age, out[:, 1]


def save_attribute_net(path: str | Path, net: AttributeNet, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``net`` as fp16 safetensors with its config (and ``metadata``, e.g. held-out metrics)."""
    extra = dict(metadata or {})
    extra.update(format=CLASSIFIER_FORMAT, format_version=FORMAT_VERSION, config=json.dumps(net.config.to_dict()))
    tensors = {
        key: (value.detach().cpu().half() if value.is_floating_point() else value.detach().cpu()).contiguous()
        for key, value in net.state_dict().items()
    }
    save_file(tensors, str(path), metadata=extra)


def load_attribute_net(path: str | Path, device: str | torch.device = "cpu") -> AttributeNet:
    """Load a network written by :func:`save_attribute_net` (float32, eval mode); unmatched keys raise."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    if metadata.get("format") != CLASSIFIER_FORMAT:
        raise ValueError(f"{path}: not a {CLASSIFIER_FORMAT} file (format {metadata.get('format')!r})")
    net = AttributeNet(AttributeNetConfig.from_dict(json.loads(metadata["config"])))
    state = {key: value.float() if value.is_floating_point() else value for key, value in tensors.items()}
    net.load_state_dict(state, strict=True)
    return net.to(device).eval()
