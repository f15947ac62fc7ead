"""``fluidsrv edit``: upload → prepare → sliders → finalize through the editing service, from the command line.

Every run uses the small fast configuration of the server tests (a random 32² generator, the ``project`` encoder
with a few steps, a 3-step low-rank fine-tune), passed as FLUIDSRV_* variables as a user would.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from fluidsrv.cli import main
from fluidsrv.cli.edit import JobProgressLine
from fluidsrv.session.model import JobProgress
from tests.server_support import SMALL_PHOTO, gradient_image, png_bytes, small_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
SETTING_NAMES = ("generator", "device", "detector", "encoder", "directions", "segmenter", "inpainter", "previewer",
                 "finetune", "finetune_steps")
COARSE_1 = "sefa:0:2:0"  # the first SeFa direction of the coarse layers (0-2 of the 32² generator's 8)


def small_environment(folder: Path) -> dict[str, str]:
    """FLUIDSRV_* variables for server_support.small_settings, w+ steps cut too (the projector's default is 200)."""
    settings = small_settings(folder)
    variables = {f"FLUIDSRV_{name.upper()}": str(getattr(settings, name)) for name in SETTING_NAMES}
    options = {**settings.plugin_options, "encoder.project": {**settings.plugin_options["encoder.project"],
                                                             "wplus_steps": 4}}
    variables["FLUIDSRV_PLUGIN_OPTIONS"] = json.dumps(options)
    variables["FLUIDSRV_CACHE_DIR"] = str(settings.cache_dir)
    return variables


@pytest.fixture
def small_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, str]:
    """Only the small configuration's FLUIDSRV_* variables are set (the test-data ones stay)."""
    for name in list(os.environ):
        if name.startswith("FLUIDSRV_") and name not in ("FLUIDSRV_SHARED", "FLUIDSRV_REQUIRE_SHARED"):
            monkeypatch.delenv(name)
    variables = small_environment(tmp_path)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return variables


@pytest.fixture
def photo(shared_dir: Path) -> Path:
    """A small real photo with one face."""
    return shared_dir / "photos" / SMALL_PHOTO


def test_edit_writes_a_jpeg_of_the_photos_size(
    small_env: dict[str, str], photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    out = tmp_path / "edited.jpg"
    # one slider by its label (any case), one by its name
    status = main(["edit", str(photo), "--slider", "seFa COARSE 2=1.5", "--slider", f"{COARSE_1.upper()}=-2",
                   "-o", str(out)])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    with Image.open(out) as edited, Image.open(photo) as original:
        assert edited.format == "JPEG"
        assert edited.size == ImageOps.exif_transpose(original).size
    assert f"wrote {out}" in captured.out and "sefa:0:2:1=+1.5" in captured.out and f"{COARSE_1}=-2" in captured.out
    # not a terminal: plain progress lines, each stage ending on its last step
    lines = captured.err.splitlines()
    assert "\r" not in captured.err
    for stage, last in (("align", "1/1"), ("project", "10/10"), ("finetune", "3/3"), ("finalize", "3/3")):
        assert any(line.startswith(stage) and f"] {last}" in line for line in lines), (stage, captured.err)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--slider", "nonsense=1"], f"unknown slider 'nonsense'; available sliders: SeFa coarse 1 ({COARSE_1})"),
        (["--slider", f"{COARSE_1}=lots"], f"--slider '{COARSE_1}=lots': 'lots' is not a number"),
        (["--slider", f"{COARSE_1}=9"], f"--slider {COARSE_1}=9: SeFa coarse 1 ({COARSE_1}) goes from -3 to 3"),
        (["--face", "3"], "--face 3: deepface_img12.jpg has 1 face(s) (face 0; --list-faces shows them)"),
    ],
    ids=["unknown-slider", "not-a-number", "out-of-range", "face-out-of-range"],
)
def test_bad_sliders_and_faces_exit_2_before_any_work(
    small_env: dict[str, str], photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    arguments: list[str], message: str,
) -> None:
    out = tmp_path / "edited.jpg"
    assert main(["edit", str(photo), *arguments, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"fluidsrv: error: {message}" in err
    assert "Traceback" not in err and "align" not in err  # refused before preparing
    assert not out.exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["{missing}", "-o", "{out}"], "cannot read {missing}: No such file or directory"),
        (["{photo}"], "say where to write the result with -o OUT.jpg"),
        (["{photo}", "-o", "{tmp}/edited.png"], "the result is a JPEG; give a name ending in .jpg or .jpeg"),
        (["{photo}", "-o", "{tmp}/absent/edited.jpg"], "the folder {tmp}/absent does not exist"),
        (["{photo}", "--slider", "age", "-o", "{out}"], "--slider wants NAME=VALUE, got 'age'"),
    ],
    ids=["missing-photo", "no-output", "not-jpeg", "no-folder", "no-value"],
)
def test_bad_arguments_exit_2_at_once(
    small_env: dict[str, str], photo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    arguments: list[str], message: str,
) -> None:
    names = {"missing": tmp_path / "absent.jpg", "out": tmp_path / "edited.jpg", "photo": photo, "tmp": tmp_path}
    assert main(["edit", *(argument.format(**names) for argument in arguments)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fluidsrv: error: ") and message.format(**names) in err and "Traceback" not in err


def test_a_photo_without_a_face_exits_2(
    small_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blank = tmp_path / "gradient.png"
    blank.write_bytes(png_bytes(gradient_image()))
    assert main(["edit", str(blank), "--slider", f"{COARSE_1}=1", "-o", str(tmp_path / "edited.jpg")]) == 2
    err = capsys.readouterr().err
    assert f"fluidsrv: error: {blank}: no face was found in this photo" in err and "Traceback" not in err


def test_list_faces_numbers_them_left_to_right(
    small_env: dict[str, str], shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["edit", str(shared_dir / "photos" / "couple.jpg"), "--list-faces", "--list-sliders"]) == 0
    output = capsys.readouterr().out
    assert "couple.jpg: 2280x1588, 2 face(s), numbered left to right" in output
    lefts = [float(line.split("box (")[1].split(",")[0]) for line in output.splitlines() if "box (" in line]
    assert len(lefts) == 2 and lefts == sorted(lefts)
    assert "12 slider(s), by name or label:" in output
    assert any(line.split() == [COARSE_1, "SeFa", "coarse", "1", "[-3,", "3]", "More", "sliders"]
               for line in output.splitlines())


def test_the_module_exits_2_with_the_sliders_and_no_traceback(small_env: dict[str, str], photo: Path,
                                                               tmp_path: Path) -> None:
    command = [sys.executable, "-m", "fluidsrv", "edit", str(photo), "--slider", "Age=2", "-o",
               str(tmp_path / "edited.jpg")]
    done = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "fluidsrv: error: unknown slider 'Age'; available sliders: SeFa coarse 1" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------- progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_redraws_in_place_on_a_terminal() -> None:
    terminal = FakeTerminal()
    line = JobProgressLine(terminal, width=10)
    for step in range(1, 5):
        line.update(JobProgress("project", step, 4, f"w {step}/4 mse 0.{9 - step}"))
    line.update(JobProgress("finalize", 3, 3, "encoded"))
    line.close()
    text = terminal.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")
    drawn = text.rstrip("\n").split("\r")[1:]
    assert drawn[0].startswith("project   [##--------] 1/4 w 1/4")
    assert drawn[-1].startswith("finalize  [##########] 3/3 encoded")
    assert len(drawn[-1]) >= len(drawn[-2])  # padded over the longer line before it


def test_the_progress_is_plain_lines_elsewhere() -> None:
    log = io.StringIO()
    line = JobProgressLine(log, width=10)
    for step in range(1, 101):
        line.update(JobProgress("project", step, 100))
    line.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 11 and lines[0].endswith("1/100") and lines[-1] == "project   [##########] 100/100"
