"""The preview student: autoencoder + AdaLIN modulator, its file format, the distill step, the plugin and auto."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fluidsrv_plugins.preview_student import StudentPreviewer

from fluidsrv.distill import DistillConfig, StudentRenderer, distill, restore_renderer, sample_edits
from fluidsrv.models.autoencoder import AutoencoderConfig, FaceAutoencoder
from fluidsrv.models.modulator import Modulator, ModulatorConfig
from fluidsrv.models.stylegan2 import Generator
from fluidsrv.runtime import Runtime, build_random_generator, random_generator_config
from fluidsrv.settings import Settings
from fluidsrv.stages import PluginContext, Progress
from fluidsrv.student import Student, StudentConfig, StudentError, load_student, save_student
from fluidsrv.weights import save_generator


def drain(job: Iterator[Progress]) -> tuple[list[Progress], Any]:
    """Run a step job to the end: its progress events and its result."""
    events = []
    try:
        while True:
            events.append(next(job))
    except StopIteration as done:
        return events, done.value


@pytest.fixture(scope="module")
def generator() -> Generator:
    """A 32² random generator of the real architecture."""
    return build_random_generator(random_generator_config(32))


def tiny_student(generator: Generator) -> Student:
    """An untrained student for ``generator`` with narrow layers."""
    torch.manual_seed(0)
    config = StudentConfig(AutoencoderConfig(resolution=32, out_resolution=32, code_channels=64,
                                             widths={4: 32, 8: 32, 16: 16, 32: 8}),
                           ModulatorConfig(code_channels=64, num_ws=generator.num_ws, w_dim=generator.w_dim,
                                           hidden=32, blocks=2, condition=64, adapter_rank=4))
    student = Student(config)
    student.w_avg.copy_(generator.w_avg)
    return student.eval().requires_grad_(False)


def test_autoencoder_shapes_and_default_widths() -> None:
    net = FaceAutoencoder(AutoencoderConfig(resolution=64, out_resolution=32))
    code = net.encode(torch.zeros(2, 3, 64, 64))
    assert code.shape == (2, 512, 4, 4)
    assert net.decode(code).shape == (2, 3, 32, 32)
    assert net.encode(torch.zeros(1, 3, 128, 128)).shape == (1, 512, 4, 4)  # other sides are resized
    config = AutoencoderConfig(resolution=256, out_resolution=256)
    assert config.widths[4] == 256 and config.widths[256] == 12
    assert AutoencoderConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="powers of two"):
        AutoencoderConfig(resolution=100)


def test_untrained_modulator_is_the_identity_and_learns_to_move() -> None:
    modulator = Modulator(ModulatorConfig(code_channels=16, num_ws=4, w_dim=8, hidden=8, blocks=2, condition=16))
    code, delta, w = torch.randn(3, 16, 4, 4), torch.randn(3, 4, 8), torch.randn(3, 8)
    assert torch.equal(modulator(code, delta, w), code)
    target = code + delta.mean(dim=(1, 2))[:, None, None, None]  # a code change that depends on the edit
    optimizer = torch.optim.Adam(modulator.parameters(), lr=1e-2)
    first = last = 0.0
    for step in range(60):
        loss = (modulator(code, delta, w) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first, last = (float(loss) if step == 0 else first), float(loss)
    assert last < 0.2 * first


def test_student_file_round_trip(tmp_path: Path, generator: Generator) -> None:
    student = tiny_student(generator)
    path = tmp_path / "student.safetensors"
    save_student(student, path, generator, {"note": "test"})
    loaded, metadata = load_student(path)
    assert loaded.config == student.config and metadata["note"] == "test"
    for name, tensor in student.state_dict().items():
        assert torch.allclose(loaded.state_dict()[name], tensor.half().float()), name
    assert student.config.suits(generator) is None
    other = build_random_generator(random_generator_config(64))
    assert "codes" in str(student.config.suits(other))
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    with pytest.raises(StudentError):
        load_student(tmp_path / "broken.safetensors")


def test_sample_edits_mixes_at_most_the_allowed_sliders() -> None:
    edits = torch.eye(4)[:, None, :].expand(4, 2, 4).contiguous()  # slider k moves axis k
    deltas = sample_edits(edits, 50, 2, torch.Generator().manual_seed(0))
    moved = (deltas[:, 0].abs() > 0).sum(dim=1)
    assert deltas.shape == (50, 2, 4) and moved.min() >= 1 and moved.max() <= 2
    assert deltas.abs().max() <= 1.0


def test_distill_is_anchored_restorable_and_learns_the_session(generator: Generator) -> None:
    student = tiny_student(generator)
    before = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    ws = generator.mapping(torch.randn(1, generator.w_dim, generator=torch.Generator().manual_seed(1)))
    edits = 0.5 * torch.randn(3, generator.num_ws, generator.w_dim, generator=torch.Generator().manual_seed(2))
    config = DistillConfig(seconds=60.0, max_steps=40, min_steps=2, targets=8, batch=4)
    events, renderer = drain(distill(student, generator, ws, edits, config))
    assert isinstance(renderer, StudentRenderer)
    steps = [event.step for event in events]
    assert steps == [0] * (len(steps) - 40) + list(range(1, 41)) and len(steps) > 40  # encode, render, train
    assert events[-1].total == 40 and all(event.stage == "distill" for event in events)
    for name, tensor in student.state_dict().items():  # the shared student is never written to
        assert torch.equal(tensor, before[name]), name

    with torch.inference_mode():
        exact = generator.synthesis(ws, noise_mode="const").clamp(-1, 1)
        assert torch.allclose(renderer.render(ws), exact, atol=1e-5)  # no edit: the generator's own image
        delta = edits[:1]
        restored = restore_renderer(student, renderer.state_dict(), torch.device("cpu"))
        assert torch.equal(restored.render(ws + delta), renderer.render(ws + delta))
    assert renderer.change_errors is not None
    first, last = renderer.change_errors
    assert last < 0.8 * first  # the session's steps learnt this face's edits


def test_distill_stops_at_its_time_budget(generator: Generator) -> None:
    student = tiny_student(generator)
    ws = generator.mapping(torch.randn(1, generator.w_dim))
    edits = torch.randn(2, generator.num_ws, generator.w_dim)
    events, _ = drain(distill(student, generator, ws, edits, DistillConfig(seconds=0.0, min_steps=3, targets=4)))
    assert events[-1].step == 3 and events[-1].total == 3
    _, renderer = drain(distill(student, generator, ws, edits[:0], DistillConfig()))  # no sliders: no training
    with torch.inference_mode():
        assert renderer.render(ws).shape == (1, 3, 32, 32)


def context(tmp_path: Path, **options: Any) -> PluginContext:
    """A plugin context with an empty weights folder and cache, and ``options``."""
    (tmp_path / "weights").mkdir(exist_ok=True)
    return PluginContext(device=torch.device("cpu"), weights_dir=tmp_path / "weights", cache_dir=tmp_path / "cache",
                         options=options)


def test_previewer_suits_only_the_generator_its_file_was_made_for(tmp_path: Path, generator: Generator) -> None:
    assert "no student weights" in str(StudentPreviewer(context(tmp_path)).suits(generator))
    assert StudentPreviewer(context(tmp_path, untrained="true")).suits(generator) is None
    path = tmp_path / "mine.safetensors"
    save_student(tiny_student(generator), path, generator)
    previewer = StudentPreviewer(context(tmp_path, student=str(path)))
    assert previewer.suits(generator) is None
    other = build_random_generator(random_generator_config(32), seed=5)
    assert "another generator" in str(previewer.suits(other))

    ws = generator.mapping(torch.randn(1, generator.w_dim))
    _, renderer = drain(previewer.fit(generator, ws, torch.randn(2, generator.num_ws, generator.w_dim)))
    with torch.inference_mode():
        again = previewer.restore(generator, renderer.state_dict())
        assert torch.equal(again.render(ws), renderer.render(ws))
    fallback = previewer.restore(generator, {})  # prepared by another previewer: the generator's own renders
    with torch.inference_mode():
        assert torch.equal(fallback.render(ws), generator.synthesis(ws, noise_mode="const"))
    retrained = tiny_student(generator)
    with torch.no_grad():
        retrained.autoencoder.decoder.to_rgb.bias.add_(0.5)
    save_student(retrained, path, generator)  # the file was replaced after the session was tuned
    replaced = StudentPreviewer(context(tmp_path, student=str(path))).restore(generator, renderer.state_dict())
    with torch.inference_mode():
        assert torch.equal(replaced.render(ws), generator.synthesis(ws, noise_mode="const"))
    wider = build_random_generator(random_generator_config(64))
    with pytest.raises(ValueError, match="no student edits"):
        previewer.student_for(wider)


def test_auto_previewer_picks_the_student_made_for_the_generator(tmp_path: Path, generator: Generator) -> None:
    generator_file = tmp_path / "generator.safetensors"
    save_generator(generator_file, generator, generator.w_avg)
    student_file = tmp_path / "student.safetensors"
    save_student(tiny_student(generator), student_file, generator)
    base = {"generator": str(generator_file), "device": "cpu", "data_dir": tmp_path / "data",
            "cache_dir": tmp_path / "cache", "encoder": "project", "directions": "sefa", "segmenter": "landmarks",
            "inpainter": "telea", "detector": "dlib", "previewer": "auto"}
    with_student = Runtime.build(Settings(**base, plugin_options={"previewer.student": {"student": str(student_file)}}))
    assert with_student.active_stages()["previewer"] == "student"
    without = Runtime.build(Settings(**base, plugin_options={"previewer.student": {"student": str(tmp_path / "no")}}))
    assert without.active_stages()["previewer"] == "generator"
    assert "does not exist" in without.skipped_stages()["previewer"]["student"]
    assert Settings(previewer="auto").stage_preferences("previewer") == ["student", "generator"]


def test_train_student_command_writes_a_student_the_server_picks(tmp_path: Path, shard_dir: Path) -> None:
    """A tiny CPU run of ``fluidsrv train student`` (the 1024² run is the same command on a GPU)."""
    from fluidsrv.cli import main

    generator = build_random_generator(random_generator_config(32))
    generator_file = tmp_path / "generator.safetensors"
    save_generator(generator_file, generator, generator.w_avg)
    out = tmp_path / "run"
    code = main(["train", "student", "--generator", str(generator_file), "--data", str(shard_dir), "--out", str(out),
                 "--minutes", "0", "--batch", "2", "--real-batch", "2", "--limit", "8", "--snapshot-steps", "1"])
    assert code == 0
    student, metadata = load_student(out / "student.safetensors")
    assert metadata["train_steps"] == "1" and student.side == 32
    assert student.modulator.delta_scale.item() != 1.0  # set from the sliders' Δws
    assert (out / "samples-0000001.png").is_file() and (out / "state.pt").is_file()
    previewer = StudentPreviewer(context(tmp_path, student=str(out / "student.safetensors")))
    assert previewer.suits(generator) is None
    code = main(["train", "student", "--generator", str(generator_file), "--out", str(out), "--minutes", "0",
                 "--batch", "2", "--snapshot-steps", "1", "--resume"])
    assert code == 0 and load_student(out / "student.safetensors")[1]["train_steps"] == "2"
