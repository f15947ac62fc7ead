import io

import numpy as np
import torch
from PIL import Image

from fluidsrv.convert import encode_preview, image_to_tensor, tensor_to_image


def test_round_trip_is_exact_for_uint8() -> None:
    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 17, 23) and tensor.dtype == torch.float32
    assert float(tensor.min()) >= -1.0 and float(tensor.max()) <= 1.0
    assert np.array_equal(tensor_to_image(tensor), image)


def test_out_of_range_values_are_clamped() -> None:
    tensor = torch.tensor([-3.0, 0.0, 3.0]).view(1, 3, 1, 1)
    assert tensor_to_image(tensor).reshape(-1).tolist() == [0, 128, 255]


def test_preview_encoding() -> None:
    image = np.full((64, 64, 3), 200, np.uint8)
    for image_format, pil_name in (("webp", "WEBP"), ("jpeg", "JPEG")):
        decoded = Image.open(io.BytesIO(encode_preview(image, image_format)))
        assert decoded.format == pil_name and decoded.size == (64, 64)
