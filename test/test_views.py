"""ViewGrid: counts, angles, camera geometry, uniqueness, coarse/neighbour indices, nearest()."""

from __future__ import annotations

import numpy as np
import pytest

from osop_ros.core.geometry import (
    look_at,
    make_T,
    project,
    rotation_about_axis,
    rotation_angle_deg,
    symmetry_transforms,
    transform_points,
)
from osop_ros.core.types import InvalidInputError, Symmetries
from osop_ros.core.views import ViewGrid, ViewGridConfig


@pytest.fixture(scope="module")
def grid() -> ViewGrid:
    return ViewGrid()


def test_default_grid_counts_and_angles(grid: ViewGrid) -> None:
    assert len(grid) == 2880 == ViewGridConfig().n_views
    np.testing.assert_allclose(grid.elevations, np.linspace(-15, 90, 16))
    assert grid.elevations[0] == -15 and grid.elevations[-1] == 90
    np.testing.assert_allclose(grid.azimuths, np.arange(36) * 10.0)
    np.testing.assert_allclose(grid.inplanes, [0, 72, 144, 216, 288])
    assert grid.R_cam_obj.shape == (2880, 3, 3)
    assert grid.index.shape == (2880, 3)
    # C order: in-plane fastest
    np.testing.assert_array_equal(grid.index[:6], [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 0, 3], [0, 0, 4], [0, 1, 0]])
    assert grid.flat_index(3, 7, 2) == int(np.nonzero((grid.index == [3, 7, 2]).all(axis=1))[0][0])
    # proper rotations
    RtR = np.einsum("tji,tjk->tik", grid.R_cam_obj, grid.R_cam_obj)
    np.testing.assert_allclose(RtR, np.broadcast_to(np.eye(3), RtR.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(grid.R_cam_obj), 1.0, atol=1e-12)


def test_inplane_range_not_full_turn_is_inclusive() -> None:
    g = ViewGrid(ViewGridConfig(2, 4, 3, elevation_range_deg=(0.0, 30.0), inplane_range_deg=(-20.0, 20.0)))
    np.testing.assert_allclose(g.inplanes, [-20, 0, 20])
    np.testing.assert_allclose(g.elevations, [0, 30])
    assert len(g) == 24
    with pytest.raises(InvalidInputError):
        ViewGridConfig(n_azimuths=0)
    with pytest.raises(InvalidInputError):
        ViewGridConfig(elevation_range_deg=(-100.0, 0.0))


def test_camera_geometry(grid: ViewGrid) -> None:
    """Camera looks at the centre from d(el, az); model +z is up in the image at in-plane 0."""
    center = np.array([0.01, -0.02, 0.03])
    for i in [0, 5, 737, 1500, 2000]:
        el, az, ip = np.radians([grid.elevation_deg[i], grid.azimuth_deg[i], grid.inplane_deg[i]])
        d = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        T = grid.T_cam_obj(i, 0.5, center)
        # centre on the optical axis at distance 0.5
        np.testing.assert_allclose(transform_points(T, center[None])[0], [0, 0, 0.5], atol=1e-12)
        # the camera centre is at center + 0.5 d in the model frame
        cam_obj = -T[:3, :3].T @ T[:3, 3]
        np.testing.assert_allclose(cam_obj, center + 0.5 * d, atol=1e-12)
        # undoing the in-plane rotation gives geometry.look_at
        R0 = rotation_about_axis([0, 0, 1], -ip) @ grid.R_cam_obj[i]
        np.testing.assert_allclose(R0, look_at(center + 0.5 * d, center)[:3, :3], atol=1e-12)
    # at in-plane 0 and el=0, a point above the centre projects above it in the image (smaller v)
    i = grid.flat_index(np.argmin(np.abs(grid.elevations - (-1.0))), 0, 0)
    T = grid.T_cam_obj(i, 0.5)
    K = np.array([[500.0, 0, 320], [0, 500, 240], [0, 0, 1]])
    uv = project(K, transform_points(T, np.array([[0, 0, 0], [0, 0, 0.05]])))
    assert uv[1, 1] < uv[0, 1] - 20 and abs(uv[1, 0] - uv[0, 0]) < 1e-6
    # in-plane 72 deg turns that "up" vector by 72 deg on screen (clockwise, image y down)
    j = grid.flat_index(grid.index[i, 0], 0, 1)
    uv2 = project(K, transform_points(grid.T_cam_obj(j, 0.5), np.array([[0, 0, 0], [0, 0, 0.05]])))
    a, b = uv[1] - uv[0], uv2[1] - uv2[0]
    ang = np.degrees(np.arctan2(a[0] * b[1] - a[1] * b[0], a @ b))
    assert ang == pytest.approx(72.0, abs=1e-6)


def test_rotations_are_unique(grid: ViewGrid) -> None:
    R = grid.R_cam_obj
    tr = np.einsum("aij,bij->ab", R, R)
    np.fill_diagonal(tr, -1.0)
    min_angle = np.degrees(np.arccos(np.clip((tr.max() - 1.0) / 2.0, -1.0, 1.0)))
    # every view is distinct, including the el=90 pole row (azimuth acts as an in-plane turn there: 2 deg apart)
    assert min_angle > 1.9
    not_pole = grid.elevation_deg < 89.0
    sub = tr[np.ix_(not_pole, not_pole)]
    assert np.degrees(np.arccos(np.clip((sub.max() - 1.0) / 2.0, -1.0, 1.0))) > 5.0


def test_pole_views_continuous(grid: ViewGrid) -> None:
    """At el=90 the frame is the limit of look_at for el -> 90 at the same azimuth."""
    for ia in [0, 4, 17, 30]:
        az = np.radians(grid.azimuths[ia])
        el = np.radians(90.0 - 0.01)
        d = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
        i = grid.flat_index(15, ia, 0)
        assert rotation_angle_deg(look_at(d)[:3, :3], grid.R_cam_obj[i]) < 0.02


def test_coarse_and_neighbour_indices(grid: ViewGrid) -> None:
    coarse = grid.coarse_indices()
    assert len(coarse) == 8 * 18 * 5
    assert (grid.index[coarse, 0] % 2 == 0).all() and (grid.index[coarse, 1] % 2 == 0).all()
    assert len(grid.coarse_indices(1, 1)) == len(grid)
    i = grid.flat_index(5, 0, 2)
    nb = grid.neighbour_indices(i, radius_el=1, radius_az=1, radius_inplane=0)
    assert i in nb and len(nb) == 9
    assert set(grid.index[nb, 1]) == {35, 0, 1}  # azimuth wraps
    assert set(grid.index[nb, 2]) == {2}
    edge = grid.neighbour_indices(grid.flat_index(0, 3, 4), radius_el=1, radius_az=0, radius_inplane=1)
    assert len(edge) == 2 * 3 and set(grid.index[edge, 2]) == {3, 4, 0}  # in-plane wraps, el clipped


def test_nearest_returns_the_view_itself(grid: ViewGrid) -> None:
    rng = np.random.default_rng(0)
    for i in rng.choice(len(grid), 40, replace=False):
        assert grid.nearest(grid.R_cam_obj[i]) == i
        assert grid.nearest(make_T(grid.R_cam_obj[i], [0, 0, 1])) == i  # (4, 4) accepted
    # a slightly perturbed rotation still maps to its view
    i = 1234
    R = rotation_about_axis([0.3, 0.2, 0.9], np.radians(0.8)) @ grid.R_cam_obj[i]
    assert grid.nearest(R) == i
    err = grid.rotation_errors_deg(R)
    assert err[i] == pytest.approx(0.8, abs=1e-6)


def test_nearest_respects_symmetry(grid: ViewGrid) -> None:
    # object symmetric under a 180 deg turn about model x (not a symmetry of the grid itself)
    Rx = rotation_about_axis([1, 0, 0], np.pi)
    sym_Ts = symmetry_transforms(Symmetries(discrete=[make_T(Rx, np.zeros(3))]))
    perturb = rotation_about_axis([0.2, 0.9, 0.1], np.radians(0.5))
    checked = 0
    for v in [100, 777, 1301, 2222]:
        R_query = perturb @ grid.R_cam_obj[v] @ Rx  # the symmetric twin of view v's pose
        plain = grid.rotation_errors_deg(R_query)
        if plain.min() < 2.0:  # the twin happens to be on the grid too; not informative
            continue
        checked += 1
        assert grid.nearest(R_query) != v
        assert grid.nearest(R_query, sym_Ts) == v
        assert grid.rotation_errors_deg(R_query, sym_Ts)[v] == pytest.approx(0.5, abs=1e-6)
    assert checked >= 2
    # continuous symmetry about z: azimuth is irrelevant, every azimuth at the same (el, in-plane) is ~exact
    cont = symmetry_transforms(Symmetries(continuous=[(np.array([0, 0, 1.0]), np.zeros(3))]), max_step_rad=0.02)
    q = grid.flat_index(7, 13, 3)
    errs = grid.rotation_errors_deg(grid.R_cam_obj[q], cont)
    same = (grid.index[:, 0] == 7) & (grid.index[:, 2] == 3)
    assert errs[same].max() < 1.2 and errs[~same].min() > 3.0
    assert grid.index[grid.nearest(grid.R_cam_obj[q], cont), 0] == 7
