"""Stage 4: poses from 2D-3D correspondences (PnP) or 3D-3D pairs (Kabsch), ICP refinement, ranking.

Building blocks work on raw arrays and can be used on their own:

* :func:`solve_pnp_ransac` -- RGB: OpenCV PnP-RANSAC on the most confident pairs + LM refinement on inliers.
* :func:`kabsch` / :func:`kabsch_ransac` -- RGB-D: rigid (no scale) alignment of model points to
  back-projected depth points, vectorised seeded RANSAC + refit on inliers.
* :class:`IcpRefiner` -- open3d point-to-plane ICP with a robust kernel, coarse-to-fine, accepted only
  when fitness/RMSE pass thresholds.
* :func:`score_pose` -- agreement of a pose with the instance mask (and depth).
* :func:`depth_shift` -- moves a PnP pose along its viewing ray to match the measured depth.

:class:`PoseSolver` chains them per correspondence set (one set per matched template) and returns
ranked :class:`~osop_ros.core.types.PoseHypothesis` objects; it raises
:class:`~osop_ros.core.types.PoseFailure` instead of guessing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from osop_ros.core.geometry import (
    backproject,
    depth_to_points,
    invert_T,
    make_T,
    rotation_angle_deg,
    rotation_error_sym_deg,
    transform_points,
)
from osop_ros.core.types import Correspondences, Observation, PoseFailure, PoseHypothesis, SegmentationResult

if TYPE_CHECKING:
    from osop_ros.core.stages import OnboardedObject

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Results and small helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class RansacResult:
    """Output of a robust fit.

    T_cam_obj: (4, 4) float64 model -> camera.
    inliers:   (N,) bool over the *input* pairs (False for pairs dropped before RANSAC).
    rmse:      RMS residual of the inliers (pixels for PnP, metres for Kabsch).
    """

    T_cam_obj: np.ndarray
    inliers: np.ndarray
    rmse: float

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())


def _check_pose(T: np.ndarray, pts_obj: np.ndarray | None = None) -> None:
    """Raise :class:`PoseFailure` for NaN poses, non-rotations or poses that put the object behind the camera."""
    if not np.all(np.isfinite(T)):
        raise PoseFailure("non-finite pose")
    R = T[:3, :3]
    if abs(np.linalg.det(R) - 1.0) > 1e-3 or not np.allclose(R.T @ R, np.eye(3), atol=1e-3):
        raise PoseFailure("rotation matrix is not orthonormal")
    if T[2, 3] <= 0:
        raise PoseFailure(f"pose behind the camera (t_z={T[2, 3]:.4f} m)")
    if pts_obj is not None and len(pts_obj):
        z = transform_points(T, pts_obj)[:, 2]
        if np.mean(z <= 0) > 0.01:
            raise PoseFailure("pose puts the correspondences behind the camera")


def _rank_ratio(x: np.ndarray) -> float:
    """Second / first singular value of the centred points (0 for collinear/coincident points)."""
    if len(x) < 3:
        return 0.0
    s = np.linalg.svd(x - x.mean(axis=0), compute_uv=False)
    return float(s[1] / s[0]) if s[0] > 1e-12 else 0.0


def _select(
    n: int, conf: np.ndarray | None, max_points: int, conf_min: float
) -> np.ndarray:
    """Indices of the pairs to use: confidence >= conf_min, at most ``max_points`` most confident (stable)."""
    idx = np.arange(n)
    if conf is not None:
        conf = np.asarray(conf, dtype=np.float64).reshape(-1)
        if conf.shape[0] != n:
            raise PoseFailure(f"confidence has {conf.shape[0]} entries for {n} correspondences")
        idx = idx[np.isfinite(conf) & (conf >= conf_min)]
        if len(idx) > max_points:
            order = np.argsort(-conf[idx], kind="stable")
            idx = np.sort(idx[order[:max_points]])
    elif n > max_points:
        idx = np.linspace(0, n - 1, max_points).round().astype(np.int64)
    return idx


# ----------------------------------------------------------------------------------------------
# PnP (RGB)
# ----------------------------------------------------------------------------------------------


def reprojection_errors(T_cam_obj: np.ndarray, pts_obj: np.ndarray, uv: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(N,) pixel distance between ``uv`` and the projection of ``pts_obj``; inf for points behind the camera."""
    p = transform_points(T_cam_obj, pts_obj)
    z = p[:, 2]
    err = np.full(len(p), np.inf)
    ok = z > 1e-9
    proj = p[ok, :2] / z[ok, None] * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])
    err[ok] = np.linalg.norm(proj - uv[ok], axis=1)
    return err


def solve_pnp_ransac(
    uv: np.ndarray,
    pts_obj: np.ndarray,
    K: np.ndarray,
    conf: np.ndarray | None = None,
    *,
    reproj_px: float = 4.0,
    iterations: int = 500,
    ransac_confidence: float = 0.999,
    max_points: int = 1500,
    conf_min: float = 0.0,
    min_inliers: int = 6,
    min_inlier_ratio: float = 0.0,
    refine: bool = True,
    seed: int = 0,
) -> RansacResult:
    """Pose from 2D-3D pairs with PnP-RANSAC (OpenCV) + Levenberg-Marquardt refinement on the inliers.

    uv (N, 2) pixels, pts_obj (N, 3) metres, K (3, 3); conf (N,) in [0, 1] keeps the ``max_points`` most
    confident pairs (and drops pairs below ``conf_min``). Raises :class:`PoseFailure` on too few pairs or
    inliers, degenerate (collinear) geometry, or a pose behind the camera.
    """
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    pts_obj = np.asarray(pts_obj, dtype=np.float64).reshape(-1, 3)
    n = uv.shape[0]
    if pts_obj.shape[0] != n:
        raise PoseFailure(f"{n} pixels but {pts_obj.shape[0]} model points")
    finite = np.isfinite(uv).all(axis=1) & np.isfinite(pts_obj).all(axis=1)
    idx = _select(n, conf, max_points, conf_min)
    idx = idx[finite[idx]]
    need = max(min_inliers, 4)
    if len(idx) < need:
        raise PoseFailure(f"too few correspondences for PnP ({len(idx)} < {need})")
    P, Q = pts_obj[idx], uv[idx]
    if _rank_ratio(P) < 1e-3 or _rank_ratio(Q) < 1e-3:
        raise PoseFailure("degenerate correspondences (collinear points)")
    cv2.setRNGSeed(int(seed))
    ok, rvec, tvec, inl = cv2.solvePnPRansac(
        P,
        Q,
        K.astype(np.float64),
        None,
        iterationsCount=int(iterations),
        reprojectionError=float(reproj_px),
        confidence=float(ransac_confidence),
        flags=cv2.SOLVEPNP_EPNP,
    )
    if not ok or inl is None or len(inl) < need:
        raise PoseFailure(f"PnP-RANSAC found no consensus ({0 if inl is None else len(inl)} inliers)")
    R, _ = cv2.Rodrigues(rvec)
    T = make_T(R, tvec.reshape(3))
    mask = np.zeros(len(idx), dtype=bool)
    mask[inl.reshape(-1)] = True
    if refine:
        for _ in range(2):  # refine on inliers, re-select inliers with the refined pose, once more
            if mask.sum() < need:
                break
            rvec, _ = cv2.Rodrigues(T[:3, :3])
            tvec = T[:3, 3].reshape(3, 1).copy()
            rvec, tvec = cv2.solvePnPRefineLM(P[mask], Q[mask], K.astype(np.float64), None, rvec, tvec)
            R, _ = cv2.Rodrigues(rvec)
            T = make_T(R, tvec.reshape(3))
            mask = reprojection_errors(T, P, Q, K) < reproj_px
    n_inl = int(mask.sum())
    if n_inl < need:
        raise PoseFailure(f"too few PnP inliers ({n_inl} < {need})")
    if n_inl < min_inlier_ratio * len(idx):
        raise PoseFailure(f"PnP inlier ratio too low ({n_inl}/{len(idx)} < {min_inlier_ratio:.2f})")
    if _rank_ratio(P[mask]) < 1e-3:
        raise PoseFailure("degenerate inlier set (collinear points)")
    _check_pose(T, P[mask])
    err = reprojection_errors(T, P[mask], Q[mask], K)
    inliers = np.zeros(n, dtype=bool)
    inliers[idx[mask]] = True
    return RansacResult(T, inliers, float(np.sqrt(np.mean(err**2))))


# ----------------------------------------------------------------------------------------------
# Kabsch (RGB-D)
# ----------------------------------------------------------------------------------------------


def _kabsch_batch(P: np.ndarray, Q: np.ndarray, w: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Batched weighted Kabsch: P, Q (B, n, 3), w (B, n) -> R (B, 3, 3), t (B, 3) with Q ~ R P + t."""
    if w is None:
        w = np.ones(P.shape[:2])
    w = w / np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
    mp = np.einsum("bn,bnk->bk", w, P)
    mq = np.einsum("bn,bnk->bk", w, Q)
    H = np.einsum("bn,bni,bnj->bij", w, P - mp[:, None], Q - mq[:, None])
    U, _, Vt = np.linalg.svd(H)
    d = np.sign(np.linalg.det(np.einsum("bji,bkj->bik", Vt, U)))  # det(V U^T)
    d[d == 0] = 1.0
    D = np.zeros((len(P), 3, 3))
    D[:, 0, 0] = 1.0
    D[:, 1, 1] = 1.0
    D[:, 2, 2] = d
    R = np.einsum("bji,bjk,blk->bil", Vt, D, U)  # V D U^T
    t = mq - np.einsum("bij,bj->bi", R, mp)
    return R, t


def kabsch(pts_obj: np.ndarray, pts_cam: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Rigid transform (no scale) ``T_cam_obj`` minimising sum w |T pts_obj - pts_cam|^2. (N, 3) each -> (4, 4)."""
    P = np.asarray(pts_obj, dtype=np.float64)[None]
    Q = np.asarray(pts_cam, dtype=np.float64)[None]
    w = None if weights is None else np.asarray(weights, dtype=np.float64)[None]
    R, t = _kabsch_batch(P, Q, w)
    return make_T(R[0], t[0])


def kabsch_ransac(
    pts_obj: np.ndarray,
    pts_cam: np.ndarray,
    conf: np.ndarray | None = None,
    *,
    inlier_thresh: float,
    iterations: int = 500,
    max_points: int = 3000,
    conf_min: float = 0.0,
    min_inliers: int = 6,
    min_inlier_ratio: float = 0.0,
    refit_iterations: int = 5,
    seed: int = 0,
) -> RansacResult:
    """Robust rigid alignment of 3D-3D pairs: seeded vectorised RANSAC on triplets (MSAC cost) + refit on inliers.

    pts_obj, pts_cam (N, 3) metres; ``inlier_thresh`` metres; conf (N,) weights the triplet sampling.
    Raises :class:`PoseFailure` on too few pairs/inliers, collinear data or a pose behind the camera.
    """
    P_all = np.asarray(pts_obj, dtype=np.float64).reshape(-1, 3)
    Q_all = np.asarray(pts_cam, dtype=np.float64).reshape(-1, 3)
    n = P_all.shape[0]
    if Q_all.shape[0] != n:
        raise PoseFailure(f"{n} model points but {Q_all.shape[0]} camera points")
    finite = np.isfinite(P_all).all(axis=1) & np.isfinite(Q_all).all(axis=1)
    idx = _select(n, conf, max_points, conf_min)
    idx = idx[finite[idx]]
    need = max(min_inliers, 3)
    if len(idx) < need:
        raise PoseFailure(f"too few 3D-3D correspondences ({len(idx)} < {need})")
    P, Q = P_all[idx], Q_all[idx]
    if _rank_ratio(P) < 1e-3 or _rank_ratio(Q) < 1e-3:
        raise PoseFailure("degenerate 3D correspondences (collinear points)")
    rng = np.random.default_rng(seed)
    m = len(idx)
    p = None
    if conf is not None:
        c = np.clip(np.asarray(conf, dtype=np.float64)[idx], 0.0, None) + 1e-6
        p = c / c.sum()
    samples = rng.choice(m, size=(int(iterations), 3), p=p)
    ok = (samples[:, 0] != samples[:, 1]) & (samples[:, 1] != samples[:, 2]) & (samples[:, 0] != samples[:, 2])
    samples = samples[ok]
    # Reject near-degenerate triplets: triangle area small w.r.t. the extent of the data.
    ext = float(np.linalg.norm(P.max(axis=0) - P.min(axis=0)))
    a, b, c3 = P[samples[:, 0]], P[samples[:, 1]], P[samples[:, 2]]
    area = 0.5 * np.linalg.norm(np.cross(b - a, c3 - a), axis=1)
    samples = samples[area > (0.01 * ext) ** 2]
    if len(samples) == 0:
        raise PoseFailure("no non-degenerate RANSAC sample (collinear model points)")
    th2 = float(inlier_thresh) ** 2
    best_cost, best_T = np.inf, None
    for s in range(0, len(samples), 256):
        sm = samples[s : s + 256]
        R, t = _kabsch_batch(P[sm], Q[sm])
        D = np.matmul(P[None], R.transpose(0, 2, 1))  # (B, m, 3) = R P per sample (BLAS, not einsum)
        D += t[:, None] - Q[None]
        res2 = np.einsum("bni,bni->bn", D, D)  # (B, m)
        cost = np.minimum(res2, th2).sum(axis=1)
        k = int(np.argmin(cost))
        if cost[k] < best_cost:
            best_cost, best_T = float(cost[k]), make_T(R[k], t[k])
    T = best_T
    mask = np.sum((transform_points(T, P) - Q) ** 2, axis=1) < th2
    for _ in range(int(refit_iterations)):
        if mask.sum() < 3:
            break
        T = kabsch(P[mask], Q[mask])
        new = np.sum((transform_points(T, P) - Q) ** 2, axis=1) < th2
        if np.array_equal(new, mask):
            break
        mask = new
    n_inl = int(mask.sum())
    if n_inl < need:
        raise PoseFailure(f"too few Kabsch inliers ({n_inl} < {need})")
    if n_inl < min_inlier_ratio * m:
        raise PoseFailure(f"Kabsch inlier ratio too low ({n_inl}/{m} < {min_inlier_ratio:.2f})")
    if _rank_ratio(P[mask]) < 1e-3:
        raise PoseFailure("degenerate inlier set (collinear points)")
    _check_pose(T)
    res = np.linalg.norm(transform_points(T, P[mask]) - Q[mask], axis=1)
    inliers = np.zeros(n, dtype=bool)
    inliers[idx[mask]] = True
    return RansacResult(T, inliers, float(np.sqrt(np.mean(res**2))))


# ----------------------------------------------------------------------------------------------
# ICP
# ----------------------------------------------------------------------------------------------


@dataclass
class IcpResult:
    """ICP outcome. ``T_cam_obj`` is the refined pose when ``accepted``, else the initial one."""

    T_cam_obj: np.ndarray
    accepted: bool
    fitness: float
    rmse: float
    reason: str = ""
    T_icp: np.ndarray | None = None


def scene_points(
    depth: np.ndarray, K: np.ndarray, mask: np.ndarray, dilate_px: int = 5
) -> np.ndarray:
    """Camera-frame points (N, 3) metres of valid depth pixels inside ``mask`` dilated by ``dilate_px``."""
    m = mask.astype(np.uint8)
    if dilate_px > 0:
        m = cv2.dilate(m, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate_px + 1, 2 * dilate_px + 1)))
    pts, _ = depth_to_points(depth, K, m.astype(bool))
    return pts


class IcpRefiner:
    """Point-to-plane ICP (open3d) of depth points onto model surface samples, coarse-to-fine, robust kernel.

    The scene points are the source and the (camera-facing) model samples with their exact normals the
    target, so point-to-plane uses the model normals. Correspondence distances per level are
    ``max(frac * diameter, noise_floor)`` (the floor accounts for sensor noise, in metres).
    The result is judged at ``fit_dist = max(fit_dist_frac * diameter, noise_floor)``: fitness = fraction of
    scene points with a model point closer than ``fit_dist``, RMSE over those. Accepted only when
    ``fitness >= min_fitness``, ``rmse <= max(max_rmse_frac * diameter, noise_floor)`` and the correction
    from the initial pose is plausible; otherwise the initial pose is returned with the reason.
    """

    def __init__(
        self,
        max_dist_fracs: tuple[float, ...] = (0.25, 0.1, 0.04, 0.015),
        iterations: tuple[int, ...] = (15, 15, 20, 30),
        kernel: str = "tukey",
        noise_floor: float = 0.004,
        fit_dist_frac: float = 0.03,
        min_fitness: float = 0.3,
        max_rmse_frac: float = 0.02,
        max_correction_deg: float = 45.0,
        max_correction_frac: float = 0.5,
        max_scene_points: int = 4000,
        crop_radius_frac: float = 0.75,
    ) -> None:
        if len(max_dist_fracs) != len(iterations):
            raise ValueError("max_dist_fracs and iterations must have the same length")
        if kernel not in ("tukey", "huber", "none"):
            raise ValueError(f"unknown ICP kernel {kernel!r} (tukey, huber, none)")
        self.max_dist_fracs = tuple(max_dist_fracs)
        self.iterations = tuple(iterations)
        self.kernel = kernel
        self.noise_floor = noise_floor
        self.fit_dist_frac = fit_dist_frac
        self.min_fitness = min_fitness
        self.max_rmse_frac = max_rmse_frac
        self.max_correction_deg = max_correction_deg
        self.max_correction_frac = max_correction_frac
        self.max_scene_points = max_scene_points
        self.crop_radius_frac = crop_radius_frac

    @staticmethod
    def _facing_target(T_cam_obj: np.ndarray, model_pts: np.ndarray, model_normals: np.ndarray) -> Any:
        """open3d cloud of the model samples facing the camera under ``T_cam_obj`` (all if too few)."""
        import open3d as o3d

        p_cam = transform_points(T_cam_obj, model_pts)
        n_cam = model_normals @ T_cam_obj[:3, :3].T
        facing = np.einsum("ij,ij->i", n_cam, p_cam) < 0.1 * np.linalg.norm(p_cam, axis=1)
        if facing.sum() < 10:
            facing[:] = True
        pc = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(model_pts[facing]))
        pc.normals = o3d.utility.Vector3dVector(model_normals[facing])
        return pc

    def __call__(
        self,
        T_init: np.ndarray,
        model_pts: np.ndarray,
        model_normals: np.ndarray,
        scene_pts: np.ndarray,
        diameter: float,
        center_obj: np.ndarray | None = None,
        seed: int = 0,
    ) -> IcpResult:
        """Refine ``T_init`` (4, 4) so that model samples (M, 3) with normals fit ``scene_pts`` (N, 3), metres."""
        import open3d as o3d

        reg = o3d.pipelines.registration
        T_init = np.asarray(T_init, dtype=np.float64)
        center = np.zeros(3) if center_obj is None else np.asarray(center_obj, dtype=np.float64)
        c_cam = transform_points(T_init, center[None])[0]
        src = np.asarray(scene_pts, dtype=np.float64)
        src = src[np.linalg.norm(src - c_cam, axis=1) < self.crop_radius_frac * diameter + 1e-9]
        if len(src) < 10:
            return IcpResult(T_init, False, 0.0, float("inf"), f"too few depth points near the object ({len(src)})")
        if len(src) > self.max_scene_points:
            rng = np.random.default_rng(seed)
            src = src[rng.choice(len(src), self.max_scene_points, replace=False)]
        pc_src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(src))
        T_obj_cam = invert_T(T_init)
        model_pts = np.asarray(model_pts, dtype=np.float64)
        model_normals = np.asarray(model_normals, dtype=np.float64)
        for frac, iters in zip(self.max_dist_fracs, self.iterations, strict=True):
            dist = max(frac * diameter, self.noise_floor)
            pc_tgt = self._facing_target(invert_T(T_obj_cam), model_pts, model_normals)
            if self.kernel == "tukey":
                est = reg.TransformationEstimationPointToPlane(reg.TukeyLoss(k=dist))
            elif self.kernel == "huber":
                est = reg.TransformationEstimationPointToPlane(reg.HuberLoss(k=dist / 3.0))
            else:
                est = reg.TransformationEstimationPointToPlane()
            crit = reg.ICPConvergenceCriteria(relative_fitness=1e-7, relative_rmse=1e-7, max_iteration=int(iters))
            result = reg.registration_icp(pc_src, pc_tgt, dist, T_obj_cam, est, crit)
            T_obj_cam = np.asarray(result.transformation, dtype=np.float64)
        T_new = invert_T(T_obj_cam)
        if not np.all(np.isfinite(T_new)):
            return IcpResult(T_init, False, 0.0, float("inf"), "ICP produced a non-finite pose")
        fit_dist = max(self.fit_dist_frac * diameter, self.noise_floor)
        pc_fit = self._facing_target(T_new, model_pts, model_normals)
        ev = reg.evaluate_registration(pc_src, pc_fit, fit_dist, T_obj_cam)
        fitness, rmse = float(ev.fitness), float(ev.inlier_rmse)
        d_rot = rotation_angle_deg(T_init[:3, :3], T_new[:3, :3])
        d_t = float(np.linalg.norm(transform_points(T_new, center[None]) - c_cam))
        max_rmse = max(self.max_rmse_frac * diameter, self.noise_floor)
        reason = ""
        if fitness < self.min_fitness:
            reason = f"ICP fitness {fitness:.3f} < {self.min_fitness:.3f}"
        elif rmse > max_rmse:
            reason = f"ICP RMSE {rmse * 1000:.2f} mm > {max_rmse * 1000:.2f} mm"
        elif d_rot > self.max_correction_deg or d_t > self.max_correction_frac * diameter:
            reason = f"ICP correction implausible ({d_rot:.1f} deg, {d_t * 1000:.1f} mm)"
        elif T_new[2, 3] <= 0:
            reason = "ICP pose behind the camera"
        if reason:
            return IcpResult(T_init, False, fitness, rmse, reason, T_new)
        return IcpResult(T_new, True, fitness, rmse, "", T_new)


# ----------------------------------------------------------------------------------------------
# Hypothesis scoring
# ----------------------------------------------------------------------------------------------


def score_pose(
    T_cam_obj: np.ndarray,
    model_pts: np.ndarray,
    model_normals: np.ndarray,
    K: np.ndarray,
    mask: np.ndarray,
    depth: np.ndarray | None = None,
    *,
    depth_tol: float = 0.01,
    sample_spacing: float | None = None,
) -> tuple[float, dict[str, float]]:
    """Agreement of a pose with an instance mask (and depth), in [0, 1].

    Mask term: IoU between ``mask`` (H, W) bool and the silhouette of the projected surface samples
    (splatted, gaps closed with a kernel of about the sample spacing in pixels). With ``depth``, silhouette
    pixels outside the mask where the measured depth lies clearly in front of the model (occlusion) are
    excused, and a depth term is added: fraction of camera-facing samples projecting into the mask whose
    measured depth is within ``depth_tol`` metres of the model depth. Score = IoU (RGB) or
    sqrt(IoU * depth_fraction) (RGB-D; IoU alone when fewer than 10 such samples have depth).
    No z-buffer: visibility is approximated by normals.
    """
    H, W = mask.shape
    p_cam = transform_points(T_cam_obj, model_pts)
    z = p_cam[:, 2]
    if not np.all(np.isfinite(p_cam)) or np.any(z <= 1e-6):
        return 0.0, {"iou": 0.0, "depth_fit": 0.0}
    uv = p_cam[:, :2] / z[:, None] * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])
    ui = np.floor(uv[:, 0] + 0.5).astype(np.int64)
    vi = np.floor(uv[:, 1] + 0.5).astype(np.int64)
    inside = (ui >= 0) & (ui < W) & (vi >= 0) & (vi < H)
    mask_area = int(mask.sum())
    if not inside.any() or mask_area == 0:
        return 0.0, {"iou": 0.0, "depth_fit": 0.0}
    # Region of interest: union of the mask box and the projected box, padded.
    ys, xs = np.nonzero(mask)
    if sample_spacing is None:
        ext = np.linalg.norm(model_pts.max(axis=0) - model_pts.min(axis=0))
        sample_spacing = ext * np.sqrt(2.0 / max(len(model_pts), 1))
    r = int(np.clip(np.ceil(sample_spacing * K[0, 0] / np.median(z)), 1, 25))
    pad = 2 * r + 2
    x0 = max(0, min(xs.min(), ui[inside].min()) - pad)
    x1 = min(W, max(xs.max(), ui[inside].max()) + pad + 1)
    y0 = max(0, min(ys.min(), vi[inside].min()) - pad)
    y1 = min(H, max(ys.max(), vi[inside].max()) + pad + 1)
    sil = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    sil[vi[inside] - y0, ui[inside] - x0] = 1
    kern = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    sil = cv2.morphologyEx(sil, cv2.MORPH_CLOSE, kern).astype(bool)
    m = mask[y0:y1, x0:x1].astype(bool)
    info: dict[str, float] = {}
    depth_fit: float | None = None
    if depth is not None:
        d = depth[y0:y1, x0:x1]
        # Model depth over the silhouette: z-buffer of the samples, spread with a min filter.
        zbuf = np.full(sil.shape, np.inf, dtype=np.float32)
        np.minimum.at(zbuf, (vi[inside] - y0, ui[inside] - x0), z[inside].astype(np.float32))
        big = np.float32(1e6)
        zbuf = cv2.erode(np.where(np.isfinite(zbuf), zbuf, big), kern)
        occluded = sil & ~m & (d > 0) & (d < zbuf - depth_tol) & (zbuf < big)
        sil = sil & ~occluded
        n_cam = model_normals @ T_cam_obj[:3, :3].T
        facing = np.einsum("ij,ij->i", n_cam, p_cam) < 0
        sel = inside & facing
        sel[sel] = mask[vi[sel], ui[sel]]
        dv = depth[vi[sel], ui[sel]]
        valid = dv > 0
        if valid.sum() >= 10:
            depth_fit = float(np.mean(np.abs(dv[valid] - z[sel][valid]) < depth_tol))
            info["depth_fit"] = depth_fit
        else:  # no depth where the model lands inside the mask: the depth term is unavailable
            depth_fit = None
            info["depth_fit"] = float("nan")
        info["occluded_px"] = float(occluded.sum())
    inter = float((sil & m).sum())
    union = float((sil | m).sum()) + float(mask_area - m.sum())
    iou = inter / union if union > 0 else 0.0
    info["iou"] = iou
    score = iou if depth_fit is None else float(np.sqrt(iou * depth_fit))
    return float(score), info


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


@dataclass
class SolverConfig:
    """Thresholds of :class:`PoseSolver`. ``*_frac`` values are fractions of the object diameter;
    ``*_floor`` values are absolute lower bounds in metres (depth sensor noise)."""

    min_correspondences: int = 8
    min_inliers: int = 8
    min_inlier_ratio: float = 0.1
    conf_min: float = 0.0
    max_points: int = 1500
    seed: int = 0
    # PnP (RGB): inlier threshold = max(pnp_reproj_px, pnp_reproj_box_frac * side of the mask box)
    pnp_reproj_px: float = 4.0
    pnp_reproj_box_frac: float = 0.04
    pnp_iterations: int = 500
    pnp_confidence: float = 0.999
    # RGB-D: "kabsch" (3D-3D), "pnp" (PnP + depth shift along the viewing ray) or "both" (two hypotheses)
    use_depth: bool = True
    rgbd_init: str = "both"
    kabsch_inlier_frac: float = 0.08
    kabsch_iterations: int = 500
    min_depth_points: int = 8
    # ICP (RGB-D)
    icp: bool = True
    icp_top_n: int = 4
    icp_max_dist_fracs: tuple[float, ...] = (0.25, 0.1, 0.04, 0.015)
    icp_iterations: tuple[int, ...] = (15, 15, 20, 30)
    icp_kernel: str = "tukey"
    icp_noise_floor: float = 0.004
    icp_fit_dist_frac: float = 0.03
    icp_min_fitness: float = 0.3
    icp_max_rmse_frac: float = 0.02
    icp_max_correction_deg: float = 45.0
    icp_max_correction_frac: float = 0.5
    mask_dilate_px: int = 3
    # scoring / ranking
    n_samples: int = 2000
    score_depth_tol_frac: float = 0.05
    score_depth_tol_floor: float = 0.005
    min_score: float = 0.0
    dedup_deg: float = 5.0
    dedup_frac: float = 0.05

    def __post_init__(self) -> None:
        if self.rgbd_init not in ("kabsch", "pnp", "both"):
            raise ValueError(f"SolverConfig.rgbd_init must be kabsch, pnp or both, got {self.rgbd_init!r}")


def depth_shift(
    T_cam_obj: np.ndarray,
    model_pts: np.ndarray,
    model_normals: np.ndarray,
    K: np.ndarray,
    mask: np.ndarray,
    depth: np.ndarray,
    min_points: int = 10,
) -> tuple[np.ndarray, float] | None:
    """Move a pose along its viewing ray so that its camera-facing samples inside ``mask`` match ``depth``.

    The translation is scaled by (z + dz) / z (the projection of the model origin stays put), where dz is
    the median of measured minus model depth. Returns (new pose, dz metres) or None without enough depth.
    """
    p_cam = transform_points(T_cam_obj, model_pts)
    z = p_cam[:, 2]
    if np.any(z <= 1e-6) or T_cam_obj[2, 3] <= 0:
        return None
    n_cam = model_normals @ T_cam_obj[:3, :3].T
    facing = np.einsum("ij,ij->i", n_cam, p_cam) < 0
    H, W = mask.shape
    u = np.floor(p_cam[:, 0] / z * K[0, 0] + K[0, 2] + 0.5).astype(np.int64)
    v = np.floor(p_cam[:, 1] / z * K[1, 1] + K[1, 2] + 0.5).astype(np.int64)
    sel = facing & (u >= 0) & (u < W) & (v >= 0) & (v < H)
    sel[sel] = mask[v[sel], u[sel]] & (depth[v[sel], u[sel]] > 0)
    if sel.sum() < min_points:
        return None
    dz = float(np.median(depth[v[sel], u[sel]] - z[sel]))
    T = T_cam_obj.copy()
    T[:3, 3] *= (T[2, 3] + dz) / T[2, 3]
    return T, dz


class PoseSolver:
    """Stage 4 (:class:`~osop_ros.core.stages.PoseSolverStage`): hypotheses from each correspondence set.

    RGB: PnP-RANSAC. RGB-D (``obs.depth`` present and ``use_depth``): Kabsch-RANSAC on back-projected
    correspondences and/or PnP followed by a depth shift along the viewing ray (``rgbd_init``), then ICP of
    the model onto the depth inside the dilated mask for the ``icp_top_n`` best. Hypotheses are scored by
    :func:`score_pose`, ranked, and duplicates (equal up to a symmetry of the object) merged.
    """

    def __init__(self, config: SolverConfig | None = None) -> None:
        self.config = config or SolverConfig()
        c = self.config
        self.icp = IcpRefiner(
            max_dist_fracs=c.icp_max_dist_fracs,
            iterations=c.icp_iterations,
            kernel=c.icp_kernel,
            noise_floor=c.icp_noise_floor,
            fit_dist_frac=c.icp_fit_dist_frac,
            min_fitness=c.icp_min_fitness,
            max_rmse_frac=c.icp_max_rmse_frac,
            max_correction_deg=c.icp_max_correction_deg,
            max_correction_frac=c.icp_max_correction_frac,
        )

    # -- helpers ---------------------------------------------------------------------------------
    def _samples(self, obj: OnboardedObject) -> tuple[np.ndarray, np.ndarray]:
        key = f"solver_samples_{self.config.n_samples}"
        if key not in obj.extra:
            pts, nrm = obj.model.sample_surface(self.config.n_samples, seed=0)
            obj.extra[key] = (np.asarray(pts, dtype=np.float64), np.asarray(nrm, dtype=np.float64))
        return obj.extra[key]

    def _pnp(self, obs: Observation, corr: Correspondences, seg: SegmentationResult) -> RansacResult:
        c = self.config
        side = 0.0
        if seg.box is not None:
            side = float(max(seg.box[2] - seg.box[0], seg.box[3] - seg.box[1]))
        return solve_pnp_ransac(
            corr.uv,
            corr.pts_obj,
            obs.camera.K,
            corr.conf,
            reproj_px=max(c.pnp_reproj_px, c.pnp_reproj_box_frac * side),
            iterations=c.pnp_iterations,
            ransac_confidence=c.pnp_confidence,
            max_points=c.max_points,
            conf_min=c.conf_min,
            min_inliers=c.min_inliers,
            min_inlier_ratio=c.min_inlier_ratio,
            seed=c.seed,
        )

    def _kabsch(self, obs: Observation, corr: Correspondences, diameter: float) -> RansacResult:
        c = self.config
        assert obs.depth is not None
        H, W = obs.depth.shape
        ui = np.clip(np.floor(corr.uv[:, 0] + 0.5).astype(np.int64), 0, W - 1)
        vi = np.clip(np.floor(corr.uv[:, 1] + 0.5).astype(np.int64), 0, H - 1)
        z = obs.depth[vi, ui].astype(np.float64)
        ok = z > 0
        need = max(c.min_depth_points, c.min_inliers)
        if ok.sum() < need:
            raise PoseFailure(f"only {int(ok.sum())} correspondences with depth (< {need})")
        pts_cam = backproject(corr.uv[ok], z[ok], obs.camera.K)
        res = kabsch_ransac(
            corr.pts_obj[ok],
            pts_cam,
            corr.conf[ok],
            inlier_thresh=c.kabsch_inlier_frac * diameter,
            iterations=c.kabsch_iterations,
            max_points=c.max_points,
            conf_min=c.conf_min,
            min_inliers=c.min_inliers,
            min_inlier_ratio=c.min_inlier_ratio,
            seed=c.seed,
        )
        full = np.zeros(len(corr), dtype=bool)
        full[np.nonzero(ok)[0][res.inliers]] = True
        return RansacResult(res.T_cam_obj, full, res.rmse)

    def _initial(
        self,
        obs: Observation,
        corr: Correspondences,
        seg: SegmentationResult,
        diameter: float,
        use_depth: bool,
        samples: tuple[np.ndarray, np.ndarray],
    ) -> tuple[list[tuple[RansacResult, str, dict[str, Any]]], list[str]]:
        """Initial poses of one correspondence set: [(result, method, info)] and the reasons of failures."""
        c = self.config
        n = len(corr)
        if n < c.min_correspondences:
            raise PoseFailure(f"too few correspondences ({n} < {c.min_correspondences})")
        out: list[tuple[RansacResult, str, dict[str, Any]]] = []
        fails: list[str] = []
        if not use_depth:
            return [(self._pnp(obs, corr, seg), "pnp", {})], fails
        assert obs.depth is not None
        if c.rgbd_init in ("kabsch", "both"):
            try:
                out.append((self._kabsch(obs, corr, diameter), "kabsch", {}))
            except PoseFailure as exc:
                fails.append(f"kabsch: {exc.reason}")
        if c.rgbd_init in ("pnp", "both") or not out:
            try:
                res = self._pnp(obs, corr, seg)
            except PoseFailure as exc:
                fails.append(f"pnp: {exc.reason}")
            else:
                shifted = depth_shift(res.T_cam_obj, *samples, obs.camera.K, seg.mask, obs.depth)
                if shifted is None:
                    out.append((res, "pnp", {"note": "no depth under the mask for the depth shift"}))
                else:
                    T, dz = shifted
                    out.append((RansacResult(T, res.inliers, res.rmse), "pnp+depth", {"depth_shift_m": dz}))
        if not out:
            raise PoseFailure("; ".join(fails))
        return out, fails

    # -- stage -----------------------------------------------------------------------------------
    def __call__(
        self,
        obs: Observation,
        seg: SegmentationResult,
        corrs: list[Correspondences],
        obj: OnboardedObject,
    ) -> list[PoseHypothesis]:
        """Ranked hypotheses, best first; raises :class:`PoseFailure` with the reasons when none is trustworthy.

        = :meth:`propose`, then ICP (:meth:`refine`) of the ``icp_top_n`` best, re-ranked and de-duplicated.
        """
        c = self.config
        hyps, reasons = self._propose(obs, seg, corrs, obj)
        if self.uses_depth(obs) and c.icp:
            for h in hyps[: c.icp_top_n]:
                r = self.refine(obs, seg, h, obj)
                if r is not None:
                    h.T_cam_obj, h.score, h.info = r.T_cam_obj, r.score, r.info
            hyps.sort(key=lambda h: -h.score)
        return self._finish(hyps, reasons, obj)

    def uses_depth(self, obs: Observation) -> bool:
        """Whether this solver uses the depth of ``obs`` (present and ``use_depth``)."""
        return bool(self.config.use_depth and obs.depth is not None)

    def propose(
        self,
        obs: Observation,
        seg: SegmentationResult,
        corrs: list[Correspondences],
        obj: OnboardedObject,
    ) -> list[PoseHypothesis]:
        """Every initial hypothesis (per correspondence set and initialisation), without ICP, ranked by
        :func:`score_pose` and de-duplicated; raises :class:`PoseFailure` when there is none."""
        hyps, reasons = self._propose(obs, seg, corrs, obj)
        return self._finish(hyps, reasons, obj)

    def _finish(self, hyps: list[PoseHypothesis], reasons: list[str], obj: OnboardedObject) -> list[PoseHypothesis]:
        diameter = float(obj.model.diameter)
        center = np.asarray(getattr(obj.model, "center", np.zeros(3)), dtype=np.float64)
        hyps = self._dedup(hyps, obj.sym_Ts or [np.eye(4)], diameter, center)
        if reasons:
            hyps[0].info["failed"] = reasons
        if hyps[0].score < self.config.min_score:
            raise PoseFailure(f"best hypothesis score {hyps[0].score:.3f} < min_score {self.config.min_score:.3f}")
        return hyps

    def _propose(
        self,
        obs: Observation,
        seg: SegmentationResult,
        corrs: list[Correspondences],
        obj: OnboardedObject,
    ) -> tuple[list[PoseHypothesis], list[str]]:
        c = self.config
        mask = np.asarray(seg.mask, dtype=bool)
        if not mask.any():
            raise PoseFailure("empty segmentation mask")
        if not corrs:
            raise PoseFailure("no correspondence sets")
        diameter = float(obj.model.diameter)
        K = obs.camera.K
        use_depth = self.uses_depth(obs)
        depth = obs.depth if use_depth else None
        pts, nrm = self._samples(obj)
        tol = max(c.score_depth_tol_frac * diameter, c.score_depth_tol_floor)
        hyps: list[PoseHypothesis] = []
        reasons: list[str] = []
        for i, corr in enumerate(corrs):
            try:
                inits, fails = self._initial(obs, corr, seg, diameter, use_depth, (pts, nrm))
            except PoseFailure as exc:
                reasons.append(f"set {i}: {exc.reason}")
                continue
            reasons += [f"set {i}: {f}" for f in fails]
            for res, method, extra in inits:
                score, sinfo = score_pose(res.T_cam_obj, pts, nrm, K, mask, depth, depth_tol=tol)
                info: dict[str, Any] = {
                    "method": method,
                    "corr_set": i,
                    "n_corr": len(corr),
                    "ransac_rmse": res.rmse,
                    **extra,
                    **{f"score_{k}": v for k, v in sinfo.items()},
                }
                hyps.append(PoseHypothesis(res.T_cam_obj, score, res.n_inliers, info))
        if not hyps:
            raise PoseFailure("; ".join(reasons))
        hyps.sort(key=lambda h: -h.score)
        return hyps, reasons

    def refine(
        self, obs: Observation, seg: SegmentationResult, hyp: PoseHypothesis, obj: OnboardedObject
    ) -> PoseHypothesis | None:
        """ICP of one hypothesis onto the depth inside the dilated mask: a new, re-scored hypothesis
        (``info`` gains ``icp_*``; ``T_pre_icp`` when accepted), or None without depth / with ICP off."""
        c = self.config
        if not (self.uses_depth(obs) and c.icp):
            return None
        assert obs.depth is not None
        mask = np.asarray(seg.mask, dtype=bool)
        K = obs.camera.K
        pts, nrm = self._samples(obj)
        diameter = float(obj.model.diameter)
        center = np.asarray(getattr(obj.model, "center", np.zeros(3)), dtype=np.float64)
        spts = scene_points(obs.depth, K, mask, c.mask_dilate_px)
        r = self.icp(hyp.T_cam_obj, pts, nrm, spts, diameter, center_obj=center, seed=c.seed)
        info = {**hyp.info, "icp_fitness": r.fitness, "icp_rmse": r.rmse, "icp_accepted": r.accepted}
        if not r.accepted:
            info["icp_reason"] = r.reason
            return PoseHypothesis(hyp.T_cam_obj.copy(), hyp.score, hyp.inliers, info)
        info["T_pre_icp"] = hyp.T_cam_obj.tolist()
        tol = max(c.score_depth_tol_frac * diameter, c.score_depth_tol_floor)
        score, sinfo = score_pose(r.T_cam_obj, pts, nrm, K, mask, obs.depth, depth_tol=tol)
        info.update({f"score_{k}": v for k, v in sinfo.items()})
        return PoseHypothesis(r.T_cam_obj, score, hyp.inliers, info)

    def _dedup(
        self, hyps: list[PoseHypothesis], sym_Ts: list[np.ndarray], diameter: float, center: np.ndarray
    ) -> list[PoseHypothesis]:
        """Drop hypotheses equal (up to an object symmetry) to a better-ranked one (model centres compared)."""
        kept: list[PoseHypothesis] = []
        for h in hyps:
            dup = False
            ch = transform_points(h.T_cam_obj, center[None])[0]
            for k in kept:
                ck = transform_points(k.T_cam_obj, center[None])[0]
                if np.linalg.norm(ch - ck) > self.config.dedup_frac * diameter:
                    continue
                if rotation_error_sym_deg(h.T_cam_obj[:3, :3], k.T_cam_obj[:3, :3], sym_Ts) < self.config.dedup_deg:
                    dup = True
                    k.info["merged"] = int(k.info.get("merged", 0)) + 1
                    break
            if not dup:
                kept.append(h)
        return kept
