"""BOP metrics on hand-built cases: identity, known offsets, symmetries, VSD on analytic depth, matching."""

from __future__ import annotations

import numpy as np
import pytest

from osop_ros.core.geometry import make_T, rotation_about_axis, symmetry_transforms
from osop_ros.core.types import Symmetries
from osop_ros.eval.metrics import (
    EvalEstimate,
    EvalFrame,
    EvalGt,
    EvalObject,
    PoseEvaluator,
    add,
    adds,
    depth_to_distance,
    match_greedy,
    mspd,
    mssd,
    valid_gt_mask,
    vsd,
    vsd_from_depths,
)

K = np.array([[600.0, 0.0, 319.5], [0.0, 600.0, 239.5], [0.0, 0.0, 1.0]])
W, H = 640, 480
EXT = np.array([0.08, 0.06, 0.04])
CORNERS = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float) * EXT / 2
DIAM = float(np.linalg.norm(EXT))


def box_pts(n: int = 8) -> np.ndarray:
    """Box corners plus points on the edges (a model point set with known extremes)."""
    t = np.linspace(0, 1, n)[:, None]
    edges = [CORNERS[i] + t * (CORNERS[j] - CORNERS[i]) for i in range(8) for j in range(i + 1, 8)
             if np.count_nonzero(CORNERS[i] != CORNERS[j]) == 1]
    return np.concatenate(edges)


def box_depth(T: np.ndarray, ext=EXT) -> np.ndarray:
    """Analytic (H, W) depth of an axis-aligned box centred at the origin."""
    u, v = np.meshgrid(np.arange(W, dtype=float), np.arange(H, dtype=float))
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], -1)
    o = -T[:3, :3].T @ T[:3, 3]
    d = d_cam @ T[:3, :3]
    half = np.asarray(ext) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - o) / d, (half - o) / d
    tn = np.nanmax(np.minimum(t1, t2), -1)
    tf = np.nanmin(np.maximum(t1, t2), -1)
    return np.where((tn <= tf) & (tn > 0), tn, 0.0)


def render_box(obj_id: int, T: np.ndarray, K_: np.ndarray, w: int, h: int) -> np.ndarray:
    assert (w, h) == (W, H) and np.allclose(K_, K)
    return box_depth(T)


T_GT = make_T(rotation_about_axis([1.0, 0.5, 0.2], 0.6), [0.02, -0.01, 0.5])


def test_depth_to_distance() -> None:
    d = np.zeros((H, W))
    d[239, 319] = 1.0  # near the principal point: distance ~ depth
    d[0, 0] = 2.0
    dist = depth_to_distance(d, K)
    assert dist[239, 319] == pytest.approx(np.sqrt(1 + (0.5 / 600) ** 2 * 2))
    assert dist[0, 0] == pytest.approx(2.0 * np.sqrt(1 + (319.5 / 600) ** 2 + (239.5 / 600) ** 2))
    assert dist[5, 5] == 0.0


def test_identity_errors_are_zero() -> None:
    pts = box_pts()
    assert mssd(T_GT, T_GT, pts, [np.eye(4)]) == 0.0
    assert mspd(T_GT, T_GT, K, pts, [np.eye(4)]) == 0.0
    assert add(T_GT, T_GT, pts) == 0.0 and adds(T_GT, T_GT, pts) == 0.0
    e = vsd(T_GT, T_GT, box_depth(T_GT), K, render_box, 1, DIAM)
    assert np.all(e == 0.0) and len(e) == 10


def test_known_translation_offset() -> None:
    pts = box_pts()
    T = T_GT.copy()
    T[0, 3] += 0.01
    assert mssd(T, T_GT, pts, [np.eye(4)]) == pytest.approx(0.01)
    assert add(T, T_GT, pts) == pytest.approx(0.01)
    # x-shift by dx at depth z moves a pixel by f * dx / z: the max is at the nearest model point
    z_min = (pts @ T_GT[:3, :3].T + T_GT[:3, 3])[:, 2].min()
    assert mspd(T, T_GT, K, pts, [np.eye(4)]) == pytest.approx(600.0 * 0.01 / z_min, rel=1e-9)


def test_known_rotation_offset() -> None:
    pts = box_pts()
    a = np.radians(10.0)
    T = T_GT @ make_T(rotation_about_axis([0, 0, 1], a), np.zeros(3))
    # rotation about model z by a: a point at radius r moves 2 r sin(a/2); the corners have the largest r
    r = np.linalg.norm(EXT[:2] / 2)
    assert mssd(T, T_GT, pts, [np.eye(4)]) == pytest.approx(2 * r * np.sin(a / 2))


def test_symmetric_object_rotated_by_its_symmetry() -> None:
    pts = box_pts()
    S = make_T(rotation_about_axis([0, 0, 1], np.pi), np.zeros(3))  # a box is symmetric under 180 deg about z
    sym_Ts = symmetry_transforms(Symmetries(discrete=[S]))
    T = T_GT @ S
    assert mssd(T, T_GT, pts, sym_Ts) == pytest.approx(0.0, abs=1e-12)
    assert mspd(T, T_GT, K, pts, sym_Ts) == pytest.approx(0.0, abs=1e-9)
    assert mssd(T, T_GT, pts, [np.eye(4)]) == pytest.approx(np.linalg.norm(EXT[:2]))  # not symmetry-aware
    assert adds(T, T_GT, pts) == pytest.approx(0.0, abs=1e-12)


def test_continuous_symmetry_discretised() -> None:
    # points on a circle of radius r around the z axis: rotation by any angle is a symmetry
    r = 0.05
    ang = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    pts = np.stack([r * np.cos(ang), r * np.sin(ang), np.zeros_like(ang)], 1)
    sym = Symmetries(continuous=[(np.array([0.0, 0.0, 1.0]), np.zeros(3))])
    sym_Ts = symmetry_transforms(sym, max_step_rad=0.01)
    T = T_GT @ make_T(rotation_about_axis([0, 0, 1], 0.7123), np.zeros(3))
    e = mssd(T, T_GT, pts, sym_Ts)
    assert e < 2 * r * np.sin(0.01 / 2) + 1e-6  # at most half a discretisation step away
    assert mssd(T, T_GT, pts, [np.eye(4)]) > 0.03


def test_vsd_depth_offset_known_values() -> None:
    dz = 0.021
    T = T_GT.copy()
    T[:3, 3] *= (T_GT[2, 3] + dz) / T_GT[2, 3]  # push the object away along its viewing ray
    d_gt = box_depth(T_GT)
    e = vsd(T, T_GT, d_gt, K, render_box, 1, DIAM)
    taus = np.arange(1, 11) * 0.05
    # surface distances differ by ~dz*(1 + small): every overlapping pixel fails for tau*diam < dz
    assert np.all(e[taus * DIAM < dz * 0.99] == 1.0)
    # for large tau only the silhouette difference remains: 1 - area_est / area_gt
    area_ratio = (box_depth(T) > 0).sum() / (d_gt > 0).sum()
    assert e[-1] == pytest.approx(1.0 - area_ratio, abs=1e-9)
    assert 0.02 < e[-1] < 0.15


def test_vsd_occlusion_and_missing_depth() -> None:
    d_gt = box_depth(T_GT)
    test = d_gt.copy()
    cols = np.nonzero((d_gt > 0).any(axis=0))[0]
    occl = np.zeros_like(d_gt, dtype=bool)
    occl[:, cols[0] : (cols[0] + cols[-1]) // 2] = True
    test[occl] = 0.3  # occluder in front covering the left half
    test[(d_gt > 0) & ~occl & (np.arange(W)[None, :] % 7 == 0)] = 0.0  # missing depth: counts as visible (bop19)
    assert np.all(vsd_from_depths(d_gt, d_gt, test, K, DIAM) == 0.0)
    # an estimate that differs only in the occluded half is (almost) not penalised
    T_shift = T_GT.copy()
    T_shift[2, 3] += 0.1
    e = vsd_from_depths(box_depth(T_shift), d_gt, test, K, DIAM)
    assert np.all(e > 0.5)


def test_match_greedy_cases() -> None:
    # est 0 (best score) is close to both GTs but closest to GT 0; est 1 only fits GT 0 -> greedy: 1 match
    err = np.array([[0.1, 0.2], [0.15, np.inf]])
    assert match_greedy([0.9, 0.5], err, threshold=0.3) == [(0, 0)]
    # order by score, not by index
    assert match_greedy([0.5, 0.9], err, threshold=0.3) == [(1, 0), (0, 1)]
    # each GT at most once, threshold is strict
    assert match_greedy([0.9, 0.8], np.array([[0.1], [0.1]]), threshold=0.3) == [(0, 0)]
    assert match_greedy([0.9], np.array([[0.3]]), threshold=0.3) == []
    # invalid GT ignored; max_ests
    assert match_greedy([0.9, 0.5], err, threshold=0.3, gt_valid=[False, True]) == [(0, 1)]
    assert match_greedy([0.9, 0.5], err, threshold=0.3, gt_valid=[False, True], max_ests=1) == [(0, 1)]


def test_valid_gt_mask() -> None:
    objs = [1, 2, 1, 1]
    vis = [0.2, 0.9, 0.7, 0.05]
    assert valid_gt_mask(objs, vis, {1: 2}).tolist() == [True, False, True, False]
    assert valid_gt_mask(objs, vis, {1: 1, 2: 1}).tolist() == [False, True, True, False]
    assert valid_gt_mask(objs, vis, {1: 3}, visib_gt_min=0.1).tolist() == [True, False, True, False]


def _frame(depth: bool, gts: list[EvalGt], targets: dict[int, int], im_id: int = 0) -> EvalFrame:
    d = box_depth(T_GT) if depth else None
    return EvalFrame(1, im_id, K, W, H, d, gts, targets)


def _evaluator() -> PoseEvaluator:
    return PoseEvaluator({1: EvalObject(box_pts(), [np.eye(4)], DIAM)}, render_box)


def test_evaluator_perfect_and_missing() -> None:
    ev = _evaluator()
    frames = [_frame(True, [EvalGt(1, T_GT)], {1: 1}, 0), _frame(False, [EvalGt(1, T_GT)], {1: 1}, 1)]
    rep = ev.evaluate(frames, [EvalEstimate(1, 0, 1, 0.9, T_GT), EvalEstimate(1, 1, 1, 0.9, T_GT)])
    assert rep.n_targets == 2 and rep.n_targets_depth == 1
    for k in ("mssd", "mspd", "vsd", "add", "adds", "add_s"):
        assert rep.recall[k] == pytest.approx(1.0), k
    assert rep.ar_rgb == pytest.approx(1.0) and rep.ar_bop == pytest.approx(1.0)
    # no estimate for the second frame: unmatched target counts as a failure
    rep = ev.evaluate(frames, [EvalEstimate(1, 0, 1, 0.9, T_GT)])
    assert rep.recall["mssd"] == pytest.approx(0.5) and rep.recall["mspd"] == pytest.approx(0.5)
    assert rep.recall["vsd"] == pytest.approx(1.0)  # VSD only over the frame with depth
    assert rep.ar_bop == pytest.approx(1.0) and rep.ar_rgb == pytest.approx(0.5)
    assert rep.per_object[1]["n_targets"] == 2 and rep.per_object[1]["n_targets_depth"] == 1


def test_evaluator_known_offset_recall_and_inst_count() -> None:
    ev = _evaluator()
    T = T_GT.copy()
    T[0, 3] += 0.1 * DIAM  # MSSD = 0.1 * diameter exactly -> fails 0.05 and 0.1 (strict), passes 0.15..0.5
    fr = [_frame(False, [EvalGt(1, T_GT)], {1: 1})]
    rep = ev.evaluate(fr, [EvalEstimate(1, 0, 1, 0.9, T)])
    assert rep.recall["mssd"] == pytest.approx(0.8)
    assert rep.curves["mssd"][:3] == [0.0, 0.0, 1.0]
    assert rep.recall["add"] == pytest.approx(0.0)  # ADD = 0.1 d is not < 0.1 d
    # inst_count = 1: only the highest-scored estimate is considered, even if a lower one is perfect
    bad = T_GT.copy()
    bad[2, 3] += 0.5
    rep = ev.evaluate(fr, [EvalEstimate(1, 0, 1, 0.9, bad), EvalEstimate(1, 0, 1, 0.5, T_GT)])
    assert rep.recall["mssd"] == 0.0 and rep.n_estimates == 1
    # two instances, two estimates: both matched
    T2 = T_GT.copy()
    T2[0, 3] += 0.2
    fr2 = [_frame(False, [EvalGt(1, T_GT, 0.9), EvalGt(1, T2, 0.5)], {1: 2})]
    rep = ev.evaluate(fr2, [EvalEstimate(1, 0, 1, 0.3, T2), EvalEstimate(1, 0, 1, 0.9, T_GT)])
    assert rep.recall["mssd"] == pytest.approx(1.0) and rep.n_targets == 2


def test_evaluator_mspd_width_normalisation() -> None:
    pts = box_pts()
    T = T_GT.copy()
    T[0, 3] += 0.02
    e_px = mspd(T, T_GT, K, pts, [np.eye(4)])
    ev = _evaluator()
    fr = EvalFrame(1, 0, K, 1280, 960, None, [EvalGt(1, T_GT)], {1: 1})  # 2x wider image: errors halved
    rep = ev.evaluate([fr], [EvalEstimate(1, 0, 1, 0.9, T)])
    expected = np.mean([e_px * 0.5 < th for th in np.arange(1, 11) * 5.0])
    assert rep.recall["mspd"] == pytest.approx(expected)
    assert 0.0 < expected < 1.0
    assert expected > np.mean([e_px < th for th in np.arange(1, 11) * 5.0])  # normalisation matters here


@pytest.mark.gl
def test_render_depth_factory_matches_analytic_box() -> None:
    import trimesh

    from osop_ros.core.mesh import ObjectModel
    from osop_ros.eval.metrics import make_render_depth

    render = pytest.importorskip("osop_ros.core.render")
    try:
        ren = render.Renderer()
    except render.RendererError as exc:
        pytest.skip(f"no GL context: {exc}")
    with ren:
        ren.add_object("box", ObjectModel.from_trimesh(trimesh.creation.box(extents=EXT), "box"))
        fn = make_render_depth(ren, {1: "box"})
        d = fn(1, T_GT, K, W, H)
        ref = box_depth(T_GT)
        both = (d > 0) & (ref > 0)
        assert abs(int((d > 0).sum()) - int((ref > 0).sum())) < 0.03 * (ref > 0).sum()
        assert np.abs(d[both] - ref[both]).max() < 1e-3
        assert np.all(vsd(T_GT, T_GT, ref, K, fn, 1, DIAM) < 0.05)
