"""Augmentations: shapes/dtypes, seeded determinism, consistent affine warps, depth noise model."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from osop_ros.core.types import InvalidInputError
from osop_ros.data import augment as A

H, W = 48, 64


def _img(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((H, W, 3)) * 255).astype(np.uint8)


@pytest.mark.parametrize("kind", A.PROCEDURAL_KINDS)
def test_procedural_backgrounds(kind: str) -> None:
    a = A.procedural_background(np.random.default_rng(1), H, W, kind)
    b = A.procedural_background(np.random.default_rng(1), H, W, kind)
    assert a.shape == (H, W, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    if kind != "solid":
        assert a.std() > 1.0


def test_unknown_kind() -> None:
    with pytest.raises(InvalidInputError):
        A.procedural_background(np.random.default_rng(0), H, W, "plaid")


def test_photo_background(tmp_path: Path) -> None:
    p = tmp_path / "bg.jpg"
    cv2.imwrite(str(p), _img(3))
    a = A.random_background(np.random.default_rng(5), 30, 40, [p], p_photo=1.0)
    b = A.random_background(np.random.default_rng(5), 30, 40, [p], p_photo=1.0)
    assert a.shape == (30, 40, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    with pytest.raises(InvalidInputError):
        A.photo_background(tmp_path / "missing.jpg", np.random.default_rng(0), 10, 10)


def test_perlin_range() -> None:
    n = A.perlin_noise(np.random.default_rng(0), H, W)
    assert n.shape == (H, W) and n.dtype == np.float32
    assert n.min() >= 0.0 and n.max() <= 1.0 and n.std() > 0.05


@pytest.mark.parametrize(
    "fn",
    [A.color_jitter, A.gaussian_blur, A.motion_blur, A.add_noise, A.jpeg_degrade, A.photometric_augment],
)
def test_photometric_deterministic(fn) -> None:
    img = _img()
    a = fn(img, np.random.default_rng(7))
    b = fn(img, np.random.default_rng(7))
    c = fn(img, np.random.default_rng(8))
    assert a.shape == img.shape and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) or fn is A.gaussian_blur


def test_color_jitter_identity() -> None:
    img = _img()
    out = A.color_jitter(img, np.random.default_rng(0), 0.0, 0.0, 0.0, 0.0)
    assert np.abs(out.astype(int) - img.astype(int)).max() <= 1


def test_noise_grows_with_signal() -> None:
    dark = np.full((200, 200, 3), 10, np.uint8)
    bright = np.full((200, 200, 3), 200, np.uint8)
    # same seed -> same k: compare std on dark vs bright with shot noise only
    d = A.add_noise(dark, np.random.default_rng(1), gauss_sigma_max=0.0, shot_max=1.0).astype(float)
    b = A.add_noise(bright, np.random.default_rng(1), gauss_sigma_max=0.0, shot_max=1.0).astype(float)
    assert b.std() > 2 * d.std()


def test_composite() -> None:
    fg = np.full((H, W, 3), 200, np.uint8)
    bg = np.zeros((H, W, 3), np.uint8)
    mask = np.zeros((H, W), bool)
    mask[10:20, 10:30] = True
    out = A.composite(fg, mask, bg)
    assert (out[mask] == 200).all() and (out[~mask] == 0).all()
    soft = A.composite(fg, mask, bg, feather_sigma=1.0)
    assert 0 < soft[15, 9, 0] < 200


def test_affine_maps_points_consistently() -> None:
    rng = np.random.default_rng(11)
    Aff = A.random_affine(rng, (W, H), (32, 32), max_rotation_deg=30)
    assert Aff.shape == (2, 3)
    pts = np.array([[20.0, 15.0], [40.0, 30.0], [5.0, 40.0]])
    img = np.zeros((H, W), np.float32)
    for u, v in pts.astype(int):
        img[v, u] = 1.0
    warped = A.warp_image(cv2.GaussianBlur(img, (0, 0), 2.0), Aff, (32, 32))
    mapped = A.warp_points(Aff, pts)
    for (u, v) in mapped:
        if 2 <= u < 30 and 2 <= v < 30:
            # the blurred spot's peak lands where warp_points says (within a pixel)
            y0, x0 = int(round(v)), int(round(u))
            win = warped[y0 - 2 : y0 + 3, x0 - 2 : x0 + 3]
            dy, dx = np.unravel_index(np.argmax(win), win.shape)
            assert abs(x0 - 2 + dx - u) <= 1.0 and abs(y0 - 2 + dy - v) <= 1.0
    back = A.warp_points(A.invert_affine(Aff), mapped)
    np.testing.assert_allclose(back, pts, atol=1e-9)
    # deterministic and label-safe warps
    again = A.random_affine(np.random.default_rng(11), (W, H), (32, 32), max_rotation_deg=30)
    np.testing.assert_array_equal(Aff, again)
    labels = np.random.default_rng(0).integers(0, 4, (H, W)).astype(np.uint8)
    wl = A.warp_image(labels, Aff, (32, 32), nearest=True)
    assert set(np.unique(wl)) <= {0, 1, 2, 3}
    wb = A.warp_image(labels > 1, Aff, (32, 32))
    assert wb.dtype == bool


def test_affine_identity_center() -> None:
    Aff = A.random_affine(np.random.default_rng(0), (W, H), scale_range=(1.0, 1.0), max_rotation_deg=0.0,
                          max_shift=0.0)
    np.testing.assert_allclose(Aff, [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_occluders() -> None:
    img = _img()
    a, occ = A.random_occluders(img, np.random.default_rng(4), n_max=3, max_area_frac=0.2)
    b, occ2 = A.random_occluders(img, np.random.default_rng(4), n_max=3, max_area_frac=0.2)
    assert a.shape == img.shape and a.dtype == np.uint8 and occ.dtype == bool
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(occ, occ2)
    assert occ.any()
    np.testing.assert_array_equal(a[~occ], img[~occ])  # only occluded pixels change


def test_depth_noise() -> None:
    d = np.zeros((120, 160), np.float32)
    d[20:100, 20:70] = 0.5
    d[20:100, 90:140] = 2.0
    n1 = A.depth_noise(d, np.random.default_rng(0))
    n2 = A.depth_noise(d, np.random.default_rng(0))
    np.testing.assert_array_equal(n1, n2)
    assert n1.dtype == np.float32 and n1.shape == d.shape
    assert (n1[d == 0] == 0).all()  # no depth invented
    inner_near = n1[30:90, 30:60]
    inner_far = n1[30:90, 100:130]
    near = inner_near[inner_near > 0] - 0.5
    far = inner_far[inner_far > 0] - 2.0
    assert far.std() > 2 * near.std()  # noise grows with z
    assert abs(near.mean()) < 0.002 and abs(far.mean()) < 0.01
    edge_band = np.concatenate([n1[20:100, 20], n1[20:100, 69]])
    interior = n1[30:90, 40]
    assert (edge_band == 0).mean() > (interior == 0).mean() + 0.2  # pixels go missing at edges


def test_bad_input() -> None:
    with pytest.raises(InvalidInputError):
        A.color_jitter(np.zeros((4, 4), np.uint8), np.random.default_rng(0))
    with pytest.raises(InvalidInputError):
        A.depth_noise(np.zeros((4, 4, 1), np.float32), np.random.default_rng(0))
