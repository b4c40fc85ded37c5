"""Depth-aware clean-up of stage-1 masks (RGB-D): drop the supporting plane, cut at depth discontinuities,
keep the connected 3D cluster (and grow it a little inside that cluster).

For one stage-1 instance mask with depth ``(H, W)`` metres and intrinsics ``K``:

1. *support plane*: RANSAC plane on the valid depth points of a context window (the mask box scaled by
   ``context_scale``) **outside** the (dilated) mask, so the object's own faces cannot be taken for it;
   accepted when at least ``plane_min_inliers`` of those points lie within ``max(plane_tol_floor,
   plane_tol_frac_z * z)`` of it. Mask pixels on the plane (or behind it) are removed.
2. *discontinuities*: pixels with a 4-neighbour more than ``max(edge_floor, edge_frac_z * z)`` away in
   depth are cut out, so touching objects at different depths separate.
3. *cluster*: the 8-connected component holding most of the stage-1 probability is kept; it grows into
   the off-plane, edge-free pixels connected to it within ``grow_frac`` of the mask box size; pixels
   without depth stay as stage 1 had them.

A mask that loses more than ``1 - min_keep_frac`` of its area this way is kept as it was unless the
support plane explains most of it (then the instance is dropped: it was the table, not the object).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import cv2
import numpy as np

from osop_ros.core.geometry import mask_to_box
from osop_ros.core.types import SegmentationResult


@dataclass
class DepthSegConfig:
    """Thresholds of :func:`refine_mask` (metres, pixels, fractions)."""

    context_scale: float = 2.0
    context_dilate_px: int = 5
    max_points: int = 3000
    ransac_iterations: int = 150
    plane_tol_floor: float = 0.006
    plane_tol_frac_z: float = 0.01
    plane_min_inliers: float = 0.3
    edge_floor: float = 0.01
    edge_frac_z: float = 0.03
    grow_frac: float = 0.1
    min_keep_frac: float = 0.3
    drop_on_plane_frac: float = 0.7
    min_area_px: int = 30
    seed: int = 0


def _points(depth: np.ndarray, K: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    z = depth[ys, xs].astype(np.float64)
    return np.stack([(xs - K[0, 2]) * z / K[0, 0], (ys - K[1, 2]) * z / K[1, 1], z], axis=1)


def fit_support_plane(
    pts: np.ndarray, tol: np.ndarray, iterations: int, min_inliers: float, rng: np.random.Generator
) -> tuple[np.ndarray, float] | None:
    """RANSAC plane ``n . p + d = 0`` (unit ``n`` towards the camera) through (N, 3) points with per-point
    tolerances ``tol`` (N,); None unless ``min_inliers`` of the points are inliers."""
    n_pts = len(pts)
    if n_pts < 30:
        return None
    idx = rng.integers(0, n_pts, size=(iterations, 3))
    a, b, c = pts[idx[:, 0]], pts[idx[:, 1]], pts[idx[:, 2]]
    nrm = np.cross(b - a, c - a)
    ln = np.linalg.norm(nrm, axis=1)
    ok = ln > 1e-9
    if not ok.any():
        return None
    nrm, a = nrm[ok] / ln[ok, None], a[ok]
    d = -np.einsum("ij,ij->i", nrm, a)
    dist = np.abs(pts @ nrm.T + d[None, :])  # (N, B)
    counts = (dist < tol[:, None]).sum(axis=0)
    k = int(np.argmax(counts))
    if counts[k] < min_inliers * n_pts:
        return None
    inl = dist[:, k] < tol
    # refit on the inliers (least squares through the centroid)
    P = pts[inl]
    cen = P.mean(axis=0)
    _, _, vt = np.linalg.svd(P - cen, full_matrices=False)
    n = vt[2]
    if n[2] > 0:  # the camera looks along +z: the visible side of a support plane faces -z
        n = -n
    return n, float(-n @ cen)


def _depth_jumps(d: np.ndarray, floor: float, frac: float) -> np.ndarray:
    v = d > 0
    out = np.zeros(d.shape, bool)
    for sa, sb in ((np.s_[:, 1:], np.s_[:, :-1]), (np.s_[1:, :], np.s_[:-1, :])):
        a, b = d[sa], d[sb]
        jump = v[sa] & v[sb] & (np.abs(a - b) > np.maximum(floor, frac * np.minimum(a, b)))
        out[sa] |= jump
        out[sb] |= jump
    return out


def refine_mask(
    seg: SegmentationResult, depth: np.ndarray, K: np.ndarray, config: DepthSegConfig | None = None
) -> tuple[SegmentationResult | None, dict[str, float]]:
    """Cleaned instance (None = dropped: the mask was the support plane) and what was done (see module doc)."""
    c = config or DepthSegConfig()
    info: dict[str, float] = {"area_in": float(seg.mask.sum())}
    if seg.box is None or not seg.mask.any():
        return seg, info
    H, W = depth.shape
    x0, y0, x1, y1 = seg.box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    bx0, by0 = int(max(0, cx - c.context_scale * hw)), int(max(0, cy - c.context_scale * hh))
    bx1, by1 = int(min(W, cx + c.context_scale * hw + 1)), int(min(H, cy + c.context_scale * hh + 1))
    m = seg.mask[by0:by1, bx0:bx1]
    d = depth[by0:by1, bx0:bx1].astype(np.float32)
    Kc = K.copy()
    Kc[0, 2] -= bx0
    Kc[1, 2] -= by0
    rng = np.random.default_rng(c.seed)
    valid = d > 0
    # 1. support plane from context points outside the dilated mask
    k = 2 * c.context_dilate_px + 1
    ctx = valid & ~cv2.dilate(m.astype(np.uint8), np.ones((k, k), np.uint8)).astype(bool)
    ys, xs = np.nonzero(ctx)
    on_plane = np.zeros_like(m)
    if len(ys) > c.max_points:
        sel = rng.choice(len(ys), c.max_points, replace=False)
        ys, xs = ys[sel], xs[sel]
    plane = None
    if len(ys) >= 30:
        pts = _points(d, Kc, ys, xs)
        plane = fit_support_plane(pts, np.maximum(c.plane_tol_floor, c.plane_tol_frac_z * pts[:, 2]),
                                  c.ransac_iterations, c.plane_min_inliers, rng)
    if plane is not None:
        n, off = plane
        vy, vx = np.nonzero(valid)
        p = _points(d, Kc, vy, vx)
        sd = p @ n + off  # signed distance, > 0 towards the camera
        on = sd < np.maximum(c.plane_tol_floor, c.plane_tol_frac_z * p[:, 2])
        on_plane[vy[on], vx[on]] = True
        info["plane_inlier_frac_of_mask"] = float((on_plane & m).sum() / max(m.sum(), 1))
    # 2. depth discontinuities, 3. the connected cluster
    free = ~on_plane & ~_depth_jumps(d, c.edge_floor, c.edge_frac_z)
    cand = m & free
    n_lab, lab = cv2.connectedComponents(cand.astype(np.uint8), connectivity=8)
    if n_lab <= 1:
        if info.get("plane_inlier_frac_of_mask", 0.0) >= c.drop_on_plane_frac:
            info["dropped"] = 1.0
            return None, info
        return seg, info
    prob = seg.prob[by0:by1, bx0:bx1]
    mass = np.bincount(lab.ravel(), weights=np.where(cand, prob + 1e-3, 0.0).ravel(), minlength=n_lab)
    mass[0] = 0.0
    keep = lab == int(np.argmax(mass))
    # grow inside the off-plane, edge-free region connected to the cluster, within a margin
    r = max(1, int(round(c.grow_frac * max(x1 - x0, y1 - y0))))
    near = cv2.dilate(keep.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    region = (free & valid & near.astype(bool)) | keep
    n2, lab2 = cv2.connectedComponents(region.astype(np.uint8), connectivity=8)
    ids = np.unique(lab2[keep])
    grown = np.isin(lab2, ids[ids > 0]) | keep
    grown |= m & ~valid & cv2.dilate(grown.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    grown = cv2.morphologyEx(grown.astype(np.uint8), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8)).astype(bool)
    area = int(grown.sum())
    info["area_out"] = float(area)
    if area < max(c.min_area_px, c.min_keep_frac * m.sum()):
        if info.get("plane_inlier_frac_of_mask", 0.0) >= c.drop_on_plane_frac:
            info["dropped"] = 1.0
            return None, info
        return seg, info
    full = np.zeros_like(seg.mask)
    full[by0:by1, bx0:bx1] = grown
    score = float(seg.prob[full].mean()) if full.any() else seg.score
    # the segmenter's ranking of the candidate (proposals) stays with it
    return dataclasses.replace(seg, mask=full, box=mask_to_box(full), score=score), info


class DepthMaskRefiner:
    """Applies :func:`refine_mask` to every stage-1 instance of a frame with depth (see module doc)."""

    def __init__(self, config: DepthSegConfig | None = None) -> None:
        self.config = config or DepthSegConfig()

    def __call__(self, segs: list[SegmentationResult], depth: np.ndarray, K: np.ndarray) -> list[SegmentationResult]:
        out = []
        for s in segs:
            r, _ = refine_mask(s, depth, K, self.config)
            if r is not None:
                out.append(r)
        return out
