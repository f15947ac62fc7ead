"""BiSeNet face parsing: the checkpoint's key layout, the conformance golden, strict loading and the plugin."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pluggy
import pytest
import torch
from fluidsrv_plugins import segment_bisenet
from fluidsrv_plugins.segment_bisenet import (
    FACE_CLASSES,
    PARTS,
    BiSeNetSegmenter,
    class_groups,
    load_bisenet,
)

from fluidsrv import hookspecs
from fluidsrv.models.bisenet import CELEBAMASK_HQ_LABELS, N_CLASSES, BiSeNet
from fluidsrv.plugins import DEFAULT_PLUGINS, StageCatalog
from fluidsrv.stages import PluginContext, PluginFactory, Segmenter
from fluidsrv.weights import CheckpointError
from tests.model_support import recipe_weights

CHECKPOINT_FILE = "79999_iter.pth"


def _manifest(fixtures_dir: Path) -> dict[str, list[int]]:
    manifest: dict[str, list[int]] = json.loads((fixtures_dir / "bisenet_faceparsing_19.json").read_text())
    return manifest


@pytest.fixture(scope="module")
def recipe_network(fixtures_dir: Path) -> BiSeNet:
    network = BiSeNet()
    network.load_state_dict(recipe_weights(_manifest(fixtures_dir)), strict=True)
    return network.eval()


@pytest.fixture()
def checkpoint(tmp_path: Path, recipe_network: BiSeNet) -> Path:
    """A checkpoint file in the layout of 79999_iter.pth (a plain state dict), in a fresh cache folder."""
    path = tmp_path / "cache" / CHECKPOINT_FILE
    path.parent.mkdir()
    torch.save(recipe_network.state_dict(), path)
    return path


def make_context(cache_dir: Path, **options: Any) -> PluginContext:
    return PluginContext(torch.device("cpu"), Path("weights"), cache_dir, options)


def bisenet_factory() -> PluginFactory[Segmenter]:
    (factory,) = segment_bisenet.fluidsrv_segmenters()
    return factory


def make_catalog(context: PluginContext) -> StageCatalog:
    """A catalog with only this plugin registered (other plugins are not under test here)."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(segment_bisenet)
    return StageCatalog(pm, context)


# --- the network ---------------------------------------------------------------------------------------


def test_network_has_exactly_the_checkpoint_keys_in_order(fixtures_dir: Path) -> None:
    expected = _manifest(fixtures_dir)
    with torch.device("meta"):
        network = BiSeNet(N_CLASSES)
    actual = {key: list(tensor.shape) for key, tensor in network.state_dict().items()}
    assert set(actual) == set(expected), (sorted(set(actual) - set(expected)), sorted(set(expected) - set(actual)))
    assert actual == expected
    assert list(actual) == list(expected)  # same order too: the golden recipe seeds by position


def test_golden_logits(fixtures_dir: Path, recipe_network: BiSeNet) -> None:
    golden = torch.load(fixtures_dir / "bisenet_golden.pt", weights_only=True)
    with torch.no_grad():
        logits = recipe_network(golden["input"].float())  # [1, 19, 128, 128]
    expected = golden["logits"]
    assert logits.shape == expected.shape == (1, 19, 128, 128)
    assert (logits - expected).abs().max().item() <= 1e-3
    assert expected.abs().max().item() > 0.1  # the golden is not trivially zero


def test_auxiliary_heads_share_the_main_prediction(recipe_network: BiSeNet) -> None:
    images = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        main, aux8, aux16 = recipe_network.forward_all(images)
        alone = recipe_network(images)
    assert main.shape == aux8.shape == aux16.shape == (2, N_CLASSES, 32, 64)
    assert torch.equal(main, alone)
    assert not torch.allclose(main, aux8)


# --- loading -------------------------------------------------------------------------------------------


def test_load_bisenet_reads_a_plain_state_dict(checkpoint: Path, recipe_network: BiSeNet) -> None:
    network = load_bisenet(checkpoint)
    assert not network.training
    for key, value in recipe_network.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key


def test_load_bisenet_names_unexpected_and_missing_keys(tmp_path: Path, recipe_network: BiSeNet) -> None:
    state = dict(recipe_network.state_dict())
    state["sp.conv1.conv.weight"] = torch.zeros(64, 3, 7, 7)
    del state["conv_out.conv_out.weight"]
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"sp\.conv1\.conv\.weight") as caught:
        load_bisenet(path)
    assert "conv_out.conv_out.weight" in str(caught.value)


def test_load_bisenet_refuses_pickled_code(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (print, ("this must never run",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"cp.resnet.conv1.weight": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        load_bisenet(path)


# --- the segmenter -------------------------------------------------------------------------------------


def test_class_grouping_follows_the_celebamask_hq_order() -> None:
    assert len(CELEBAMASK_HQ_LABELS) == N_CLASSES
    assert CELEBAMASK_HQ_LABELS[1] == "skin" and CELEBAMASK_HQ_LABELS[17] == "hair"
    groups = class_groups()
    assert groups["face"] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]
    assert groups["hair"] == [17]
    # PARTS is a partition: every class exactly once
    covered = sorted(index for name in PARTS for index in groups[name])
    assert covered == list(range(N_CLASSES))
    assert set(FACE_CLASSES) <= set(CELEBAMASK_HQ_LABELS)


def test_parse_returns_class_probabilities_grouped(recipe_network: BiSeNet) -> None:
    segmenter = BiSeNetSegmenter(recipe_network, input_size=64)
    image = np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    masks = segmenter.parse(image)
    assert {"face", "hair", "background", "neck", "head", "mouth"} <= set(masks)
    for name, mask in masks.items():
        assert mask.shape == (48, 80) and mask.dtype == np.float32, name
        assert mask.min() >= 0.0 and mask.max() <= 1.0, name
    total = sum(masks[name] for name in PARTS)
    np.testing.assert_allclose(total, 1.0, atol=1e-4)
    np.testing.assert_allclose(masks["head"], np.clip(masks["face"] + masks["hair"], 0, 1), atol=1e-4)


def test_face_mask_is_the_softmax_mass_of_the_face_classes(recipe_network: BiSeNet) -> None:
    segmenter = BiSeNetSegmenter(recipe_network, input_size=64)
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # no resizing at 64²
    masks = segmenter.parse(image)
    probabilities = segmenter.probabilities(image).numpy()  # [19, 64, 64]
    np.testing.assert_allclose(masks["face"], probabilities[[1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13]].sum(0), atol=1e-5)
    np.testing.assert_allclose(masks["hair"], probabilities[17], atol=1e-5)
    np.testing.assert_allclose(masks["ears"], probabilities[7] + probabilities[8], atol=1e-5)


def test_parse_refuses_images_that_are_not_uint8_rgb(recipe_network: BiSeNet) -> None:
    segmenter = BiSeNetSegmenter(recipe_network, input_size=64)
    with pytest.raises(ValueError, match="uint8 RGB"):
        segmenter.parse(np.zeros((32, 32), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 RGB"):
        segmenter.parse(np.zeros((32, 32, 3), dtype=np.float32))


# --- the plugin ----------------------------------------------------------------------------------------


def test_plugin_is_registered_and_unavailable_without_its_checkpoint(tmp_path: Path) -> None:
    assert "fluidsrv_plugins.segment_bisenet" in DEFAULT_PLUGINS
    catalog = make_catalog(make_context(tmp_path))
    reason = catalog.unavailable_reason("segmenter", "bisenet")
    assert reason is not None
    assert CHECKPOINT_FILE in reason and str(tmp_path) in reason
    assert "fluidsrv weights fetch bisenet-faceparsing" in reason
    explicit = bisenet_factory().unavailable(make_context(tmp_path, model=str(tmp_path / "nowhere.pth")))
    assert explicit is not None and "nowhere.pth" in explicit


def test_plugin_builds_from_the_cache(checkpoint: Path) -> None:
    catalog = make_catalog(make_context(checkpoint.parent))
    assert catalog.unavailable_reason("segmenter", "bisenet") is None
    segmenter = bisenet_factory().create(make_context(checkpoint.parent, input_size=64))
    masks = segmenter.parse(np.full((40, 40, 3), 128, dtype=np.uint8))
    assert masks["face"].shape == (40, 40)


def test_plugin_takes_an_explicit_model_path(checkpoint: Path, tmp_path: Path) -> None:
    context = make_context(tmp_path / "empty-cache", model=str(checkpoint), input_size=64)
    assert bisenet_factory().unavailable(context) is None
    segmenter = bisenet_factory().create(context)
    assert isinstance(segmenter, BiSeNetSegmenter) and segmenter.input_size == 64
