"""Inference precision on CUDA: bf16 autocast (fp16 where the GPU has no bf16) and channels-last activations.

Only inference uses it (previews and the final render; never pivotal tuning or training) and only on CUDA:
``FLUIDSRV_INFERENCE_PRECISION`` is ``auto`` (the default: bf16, else fp16), ``bf16``, ``fp16`` or ``fp32`` (off).
On a CPU nothing changes: no autocast, and the generator keeps its own CPU layout choice. Callers cast what they
return to float32 (``.float()``) so no half-precision tensor leaves the device code.

What the choice costs in accuracy, measured with CPU autocast on the embedded 128² generator (4 faces, against
fp32): bf16 49 dB PSNR, max |Δ| 0.070 (9 of 255 levels; 4 % of pixels off by more than 2 levels); fp16 67 dB,
max |Δ| 0.007. ``benchmarks/gpu.py`` prints the same comparison on the GPU at 256² and 1024², with the speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
"""The values of ``FLUIDSRV_INFERENCE_PRECISION``."""


def _cuda_bf16_supported() -> bool:
    """Whether the current CUDA device computes in bfloat16 natively (Ampere and newer)."""
    return bool(torch.cuda.is_bf16_supported())


def autocast_dtype(
    device: torch.device | str, precision: str = "auto", bf16_supported: Callable[[], bool] = _cuda_bf16_supported
) -> torch.dtype | None:
    """The autocast dtype for inference on ``device``: None on CPU or with "fp32"; on CUDA "fp16" is float16, and
    "auto" / "bf16" are bfloat16 where the GPU computes it (Ampere and newer), else float16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if torch.device(device).type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    return torch.bfloat16 if bf16_supported() else torch.float16


@contextlib.contextmanager
def inference_autocast(
    device: torch.device | str, precision: str = "auto", bf16_supported: Callable[[], bool] = _cuda_bf16_supported
) -> Iterator[torch.dtype | None]:
    """Run the block under CUDA autocast at :func:`autocast_dtype` (a no-op on CPU or with "fp32"); yields the dtype."""
    dtype = autocast_dtype(device, precision, bf16_supported)
    if dtype is None:
        yield None
        return
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield dtype


def prepare_for_inference(module: nn.Module, device: torch.device | str, precision: str = "auto") -> nn.Module:
    """Switch ``module`` to channels-last activations for CUDA inference (any precision but "fp32"); return it.

    A module with a ``channels_last_on_cuda`` flag (the StyleGAN2 generator: its modulated convolutions build their
    weights per call, so its layout is the one of the activations it starts from) gets the flag set; any other
    module is converted with ``module.to(memory_format=torch.channels_last)``. On CPU, or with "fp32", nothing
    changes.
    """
    if autocast_dtype(device, precision, bf16_supported=lambda: True) is None:
        return module
    if hasattr(module, "channels_last_on_cuda"):
        setattr(module, "channels_last_on_cuda", True)  # noqa: B010 (a plain attribute of the module, not a tensor)
        return module
    return module.to(memory_format=torch.channels_last)
