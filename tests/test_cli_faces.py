"""``fluidsrv faces``: printing the faces of a photo and saving their aligned crops."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluidsrv.cli import main

FACE_LINE = re.compile(
    r"#(\d+)\s+box \((-?\d+), (-?\d+), (\d+), (\d+)\)\s+(\d+)x(\d+) px\s+score (-?[\d.]+)\s+landmarks (\d+)"
)


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run with an empty weights cache and no detector setting from the environment."""
    monkeypatch.setenv("FLUIDSRV_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLUIDSRV_DETECTOR", raising=False)


def face_lines(output: str) -> list[re.Match[str]]:
    return [match for line in output.splitlines() if (match := FACE_LINE.search(line))]


def test_faces_prints_every_face_numbered_left_to_right(shared_dir: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["faces", str(shared_dir / "photos" / "couple.jpg")]) == 0
    output = capsys.readouterr().out
    assert "couple.jpg: 2280x1588, 2 face(s) by dlib" in output
    lines = face_lines(output)
    assert [int(line[1]) for line in lines] == [0, 1]
    assert all(int(line[9]) == 68 for line in lines)
    lefts = [int(line[2]) for line in lines]
    assert lefts == sorted(lefts) and lefts[0] < lefts[1]


def test_faces_saves_inner_outer_crops_and_overlay(
    shared_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    photo = shared_dir / "photos" / "deepface_img5.jpg"
    out = tmp_path / "aligned"
    assert main(["faces", str(photo), "--save-aligned", str(out), "--size", "128"]) == 0
    output = capsys.readouterr().out
    count = len(face_lines(output))
    assert count >= 1
    for index in range(count):
        with Image.open(out / f"deepface_img5_face{index}_inner.png") as inner:
            assert inner.size == (128, 128) and inner.mode == "RGB"
        with Image.open(out / f"deepface_img5_face{index}_outer.png") as outer:
            assert outer.size == (192, 192)
            # The outer crop's centre is the inner crop (same centre, same pixel scale).
            middle = np.asarray(outer)[32:160, 32:160].astype(np.float64)
        with Image.open(out / f"deepface_img5_face{index}_inner.png") as inner:
            assert np.abs(middle - np.asarray(inner)).mean() < 3.0
    with Image.open(photo) as original, Image.open(out / "deepface_img5_overlay.png") as overlay:
        assert overlay.size == original.size
        changed = np.any(np.asarray(overlay) != np.asarray(original.convert("RGB")), axis=2)
        assert 0.001 < changed.mean() < 0.5  # boxes, points and quads are drawn, the photo stays visible
    assert f"wrote {out / 'deepface_img5_overlay.png'}" in output


def test_faces_with_yunet_and_an_explicit_model(shared_dir: Path, capsys: pytest.CaptureFixture[str]):
    model = shared_dir / "weights" / "yunet_s_640_640.onnx"
    photo = shared_dir / "photos" / "multiface.jpg"
    assert main(["faces", str(photo), "--detector", "yunet", "--option", f"model={model}"]) == 0
    lines = face_lines(capsys.readouterr().out)
    assert len(lines) >= 5
    assert all(int(line[9]) == 5 and 0 < float(line[8]) <= 1 for line in lines)


def test_faces_reports_an_unavailable_detector(shared_dir: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["faces", str(shared_dir / "photos" / "couple.jpg"), "--detector", "yunet"]) == 2
    error = capsys.readouterr().err
    assert "unavailable" in error and "YuNet" in error


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--detector", "nosuch"], "nosuch: unknown"),
        (["--option", "novalue"], "KEY=VALUE"),
        (["--size", "4"], "--size"),
    ],
)
def test_faces_refuses_bad_arguments(
    shared_dir: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
):
    assert main(["faces", str(shared_dir / "photos" / "deepface_img12.jpg"), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_faces_refuses_a_missing_or_broken_photo(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["faces", str(tmp_path / "absent.jpg")]) == 2
    assert "absent.jpg" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    assert main(["faces", str(broken)]) == 2
    assert "broken.jpg" in capsys.readouterr().err
