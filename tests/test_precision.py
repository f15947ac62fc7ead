"""Inference precision: bf16 (else fp16) autocast and channels-last only on CUDA with "auto"; a CPU stays fp32."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fluidsrv.models.stylegan2 import Generator
from fluidsrv.precision import autocast_dtype, inference_autocast, prepare_for_inference
from plugins.preview_generator import GeneratorPreviewer, GeneratorRenderer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_dtype_choice() -> None:
    def yes() -> bool:
        return True

    def no() -> bool:
        return False

    assert autocast_dtype("cuda", "auto", bf16_supported=yes) is torch.bfloat16
    assert autocast_dtype(torch.device("cuda:1"), "auto", bf16_supported=no) is torch.float16  # e.g. a T4 or V100
    assert autocast_dtype("cuda", "fp16", bf16_supported=yes) is torch.float16
    assert autocast_dtype("cuda", "bf16", bf16_supported=no) is torch.float16
    assert autocast_dtype("cuda", "fp32", bf16_supported=yes) is None
    assert autocast_dtype("cpu", "auto", bf16_supported=yes) is None
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("cpu", "half")


def test_cpu_stays_fp32() -> None:
    layer = nn.Linear(4, 4)
    with inference_autocast("cpu", "auto", bf16_supported=lambda: True) as dtype:
        assert dtype is None and not torch.is_autocast_enabled()
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    conv = nn.Conv2d(3, 4, 3)
    assert prepare_for_inference(conv, "cpu") is conv and conv.weight.is_contiguous()


def test_channels_last_is_set_for_cuda_only(tiny: Generator) -> None:
    generator = Generator(tiny.config)
    prepare_for_inference(generator, "cpu", "auto")
    prepare_for_inference(generator, "cuda", "fp32")
    assert generator.channels_last_on_cuda is False
    prepare_for_inference(generator, "cuda", "auto")  # a flag only: no CUDA is needed to set it
    assert generator.channels_last_on_cuda is True
    conv = prepare_for_inference(nn.Conv2d(3, 4, 3), "cuda", "auto")  # any other module is converted
    assert isinstance(conv, nn.Conv2d) and conv.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_generator_previewer_on_cpu_renders_exactly_in_fp32(tiny: Generator) -> None:
    ws = tiny.mapping(torch.randn(1, tiny.w_dim, generator=torch.Generator().manual_seed(1)))
    renderer = GeneratorPreviewer(precision="auto").restore(tiny, {})
    assert isinstance(renderer, GeneratorRenderer) and renderer.precision == "auto"
    image = renderer.render(ws)
    assert image.dtype == torch.float32 and not tiny.channels_last_on_cuda
    with torch.no_grad():
        torch.testing.assert_close(image, tiny.synthesis(ws), rtol=0, atol=0)
