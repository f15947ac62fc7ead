"""The exact hash of a generator that direction files and generator-keyed caches are matched by.

:func:`generator_sha256` is the sha256 of the generator's state dict (names, shapes, dtypes, bytes, buffers
included): direction files record it as ``generator_sha256`` and are used only for that very generator.
Encoder files record something else on purpose: :func:`fluidsrv.encoder_arch.generator_fingerprint`, a short
hash of the parameters rounded to fp16, so that an encoder trained against an fp32 generator still matches the
generator's fp16 file. Each shipped file stores the hash its reader computes.
"""

from __future__ import annotations

import hashlib
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fluidsrv.models.stylegan2 import Generator

_known: weakref.WeakKeyDictionary[torch.nn.Module, str] = weakref.WeakKeyDictionary()


def generator_sha256(generator: Generator) -> str:
    """sha256 (hex) of the generator's state dict: names, shapes, dtypes and bytes; remembered per object.

    Weights changed in place after the first call are not noticed (fine-tuning works on copies).
    """
    known = _known.get(generator)
    if known is not None:
        return known
    digest = hashlib.sha256()
    for name, tensor in sorted(generator.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(data.shape)}:{data.dtype};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    fingerprint = digest.hexdigest()
    _known[generator] = fingerprint
    return fingerprint
