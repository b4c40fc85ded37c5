"""Stage 4 (pose solver): synthetic round trips with known poses, ICP on analytic/rendered depth, failures."""

from __future__ import annotations

import numpy as np
import pytest
import trimesh

from osop_ros.core.geometry import (
    make_T,
    project_points,
    random_rotation,
    rotation_about_axis,
    rotation_angle_deg,
    transform_points,
)
from osop_ros.core.mesh import ObjectModel
from osop_ros.core.solver import (
    IcpRefiner,
    PoseSolver,
    SolverConfig,
    kabsch,
    kabsch_ransac,
    scene_points,
    score_pose,
    solve_pnp_ransac,
)
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import (
    CameraIntrinsics,
    Correspondences,
    Observation,
    PoseFailure,
    SegmentationResult,
)

CAM = CameraIntrinsics(600.0, 600.0, 319.5, 239.5, 640, 480)
K = CAM.K
BOX_EXTENTS = (0.10, 0.07, 0.05)


def _pose(rng: np.random.Generator, dist: float = 0.6) -> np.ndarray:
    t = np.array([rng.uniform(-0.08, 0.08), rng.uniform(-0.06, 0.06), dist])
    return make_T(random_rotation(rng), t)


def _errors(T_est: np.ndarray, T_gt: np.ndarray) -> tuple[float, float]:
    return rotation_angle_deg(T_est[:3, :3], T_gt[:3, :3]), float(np.linalg.norm(T_est[:3, 3] - T_gt[:3, 3]))


def _perturb(T: np.ndarray, deg: float, metres: float, rng: np.random.Generator) -> np.ndarray:
    axis = rng.normal(size=3)
    d = rng.normal(size=3)
    dT = make_T(rotation_about_axis(axis, np.radians(deg)), metres * d / np.linalg.norm(d))
    Tp = T.copy()
    Tp[:3, :3] = dT[:3, :3] @ T[:3, :3]
    Tp[:3, 3] = T[:3, 3] + dT[:3, 3]
    return Tp


def _box_depth(T_cam_obj: np.ndarray, extents=BOX_EXTENTS, w: int = 640, h: int = 480) -> np.ndarray:
    """Analytic depth (H, W) metres of an axis-aligned box centred at the model origin (slab ray casting)."""
    u, v = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    d_cam = np.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones_like(u)], axis=-1)
    R, t = T_cam_obj[:3, :3], T_cam_obj[:3, 3]
    o = -R.T @ t
    d = d_cam @ R  # R^T d per pixel
    half = np.asarray(extents) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        t1 = (-half - o) / d
        t2 = (half - o) / d
    tn = np.nanmax(np.minimum(t1, t2), axis=-1)
    tf = np.nanmin(np.maximum(t1, t2), axis=-1)
    hit = (tn <= tf) & (tn > 0)
    depth = np.where(hit, tn, 0.0)  # d_cam has z = 1, so the ray parameter is the depth
    return depth.astype(np.float32)


@pytest.fixture(scope="module")
def box_model() -> ObjectModel:
    return ObjectModel.from_trimesh(trimesh.creation.box(extents=BOX_EXTENTS), name="box")


@pytest.fixture(scope="module")
def l_model() -> ObjectModel:
    """An asymmetric L-shaped object (two boxes) so that poses are unique."""
    a = trimesh.creation.box(extents=(0.10, 0.03, 0.04))
    b = trimesh.creation.box(extents=(0.03, 0.08, 0.04))
    b.apply_translation((0.035, 0.055, 0.0))
    m = trimesh.util.concatenate([a, b])
    return ObjectModel.from_trimesh(m, name="ell")


def _onboard(model: ObjectModel) -> OnboardedObject:
    return OnboardedObject(name=model.name, model=model, bank=None, sym_Ts=[np.eye(4)], obj_id=1)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- PnP


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pnp_round_trip_with_noise_and_outliers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    T = _pose(rng)
    pts = rng.uniform(-0.05, 0.05, size=(400, 3))
    uv = project_points(K, T, pts) + rng.normal(scale=1.0, size=(400, 2))
    out = rng.random(400) < 0.3
    uv[out] = rng.uniform([0, 0], [640, 480], size=(out.sum(), 2))
    res = solve_pnp_ransac(uv, pts, K, reproj_px=3.0, seed=seed)
    dr, dt = _errors(res.T_cam_obj, T)
    assert dr < 2.0
    assert dt < 0.01 * np.linalg.norm(T[:3, 3])
    # inliers are (mostly) the true ones
    assert (res.inliers & out).sum() <= 3
    assert res.n_inliers > 0.8 * (~out).sum()


def test_pnp_uses_confidence() -> None:
    """With max_points, only the most confident pairs are used: confident = clean, unconfident = outliers."""
    rng = np.random.default_rng(5)
    T = _pose(rng)
    pts = rng.uniform(-0.05, 0.05, size=(600, 3))
    uv = project_points(K, T, pts)
    bad = np.arange(600) >= 200  # 67 % outliers, too many for plain RANSAC with 20 iterations
    uv[bad] = rng.uniform([0, 0], [640, 480], size=(bad.sum(), 2))
    conf = np.where(bad, 0.1, 0.9).astype(np.float32)
    res = solve_pnp_ransac(uv, pts, K, conf, max_points=200, iterations=20, seed=0)
    dr, dt = _errors(res.T_cam_obj, T)
    assert dr < 0.5 and dt < 0.002
    assert not (res.inliers & bad).any()


def test_pnp_failures() -> None:
    rng = np.random.default_rng(0)
    T = _pose(rng)
    pts = rng.uniform(-0.05, 0.05, size=(5, 3))
    with pytest.raises(PoseFailure, match="too few"):
        solve_pnp_ransac(project_points(K, T, pts), pts, K)
    # collinear model points
    line = np.outer(np.linspace(-0.05, 0.05, 50), [1.0, 0.5, 0.2])
    with pytest.raises(PoseFailure, match="collinear"):
        solve_pnp_ransac(project_points(K, T, line), line, K)
    # pure noise: no consensus among random pairs
    pts = rng.uniform(-0.05, 0.05, size=(200, 3))
    uv = rng.uniform([0, 0], [640, 480], size=(200, 2))
    with pytest.raises(PoseFailure):
        solve_pnp_ransac(uv, pts, K, reproj_px=2.0, min_inlier_ratio=0.3)
    # NaNs are dropped, not propagated
    pts = rng.uniform(-0.05, 0.05, size=(100, 3))
    uv = project_points(K, T, pts)
    uv[:10] = np.nan
    res = solve_pnp_ransac(uv, pts, K)
    assert np.isfinite(res.T_cam_obj).all() and not res.inliers[:10].any()


# ------------------------------------------------------------------------------------------ Kabsch


def test_kabsch_exact() -> None:
    rng = np.random.default_rng(1)
    T = _pose(rng)
    pts = rng.normal(size=(30, 3)) * 0.05
    T_est = kabsch(pts, transform_points(T, pts))
    assert np.allclose(T_est, T, atol=1e-9)
    assert np.isclose(np.linalg.det(T_est[:3, :3]), 1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kabsch_ransac_round_trip_with_noise_and_outliers(seed: int) -> None:
    rng = np.random.default_rng(seed)
    T = _pose(rng)
    pts = rng.uniform(-0.05, 0.05, size=(400, 3))
    pc = transform_points(T, pts) + rng.normal(scale=0.001, size=(400, 3))
    out = rng.random(400) < 0.3
    pc[out] = T[:3, 3] + rng.uniform(-0.15, 0.15, size=(out.sum(), 3))
    res = kabsch_ransac(pts, pc, inlier_thresh=0.005, seed=seed)
    dr, dt = _errors(res.T_cam_obj, T)
    assert dr < 2.0
    assert dt < 0.01 * np.linalg.norm(T[:3, 3])
    assert (res.inliers & out).sum() <= 0.05 * out.sum()
    # deterministic for a given seed
    res2 = kabsch_ransac(pts, pc, inlier_thresh=0.005, seed=seed)
    assert np.array_equal(res.T_cam_obj, res2.T_cam_obj)


def test_kabsch_failures() -> None:
    rng = np.random.default_rng(2)
    T = _pose(rng)
    line = np.outer(np.linspace(-0.05, 0.05, 40), [1.0, 0.0, 0.3])
    with pytest.raises(PoseFailure, match="collinear"):
        kabsch_ransac(line, transform_points(T, line), inlier_thresh=0.005)
    pts = rng.uniform(-0.05, 0.05, size=(4, 3))
    with pytest.raises(PoseFailure, match="too few"):
        kabsch_ransac(pts, transform_points(T, pts), inlier_thresh=0.005)
    # consistent pairs but the object lies behind the camera
    T_behind = T.copy()
    T_behind[2, 3] = -0.6
    pts = rng.uniform(-0.05, 0.05, size=(50, 3))
    with pytest.raises(PoseFailure, match="behind"):
        kabsch_ransac(pts, transform_points(T_behind, pts), inlier_thresh=0.005)
    # unrelated point sets: too few inliers
    with pytest.raises(PoseFailure):
        kabsch_ransac(
            pts, rng.uniform(-0.2, 0.2, size=(50, 3)) + [0, 0, 0.6], inlier_thresh=0.002, min_inlier_ratio=0.5
        )


# --------------------------------------------------------------------------------------------- ICP


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_icp_on_analytic_box_depth(box_model: ObjectModel, seed: int) -> None:
    rng = np.random.default_rng(seed)
    T = _pose(rng, dist=0.5)
    depth = _box_depth(T)
    mask = depth > 0
    assert mask.sum() > 1000
    T0 = _perturb(T, 10.0, 0.02, rng)
    pts, nrm = box_model.sample_surface(3000, seed=0)
    spts = scene_points(depth, K, mask, dilate_px=0)
    r = IcpRefiner()(T0, pts, nrm, spts, box_model.diameter)
    assert r.accepted, r.reason
    dr, dt = _errors(r.T_cam_obj, T)
    assert dr < 1.0 and dt < 0.002, (dr, dt)


def test_icp_rejects_bad_fit(box_model: ObjectModel) -> None:
    """Depth of a different (much larger) box: ICP cannot reach the fitness/RMSE thresholds -> initial kept."""
    rng = np.random.default_rng(3)
    T = _pose(rng, dist=0.5)
    depth = _box_depth(T, extents=(0.3, 0.25, 0.2))
    pts, nrm = box_model.sample_surface(2000, seed=0)
    spts = scene_points(depth, K, depth > 0, dilate_px=0)
    r = IcpRefiner(min_fitness=0.6)(T, pts, nrm, spts, box_model.diameter)
    assert not r.accepted and r.reason
    assert np.array_equal(r.T_cam_obj, T)


@pytest.mark.gl
def test_icp_on_rendered_depth(l_model: ObjectModel) -> None:
    render = pytest.importorskip("osop_ros.core.render")
    try:
        ren = render.Renderer()
    except render.RendererError as exc:
        pytest.skip(f"no GL context: {exc}")
    with ren:
        ren.add_object("ell", l_model)
        for seed in range(3):
            rng = np.random.default_rng(seed)
            T = _pose(rng, dist=0.5)
            out = ren.render(K, 640, 480, [("ell", T)])
            T0 = _perturb(T, 10.0, 0.02, rng)
            pts, nrm = l_model.sample_surface(3000, seed=0)
            spts = scene_points(out.depth, K, out.mask, dilate_px=0)
            r = IcpRefiner()(T0, pts, nrm, spts, l_model.diameter, center_obj=l_model.center)
            assert r.accepted, r.reason
            dr, dt = _errors(r.T_cam_obj, T)
            assert dr < 1.0 and dt < 0.002, (seed, dr, dt)


# --------------------------------------------------------------------------------------- scoring


def test_score_prefers_true_pose(box_model: ObjectModel) -> None:
    rng = np.random.default_rng(4)
    T = _pose(rng, dist=0.5)
    depth = _box_depth(T)
    mask = depth > 0
    pts, nrm = box_model.sample_surface(2000, seed=0)
    s_true, info = score_pose(T, pts, nrm, K, mask)
    s_bad, _ = score_pose(_perturb(T, 20.0, 0.02, rng), pts, nrm, K, mask)
    assert s_true > 0.85 and info["iou"] > 0.85
    assert s_bad < s_true - 0.2
    sd_true, dinfo = score_pose(T, pts, nrm, K, mask, depth, depth_tol=0.005)
    assert dinfo["depth_fit"] > 0.95 and sd_true > 0.9
    T_far = T.copy()
    T_far[2, 3] += 0.02  # same silhouette (almost), wrong depth
    sd_far, dinfo_far = score_pose(T_far, pts, nrm, K, mask, depth, depth_tol=0.005)
    assert dinfo_far["depth_fit"] < 0.1 and sd_far < sd_true - 0.5


# ------------------------------------------------------------------------------------ PoseSolver


def _synthetic_corrs(model: ObjectModel, T: np.ndarray, rng: np.random.Generator, n: int = 300, outliers=0.3):
    pts, _ = model.sample_surface(n, seed=int(rng.integers(1 << 30)))
    uv = project_points(K, T, pts) + rng.normal(scale=0.7, size=(n, 2))
    out = rng.random(n) < outliers
    uv[out] += rng.normal(scale=40.0, size=(out.sum(), 2))
    return Correspondences(uv, pts, np.ones(n, dtype=np.float32))


def _seg(mask: np.ndarray) -> SegmentationResult:
    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return SegmentationResult(mask, mask.astype(np.float32), box, 1.0)


def test_pose_solver_rgb_ranks_good_set_first(box_model: ObjectModel) -> None:
    rng = np.random.default_rng(7)
    T = _pose(rng, dist=0.5)
    mask = _box_depth(T) > 0
    obs = Observation(np.zeros((480, 640, 3), np.uint8), CAM)
    good = _synthetic_corrs(box_model, T, rng)
    wrong = _synthetic_corrs(box_model, _perturb(T, 35.0, 0.03, rng), rng, outliers=0.0)
    tiny = Correspondences(good.uv[:3], good.pts_obj[:3], good.conf[:3])
    hyps = PoseSolver()(obs, _seg(mask), [wrong, tiny, good], _onboard(box_model))
    assert len(hyps) == 2
    best = hyps[0]
    assert best.info["method"] == "pnp" and best.info["corr_set"] == 2
    assert best.score > hyps[1].score
    dr, dt = _errors(best.T_cam_obj, T)
    assert dr < 2.0 and dt < 0.005
    assert any("set 1" in r for r in best.info["failed"])


def test_pose_solver_rgbd_kabsch_and_icp(l_model: ObjectModel) -> None:
    rng = np.random.default_rng(8)
    T = _pose(rng, dist=0.5)
    # depth of the L shape from its two boxes
    d1 = _box_depth(T, (0.10, 0.03, 0.04))
    T2 = T @ make_T(np.eye(3), (0.035, 0.055, 0.0))
    d2 = _box_depth(T2, (0.03, 0.08, 0.04))
    depth = np.where((d1 > 0) & ((d2 == 0) | (d1 < d2)), d1, d2).astype(np.float32)
    mask = depth > 0
    obs = Observation(np.zeros((480, 640, 3), np.uint8), CAM, depth)
    # correspondences at visible pixels, model points = exact surface points (+ 3 mm noise), 30 % outliers
    v, u = np.nonzero(mask)
    sel = rng.choice(len(u), 400, replace=False)
    uv = np.stack([u[sel], v[sel]], axis=1).astype(np.float64)
    from osop_ros.core.geometry import backproject, invert_T

    pc = backproject(uv, depth[v[sel], u[sel]], K)
    pts = transform_points(invert_T(T), pc) + rng.normal(scale=0.003, size=(400, 3))
    out = rng.random(400) < 0.3
    pts[out] = rng.uniform(-0.05, 0.05, size=(out.sum(), 3))
    corr = Correspondences(uv, pts, np.ones(400, np.float32))
    for init in ("kabsch", "pnp", "both"):
        hyps = PoseSolver(SolverConfig(rgbd_init=init))(obs, _seg(mask), [corr], _onboard(l_model))
        h = hyps[0]
        assert h.info["icp_accepted"], h.info
        assert h.info["method"] == {"kabsch": "kabsch", "pnp": "pnp+depth"}.get(init, h.info["method"])
        dr, dt = _errors(h.T_cam_obj, T)
        assert dr < 1.0 and dt < 0.002, (init, dr, dt)
        assert h.score > 0.8


def test_pose_solver_failures(box_model: ObjectModel) -> None:
    rng = np.random.default_rng(9)
    T = _pose(rng, dist=0.5)
    mask = _box_depth(T) > 0
    obs = Observation(np.zeros((480, 640, 3), np.uint8), CAM)
    solver = PoseSolver(SolverConfig(min_inlier_ratio=0.3))
    obj = _onboard(box_model)
    with pytest.raises(PoseFailure, match="no correspondence sets"):
        solver(obs, _seg(mask), [], obj)
    with pytest.raises(PoseFailure, match="empty"):
        solver(obs, SegmentationResult(np.zeros_like(mask), np.zeros(mask.shape, np.float32), None, 0.0), [], obj)
    pts, _ = box_model.sample_surface(200, seed=1)
    noise = Correspondences(rng.uniform([0, 0], [640, 480], (200, 2)), pts, np.ones(200, np.float32))
    few = Correspondences(np.zeros((2, 2)), np.zeros((2, 3)), np.ones(2, np.float32))
    with pytest.raises(PoseFailure, match="set 0: .*set 1: too few"):
        solver(obs, _seg(mask), [noise, few], obj)
    # min_score rejects a consistent but wrong hypothesis (correspondences of another pose)
    wrong = _synthetic_corrs(box_model, _perturb(T, 60.0, 0.05, rng), rng, outliers=0.0)
    with pytest.raises(PoseFailure, match="min_score"):
        PoseSolver(SolverConfig(min_score=0.5))(obs, _seg(mask), [wrong], obj)


def test_depth_shift_recovers_distance(box_model: ObjectModel) -> None:
    from osop_ros.core.solver import depth_shift

    rng = np.random.default_rng(10)
    T = _pose(rng, dist=0.5)
    depth = _box_depth(T)
    T_far = T.copy()
    T_far[:3, 3] *= 1.06  # same image position, 3 cm further away
    pts, nrm = box_model.sample_surface(2000, seed=0)
    out = depth_shift(T_far, pts, nrm, K, depth > 0, depth)
    assert out is not None
    T_new, dz = out
    assert dz == pytest.approx(-0.03, abs=0.003)
    assert np.linalg.norm(T_new[:3, 3] - T[:3, 3]) < 0.003
    assert depth_shift(T_far, pts, nrm, K, depth > 0, np.zeros_like(depth)) is None


def test_pose_solver_rgbd_without_depth_at_correspondences(box_model: ObjectModel) -> None:
    """Depth image present but empty: Kabsch fails with a reason, PnP is used, ICP is not accepted."""
    rng = np.random.default_rng(11)
    T = _pose(rng, dist=0.5)
    mask = _box_depth(T) > 0
    obs = Observation(np.zeros((480, 640, 3), np.uint8), CAM, np.zeros((480, 640), np.float32))
    hyps = PoseSolver()(obs, _seg(mask), [_synthetic_corrs(box_model, T, rng)], _onboard(box_model))
    h = hyps[0]
    assert h.info["method"] == "pnp" and not h.info["icp_accepted"]
    assert "too few depth points" in h.info["icp_reason"]
    assert any("kabsch: only 0 correspondences with depth" in r for r in h.info["failed"])
    dr, dt = _errors(h.T_cam_obj, T)
    assert dr < 2.0 and dt < 0.005
