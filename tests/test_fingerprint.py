"""The two generator hashes: each shipped file stores the one its reader computes, and they differ on purpose."""

from __future__ import annotations

import pytest

from fluidsrv.direction_files import load_directions
from fluidsrv.encoder_arch import FINGERPRINT_KEY, generator_fingerprint
from fluidsrv.fingerprint import generator_sha256
from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR
from fluidsrv.weights import load_generator, read_metadata
from tests.model_support import tiny_generator

SHIPPED_GENERATOR = EMBEDDED_WEIGHTS_DIR / "generator-128.safetensors"
SHIPPED_DIRECTIONS = EMBEDDED_WEIGHTS_DIR / "directions-128.safetensors"
SHIPPED_ENCODER = EMBEDDED_WEIGHTS_DIR / "encoder-128.safetensors"


@pytest.mark.skipif(
    not all(path.is_file() for path in (SHIPPED_GENERATOR, SHIPPED_DIRECTIONS, SHIPPED_ENCODER)),
    reason="no shipped weights",
)
def test_the_shipped_files_record_the_hash_their_reader_computes() -> None:
    generator, _ = load_generator(SHIPPED_GENERATOR)
    _, directions_metadata = load_directions(SHIPPED_DIRECTIONS)
    assert directions_metadata["generator_sha256"] == generator_sha256(generator)
    assert read_metadata(SHIPPED_ENCODER)[FINGERPRINT_KEY] == generator_fingerprint(generator)


def test_the_exact_hash_sees_fp16_rounding_and_the_encoder_fingerprint_does_not() -> None:
    generator = tiny_generator(seed=0)
    rounded = tiny_generator(seed=1)
    rounded.load_state_dict({key: value.half().float() for key, value in generator.state_dict().items()})
    assert generator_fingerprint(rounded) == generator_fingerprint(generator)
    assert generator_sha256(rounded) != generator_sha256(generator)
