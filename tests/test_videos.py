"""Video writers and the latent-math CLI (fluidsrv mix | morph | loop), decoded back to check the frames."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from fluidsrv.cli import main
from fluidsrv.cli.edit_tools import read_latents, save_latents
from fluidsrv.videos import render_frames, to_uint8_frames, write_gif, write_mp4, write_video
from fluidsrv.weights import save_generator
from tests.model_support import tiny_generator

W_DIM = 16


def gradient_frames(count: int, height: int = 16, width: int = 16) -> np.ndarray:
    frames = np.zeros((count, height, width, 3), dtype=np.uint8)
    for index in range(count):
        frames[index, ..., 0] = np.uint8(255 * index / max(1, count - 1))
        frames[index, ..., 1] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    return frames


def decoded_frames(path: Path) -> np.ndarray:
    if path.suffix == ".gif":
        return iio.imread(path, index=None, mode="RGB")
    return np.stack(list(iio.imiter(path, plugin="FFMPEG")))


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    generator = tiny_generator()
    assert generator.w_dim == W_DIM
    path = tmp_path_factory.mktemp("gen") / "tiny.safetensors"
    save_generator(path, generator, generator.estimate_w_avg(num_samples=200))
    return path


def test_mp4_round_trip(tmp_path: Path) -> None:
    frames = gradient_frames(7)
    decoded = decoded_frames(write_mp4(tmp_path / "a.mp4", frames, fps=10))
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 12  # lossy, but the same pictures


def test_mp4_pads_odd_sizes(tmp_path: Path) -> None:
    decoded = decoded_frames(write_mp4(tmp_path / "odd.mp4", gradient_frames(3, 15, 17)))
    assert decoded.shape == (3, 16, 18, 3)


def test_gif_round_trip_and_loop(tmp_path: Path) -> None:
    frames = gradient_frames(5)
    path = write_gif(tmp_path / "a.gif", frames, fps=20)
    decoded = decoded_frames(path)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames.astype(int)).max() <= 8
    with Image.open(path) as image:
        assert image.info.get("loop") == 0 and image.info.get("duration") == 50


def test_write_video_refuses_other_suffixes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unsupported"):
        write_video(tmp_path / "a.avi", gradient_frames(2))


def test_render_frames_matches_synthesis(generator_file: Path) -> None:
    from fluidsrv.weights import load_generator

    generator, _ = load_generator(generator_file)
    ws = generator.mapping(torch.randn(3, W_DIM))
    frames = render_frames(generator, ws, batch_size=2)
    assert frames.shape == (3, 16, 16, 3) and frames.dtype == np.uint8
    with torch.no_grad():
        np.testing.assert_array_equal(frames, to_uint8_frames(generator.synthesis(ws)))


def test_cli_morph_writes_an_mp4(tmp_path: Path, generator_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "morph.mp4"
    code = main(
        ["morph", "seed:1", "seed:2", "seed:3", "--frames", "4", "--out", str(out), "--generator", str(generator_file)]
    )
    assert code == 0 and "9 frames" in capsys.readouterr().out
    decoded = decoded_frames(out)
    assert decoded.shape == (9, 16, 16, 3)  # (3 faces - 1) transitions x 4 frames + the last face
    assert decoded.std(axis=0).mean() > 1  # the face changes along the way


def test_cli_loop_writes_a_gif(tmp_path: Path, generator_file: Path) -> None:
    out = tmp_path / "loop.gif"
    args = ["loop", "seed:7", "--frames", "6", "--layers", "fine", "--amplitude", "2", "--out", str(out)]
    assert main([*args, "--generator", str(generator_file)]) == 0
    decoded = decoded_frames(out)
    assert decoded.shape == (6, 16, 16, 3)
    assert not np.array_equal(decoded[0], decoded[3])


def test_cli_mix_from_saved_latents(tmp_path: Path, generator_file: Path) -> None:
    from fluidsrv.weights import load_generator

    generator, _ = load_generator(generator_file)
    face_a = tmp_path / "a.safetensors"
    face_b = tmp_path / "b.pt"
    save_latents(face_a, generator.mapping(torch.randn(1, W_DIM)))
    torch.save({"w": torch.randn(1, W_DIM)}, face_b)
    result = tmp_path / "mixed.safetensors"
    image = tmp_path / "mix.png"
    common = ["--generator", str(generator_file), "--out", str(image), "--save-latents", str(result)]
    assert main(["mix", str(face_a), str(face_b), "--layers", "2:4", *common]) == 0
    mixed = read_latents(result, generator.num_ws, W_DIM)
    a, b = read_latents(face_a, generator.num_ws, W_DIM), read_latents(face_b, generator.num_ws, W_DIM)
    assert torch.equal(mixed[:, :2], a[:, :2]) and torch.equal(mixed[:, 2:4], b[:, 2:4])
    assert torch.equal(mixed[:, 4:], a[:, 4:])
    with Image.open(image) as png:
        assert png.size == (16, 16)
    assert main(["mix", str(face_a), str(face_b), "--layers", "all", "--percent", "50", *common]) == 0
    torch.testing.assert_close(read_latents(result, generator.num_ws, W_DIM), (a + b) / 2)


def test_cli_errors_are_readable(tmp_path: Path, generator_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gen = ["--generator", str(generator_file)]
    assert main(["morph", "seed:1", "seed:2", "--out", str(tmp_path / "x.avi"), *gen]) == 2
    assert main(["loop", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "l.gif"), *gen]) == 2
    assert main(["mix", "seed:x", "seed:2", *gen]) == 2
    assert main(["mix", "seed:1", "seed:2", "--layers", "9:99", *gen]) == 2
    err = capsys.readouterr().err
    assert ".mp4 or .gif" in err and "missing.pt" in err and "seed:N" in err and "9:99" in err


def test_cli_directions_list(generator_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["directions", "list", "--source", "sefa", "--option", "k=2", "--generator", str(generator_file)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 6 and lines[0].startswith("sefa:0:2:0")
