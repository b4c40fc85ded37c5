"""Depth-aware clean-up of stage-1 masks: support plane, depth discontinuities, connected 3D cluster."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import trimesh

from osop_ros.core.depth_seg import DepthMaskRefiner, DepthSegConfig, fit_support_plane, refine_mask
from osop_ros.core.geometry import look_at, make_T, mask_to_box
from osop_ros.core.types import CameraIntrinsics, SegmentationResult

pytestmark = pytest.mark.gl
CAM = CameraIntrinsics(400.0, 400.0, 159.5, 119.5, 320, 240)


@pytest.fixture(scope="module")
def table_scene():
    """A 6 cm cube and a 4 cm cube 3 cm behind it (touching in the image) on a table seen from 45 deg."""
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer

    models = {}
    for name, mesh in (("table", trimesh.creation.box(extents=(1.0, 1.0, 0.02))),
                       ("cube", trimesh.creation.box(extents=(0.06, 0.06, 0.06))),
                       ("small", trimesh.creation.box(extents=(0.04, 0.04, 0.04)))):
        mesh.visual.vertex_colors = np.tile([150, 150, 150, 255], (len(mesh.vertices), 1))
        models[name] = ObjectModel.from_trimesh(mesh, name=name)
    T_cam_world = look_at(np.array([0.0, -0.45, 0.45]))  # 45 deg down onto the world origin
    poses = {"table": make_T(np.eye(3), (0, 0, -0.01)), "cube": make_T(np.eye(3), (0, 0, 0.03)),
             "small": make_T(np.eye(3), (0.02, 0.06, 0.02))}
    with Renderer() as r:
        for k, m in models.items():
            r.add_object(k, m)
        out = r.render(CAM.K, CAM.width, CAM.height, [(k, T_cam_world @ T) for k, T in poses.items()])
    depth = out.depth.astype(np.float32)
    cube = out.inst == 2
    small = out.inst == 3
    table = out.inst == 1
    return depth, cube, small, table


def _seg(mask: np.ndarray) -> SegmentationResult:
    return SegmentationResult(mask, mask.astype(np.float32) * 0.9, mask_to_box(mask), 0.9)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_plane_fit_recovers_plane() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(-0.3, 0.3, (500, 3))
    p[:, 2] = 0.8 + 0.5 * p[:, 0]  # plane z = 0.8 + 0.5 x
    out = np.vstack([p, rng.uniform(-0.3, 0.3, (100, 3)) + [0, 0, 0.5]])
    n, d = fit_support_plane(out, np.full(len(out), 0.005), 100, 0.3, rng)
    assert abs(abs(n @ np.array([-0.5, 0, 1]) / np.linalg.norm([-0.5, 0, 1])) - 1) < 1e-3 and n[2] < 0
    assert np.abs(p @ n + d).max() < 0.005  # every plane point within the tolerance after the refit
    assert fit_support_plane(out[500:], np.full(100, 0.005), 100, 0.5, rng) is None  # no dominant plane


def test_refine_removes_table_and_neighbour_and_drops_table_only_masks(table_scene) -> None:
    depth, cube, small, table = table_scene
    K = CAM.K
    assert cube.sum() > 500 and small.sum() > 100
    # stage 1 bled onto the table around the cube and onto the cube's neighbour
    import cv2

    bleed = cv2.dilate(cube.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool) & (table | cube | small)
    seg = _seg(bleed)
    assert _iou(bleed, cube) < 0.7
    r, info = refine_mask(dataclasses.replace(seg, rank_score=0.7, rank_margin=0.1), depth, K)
    assert r is not None and info["plane_inlier_frac_of_mask"] > 0.1
    assert (r.rank_score, r.rank_margin) == (0.7, 0.1)  # the proposal ranking stays with the refined mask
    assert _iou(r.mask, cube) > 0.85, _iou(r.mask, cube)
    # a partial mask grows inside the cube's cluster, not onto the table
    part = cube.copy()
    ys, xs = np.nonzero(cube)
    part[:, : int(np.median(xs))] = False
    r2, _ = refine_mask(_seg(part), depth, K, DepthSegConfig(grow_frac=0.5))
    assert r2 is not None and _iou(r2.mask, cube) > _iou(part, cube) + 0.1 and not (r2.mask & table).any()
    # a mask that is all table (an absent object "found" on the table) is dropped
    tab = np.zeros_like(table)
    tab[20:60, 20:80] = True
    tab &= table
    assert tab.sum() > 500
    r3, info3 = refine_mask(_seg(tab), depth, K)
    assert r3 is None and info3["dropped"] == 1.0
    assert DepthMaskRefiner()([_seg(tab), seg], depth, K)[0].mask.sum() == r.mask.sum()
