import numpy as np

from fluidsrv.masks import border_band, dilate, erode, feather, seam_mask


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_dilate_and_erode_change_area_by_the_radius() -> None:
    mask = disc((64, 64), (32, 32), 10)
    grown, shrunk = dilate(mask, 3), erode(mask, 3)
    assert grown.sum() > mask.sum() > shrunk.sum()
    assert (grown | mask).sum() == grown.sum()  # dilation contains the original
    assert np.abs(grown.sum() - np.pi * 13**2) < 0.05 * np.pi * 13**2
    assert np.abs(shrunk.sum() - np.pi * 7**2) < 0.1 * np.pi * 7**2


def test_border_band_width() -> None:
    band = border_band((10, 12), 2)
    assert band[0].all() and band[:, -1].all() and band[1, 5]
    assert not band[2:-2, 2:-2].any()


def test_seam_mask_matches_the_formula_pixel_by_pixel() -> None:
    shape = (96, 96)
    rng = np.random.default_rng(0)
    old_head = disc(shape, (48, 44), 20)
    new_head = disc(shape, (50, 52), 18)
    inner = np.zeros(shape, bool)
    inner[16:80, 16:80] = True
    mask = seam_mask(old_head, new_head.astype(np.float32), inner, dilation=4, border=6)
    a, b = dilate(old_head, 4), dilate(new_head, 4)
    expected = (a | b) & ~(new_head & inner) & ~border_band(shape, 6)
    assert np.array_equal(mask, expected)
    # The new face shown inside the inner region is never inpainted; the old face outside the new one is.
    assert not (mask & new_head & inner).any()
    assert mask[48, 28]  # old head, outside the new head
    assert not mask[2, 2]  # border
    # Random soft masks: the formula holds for thresholded inputs too.
    soft_old = rng.random(shape).astype(np.float32)
    result = seam_mask(soft_old, new_head, inner, dilation=0, border=0)
    assert np.array_equal(result, ((soft_old >= 0.5) | new_head) & ~(new_head & inner))


def test_feather_is_soft_inside_and_zero_outside() -> None:
    mask = disc((64, 64), (32, 32), 20)
    alpha = feather(mask, 4)
    assert alpha.dtype == np.float32
    assert alpha[32, 32] > 0.99
    assert alpha[~dilate(mask, 1)].max() < 1e-3
    edge = alpha[32, 32 + 18]
    assert 0.0 < edge < 1.0


def test_seam_mask_shows_the_carried_old_head_outside_the_inner_region() -> None:
    shape = (96, 96)
    old_head = disc(shape, (34, 48), 30)  # (row, column): reaches past the inner region at the top
    new_head = disc(shape, (32, 50), 30)  # predicted over the whole frame
    carried = disc(shape, (32, 50), 30)  # the old head moved with the landmarks
    inner = np.zeros(shape, bool)
    inner[16:80, 16:80] = True
    mask = seam_mask(old_head, new_head, inner, dilation=3, border=4, carried=carried)
    a, b = dilate(old_head, 3), dilate(new_head, 3)
    expected = (a | b) & ~(new_head & (inner | carried)) & ~border_band(shape, 4)
    assert np.array_equal(mask, expected)
    outside_kept = new_head & carried & ~inner
    assert outside_kept[8, 50] and not mask[8, 50]  # the carried hair above the inner region is shown, not filled
    assert seam_mask(old_head, new_head, inner, dilation=3, border=4)[8, 50]  # without it, it is filled
    assert mask[4, 50] == (not outside_kept[4, 50])  # the moved rim: old head, not carried there
    assert np.array_equal(seam_mask(old_head, new_head, inner, dilation=3, border=4, carried=np.zeros(shape, bool)),
                          seam_mask(old_head, new_head, inner, dilation=3, border=4))
