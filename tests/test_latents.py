"""The slider model F and the latent math of fluidsrv.latents."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluidsrv.directions import sample_w
from fluidsrv.latents import (
    apply_sliders,
    blend,
    deform_loop,
    latent_spread,
    mix_styles,
    more_like,
    morph_path,
    parse_layers,
    preset_layers,
    std_along,
)
from fluidsrv.stages import Direction
from tests.model_support import tiny_generator

NUM_WS, W_DIM = 12, 16


def unit(seed: int, rows: int = 1) -> torch.Tensor:
    vector = torch.randn(rows, W_DIM, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm(dim=-1, keepdim=True)


def direction(name: str, seed: int, layers: tuple[int, int] | None = None, per_layer: bool = False) -> Direction:
    return Direction(name=name, label=name, vector=unit(seed, NUM_WS if per_layer else 1), layers=layers)


@pytest.fixture()
def ws() -> torch.Tensor:
    return torch.randn(1, NUM_WS, W_DIM, generator=torch.Generator().manual_seed(99))


@pytest.fixture()
def sliders() -> dict[str, Direction]:
    return {
        "a": direction("a", 1),
        "b": direction("b", 2, layers=(2, 5)),
        "c": direction("c", 3, layers=(4, 12), per_layer=True),
    }


def delta(ws: torch.Tensor, sliders: dict[str, Direction], values: dict[str, float], **kw: object) -> torch.Tensor:
    return apply_sliders(ws, sliders, values, **kw) - ws  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- F


def test_zero_sliders_are_the_identity(ws: torch.Tensor, sliders: dict[str, Direction]) -> None:
    assert torch.equal(apply_sliders(ws, sliders, {}), ws)
    assert torch.equal(apply_sliders(ws, sliders, {"a": 0.0, "b": 0.0, "c": 0.0}), ws)
    assert torch.equal(apply_sliders(ws, sliders, {"a": 0.0, "b": 0.0}, orthogonalize=True), ws)


def test_layer_masks(ws: torch.Tensor, sliders: dict[str, Direction]) -> None:
    moved = delta(ws, sliders, {"b": 1.5}).norm(dim=-1)[0]  # [num_ws]
    assert torch.all(moved[2:5] > 0)
    assert torch.all(moved[:2] == 0) and torch.all(moved[5:] == 0)
    everywhere = delta(ws, sliders, {"a": -1.0}).norm(dim=-1)[0]
    assert torch.all(everywhere > 0)


def test_per_layer_vectors_follow_their_rows(ws: torch.Tensor, sliders: dict[str, Direction]) -> None:
    change = delta(ws, sliders, {"c": 2.0})[0]  # [num_ws, w_dim]
    assert torch.all(change[:4] == 0)
    torch.testing.assert_close(change[4:], 2.0 * sliders["c"].vector[4:])


@settings(max_examples=25, deadline=None)
@given(value=st.floats(-5, 5, allow_nan=False), factor=st.floats(-3, 3, allow_nan=False))
def test_linearity(value: float, factor: float) -> None:
    ws = torch.zeros(1, NUM_WS, W_DIM)
    sliders = {"a": direction("a", 1), "b": direction("b", 2, layers=(2, 5))}
    spread = torch.tensor(0.7)
    base = delta(ws, sliders, {"a": value, "b": -value}, spread=spread)
    scaled = delta(ws, sliders, {"a": factor * value, "b": -factor * value}, spread=spread)
    torch.testing.assert_close(scaled, factor * base, atol=1e-5, rtol=1e-5)


def test_sliders_combine_by_adding_their_deltas(ws: torch.Tensor, sliders: dict[str, Direction]) -> None:
    spread = torch.rand(W_DIM, generator=torch.Generator().manual_seed(5)) + 0.5
    together = delta(ws, sliders, {"a": 1.0, "b": -2.0, "c": 0.5}, spread=spread)
    alone = sum(
        delta(ws, sliders, {name: value}, spread=spread) for name, value in (("a", 1.0), ("b", -2.0), ("c", 0.5))
    )
    torch.testing.assert_close(together, alone)


def test_batches_get_the_same_delta(sliders: dict[str, Direction]) -> None:
    batch = torch.randn(3, NUM_WS, W_DIM)
    change = delta(batch, sliders, {"a": 1.0, "c": -1.0})
    torch.testing.assert_close(change, change[:1].expand_as(change))


def test_unknown_slider_raises_key_error(ws: torch.Tensor, sliders: dict[str, Direction]) -> None:
    with pytest.raises(KeyError, match="nope"):
        apply_sliders(ws, sliders, {"a": 1.0, "nope": 1.0})


def test_non_finite_values_are_refused(ws: torch.Tensor, sliders: dict[str, Direction]) -> None:
    with pytest.raises(ValueError, match="finite"):
        apply_sliders(ws, sliders, {"a": float("nan")})


def test_wrong_shapes_are_refused(ws: torch.Tensor) -> None:
    bad = {"x": Direction("x", "x", torch.ones(1, W_DIM + 1))}
    with pytest.raises(ValueError, match="shape"):
        apply_sliders(ws, bad, {"x": 1.0})
    outside = {"y": Direction("y", "y", torch.ones(1, W_DIM), layers=(10, 20))}
    with pytest.raises(ValueError, match="outside"):
        apply_sliders(ws, outside, {"y": 1.0})


def test_spread_makes_one_unit_one_std_along_the_direction(ws: torch.Tensor) -> None:
    root = torch.randn(W_DIM, W_DIM, generator=torch.Generator().manual_seed(7))
    spread = root @ root.T / W_DIM  # a symmetric positive "square root of the covariance"
    sliders = {"a": direction("a", 1)}
    moved = delta(ws, sliders, {"a": 2.0}, spread=spread)[0, 0]  # [w_dim]
    along = sliders["a"].vector[0]
    expected = 2.0 * (spread @ along).norm()
    torch.testing.assert_close(moved.norm(), expected)
    torch.testing.assert_close(moved / moved.norm(), along)
    scalar = delta(ws, sliders, {"a": 1.0}, spread=torch.tensor(3.0))[0, 0]
    torch.testing.assert_close(scalar.norm(), torch.tensor(3.0))


def test_spread_scaling_ignores_the_vector_length(ws: torch.Tensor) -> None:
    short = {"a": Direction("a", "a", 0.1 * unit(1))}
    long = {"a": Direction("a", "a", 10.0 * unit(1))}
    spread = torch.tensor(1.5)
    torch.testing.assert_close(delta(ws, short, {"a": 1.0}, spread=spread), delta(ws, long, {"a": 1.0}, spread=spread))


def test_orthogonalize_removes_shared_components(ws: torch.Tensor) -> None:
    first = unit(1)
    second = 0.8 * first + 0.6 * unit(2)  # shares most of itself with the first
    sliders = {"first": Direction("first", "1", first), "second": Direction("second", "2", second)}
    values = {"first": 0.0, "second": 1.0}
    plain = delta(ws, sliders, values)[0]  # [num_ws, w_dim]
    cleaned = delta(ws, sliders, values, orthogonalize=True)[0]
    assert torch.all((plain @ first[0]).abs() > 0.5)
    torch.testing.assert_close(cleaned @ first[0], torch.zeros(NUM_WS), atol=1e-5, rtol=0)
    torch.testing.assert_close(cleaned.norm(dim=-1), plain.norm(dim=-1))  # strength kept
    first_only = {"first": 1.0, "second": 0.0}
    torch.testing.assert_close(delta(ws, sliders, first_only, orthogonalize=True), delta(ws, sliders, first_only))


def test_orthogonalize_follows_the_order_of_values(ws: torch.Tensor) -> None:
    sliders = {"a": direction("a", 1), "b": direction("b", 2)}
    ab = delta(ws, sliders, {"a": 1.0, "b": 0.0}, orthogonalize=True)
    ba = delta(ws, sliders, {"b": 0.0, "a": 1.0}, orthogonalize=True)
    torch.testing.assert_close(ab, delta(ws, sliders, {"a": 1.0}))
    assert not torch.allclose(ab, ba)
    torch.testing.assert_close(ba[0] @ sliders["b"].vector[0], torch.zeros(NUM_WS), atol=1e-5, rtol=0)


def test_orthogonalize_works_per_layer(ws: torch.Tensor) -> None:
    shared = unit(4)
    sliders = {"early": Direction("e", "e", shared, layers=(0, 3)), "late": Direction("l", "l", shared, layers=(2, 6))}
    change = delta(ws, sliders, {"early": 0.0, "late": 1.0}, orthogonalize=True)[0].norm(dim=-1)
    assert change[2] == 0  # the one shared layer: nothing is left of "late" there
    assert torch.all(change[3:6] > 0)


def test_f_is_deterministic(ws: torch.Tensor, sliders: dict[str, Direction]) -> None:
    values = {"a": 0.3, "b": -1.2, "c": 2.0}
    first = apply_sliders(ws, sliders, values, orthogonalize=True)
    fresh = {name: Direction(d.name, d.label, d.vector.clone(), d.layers) for name, d in sliders.items()}
    assert torch.equal(first, apply_sliders(ws, fresh, values, orthogonalize=True))


def test_std_along_forms_agree() -> None:
    directions = unit(3, rows=4)
    axis_std = torch.rand(W_DIM) + 0.1
    torch.testing.assert_close(std_along(torch.diag(axis_std), directions), std_along(axis_std, directions))


# ---------------------------------------------------------------------------------------------- spread


def test_latent_spread_is_the_square_root_of_the_covariance() -> None:
    generator = tiny_generator()
    root = latent_spread(generator, n=600, seed=3, batch_size=200)
    w = sample_w(generator, 600, seed=3, batch_size=200)  # the same draws
    torch.testing.assert_close(root, root.T)
    torch.testing.assert_close(root @ root, torch.cov(w.T), atol=1e-4, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- latent math


def test_presets() -> None:
    assert [preset_layers(p, 18) for p in ("coarse", "middle", "fine")] == [(0, 4), (4, 8), (8, 18)]
    assert [preset_layers(p, 12) for p in ("coarse", "middle", "fine")] == [(0, 4), (4, 8), (8, 12)]
    assert [preset_layers(p, 6) for p in ("coarse", "middle", "fine")] == [(0, 2), (2, 4), (4, 6)]
    with pytest.raises(ValueError):
        preset_layers("huge", 18)


def test_parse_layers() -> None:
    assert parse_layers("fine", 18) == (8, 18)
    assert parse_layers("2:5", 18) == (2, 5)
    assert parse_layers(":3", 18) == (0, 3)
    assert parse_layers("7:", 12) == (7, 12)
    assert parse_layers("4", 12) == (4, 5)
    for bad in ("5:2", "0:19", "x", "3:3"):
        with pytest.raises(ValueError):
            parse_layers(bad, 18)


def test_mix_styles_takes_the_chosen_layers() -> None:
    a, b = torch.zeros(2, NUM_WS, W_DIM), torch.ones(1, NUM_WS, W_DIM)
    mixed = mix_styles(a, b, *preset_layers("middle", NUM_WS))
    assert mixed.shape == a.shape
    assert mixed[:, 4:8].eq(1).all() and mixed[:, :4].eq(0).all() and mixed[:, 8:].eq(0).all()


def test_more_like_and_blend() -> None:
    faces = torch.randn(3, NUM_WS, W_DIM)
    a, b = faces[:1], faces[1:2]
    torch.testing.assert_close(more_like(a, b, 0), a)
    torch.testing.assert_close(more_like(a, b, 100), b)
    torch.testing.assert_close(more_like(a, b, 30), a + 0.3 * (b - a))
    torch.testing.assert_close(blend(a, b, 1.5) - b, 0.5 * (b - a))  # caricature past B


def test_morph_path_visits_every_face() -> None:
    faces = torch.randn(3, NUM_WS, W_DIM)
    path = morph_path(faces, 5)
    assert path.shape == (11, NUM_WS, W_DIM)
    for index in range(3):
        torch.testing.assert_close(path[5 * index], faces[index])
    looped = morph_path(faces, 5, loop=True)
    assert looped.shape == (15, NUM_WS, W_DIM)
    torch.testing.assert_close(looped[0], faces[0])
    linear = morph_path(faces[:2], 4, ease=False)
    torch.testing.assert_close(linear[1], faces[0] + 0.25 * (faces[1] - faces[0]))
    eased = morph_path(faces[:2], 4)
    assert (eased[1] - faces[0]).norm() < (linear[1] - faces[0]).norm()  # slow start


def test_deform_loop_is_seamless_and_stays_on_its_layers() -> None:
    face = torch.randn(1, NUM_WS, W_DIM)
    frames = deform_loop(face, 16, layers=(4, 8), amplitude=0.8, harmonics=3, seed=1)
    assert frames.shape == (16, NUM_WS, W_DIM)
    assert torch.equal(frames[:, :4], face[:, :4].expand(16, -1, -1))
    assert torch.equal(frames[:, 8:], face[:, 8:].expand(16, -1, -1))
    torch.testing.assert_close(frames.mean(0), face[0], atol=1e-5, rtol=0)  # whole periods average out
    finer = deform_loop(face, 32, layers=(4, 8), amplitude=0.8, harmonics=3, seed=1)
    torch.testing.assert_close(finer[::2], frames)  # frame t of F is frame 2t of 2F: a closed curve
    steps = (frames.roll(-1, 0) - frames).norm(dim=(1, 2))  # includes the wrap from the last frame to the first
    assert steps.max() < 3 * steps.mean()
    assert not torch.equal(frames, deform_loop(face, 16, layers=(4, 8), amplitude=0.8, harmonics=3, seed=2))
