"""Edge-based refinement of an RGB pose: the rendered silhouette contour pulled onto the image edges.

Without depth the verifier's silhouette/edge score fixes the distance only to a few per cent (its crop is
112 px and its edge test a hit/miss within a radius), and a few per cent of the distance is a quarter of
the diameter on LM-O. This stage does what model-based edge trackers do (RAPiD-style): render the model at
the current pose into a crop of up to ``side`` pixels, take ``n_points`` points on the silhouette contour
with their outward normals and model coordinates, search along each normal for the nearest strong image
edge (the intensity gradient across the contour, sub-pixel, measured against the same search on the
rendered mask so that the half-pixel offset of the contour pixels cancels), and solve for the small rigid
motion (rotation about the model centre and translation, or a subset: ``dof``) that moves the contour onto
those edges in a robust (Huber), damped least-squares sense; ``iterations`` times, the search range
shrinking.

The stage-1 mask steers it: contour points with no mask boundary within ``mask_gate_px`` are dropped (the
object is occluded there or the mask disagrees, and the nearest edge belongs to something else), and edges
near the mask boundary are preferred (``mask_sigma_px``): in clutter the nearest strong edge is often the
background's. A weak prior holds the rotation (``rot_prior_deg``): the silhouette alone leaves some rotations
free. :class:`RgbContourRefine` verifies the result for the published score. Settings chosen on our own val
sets (docs/results.md, session 22).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from osop_ros.core.geometry import transform_points
from osop_ros.core.types import InvalidInputError, Observation, RenderOutput, SegmentationResult
from osop_ros.core.verify import crop_camera, crop_region, inside_image, projected_bbox, resize_to

if TYPE_CHECKING:
    from osop_ros.core.stages import OnboardedObject
    from osop_ros.core.verify import Verification, Verifier

DOF_CHOICES = ("full", "translation", "depth")


@dataclass
class ContourRefineConfig:
    """Settings of :class:`ContourRefiner`; pixels are full-image pixels."""

    iterations: int = 6  # Gauss-Newton steps
    search_px: float = 10.0  # half-length of the edge search along each normal, first step
    final_search_px: float = 4.0  # ... last step (shrinks linearly)
    side: int = 320  # longest crop side rendered (px)
    n_points: int = 240  # contour points per step
    min_points: int = 24  # fewer usable points: not refined
    huber_px: float = 1.5  # robust loss scale
    damping: float = 0.1  # Levenberg-Marquardt factor on the diagonal of the normal equations
    rot_prior_deg: float = 10.0  # "full": rotating this far from the input costs like every point 1 px off
    min_gradient: float = 6.0  # weakest edge used (grey levels per pixel across the contour)
    mask_gate_px: float = 12.0  # points with no stage-1 mask boundary this near are dropped (0 = no gate)
    mask_sigma_px: float = 2.0  # Gaussian preference for edges near the mask boundary (0 = none; needs the gate)
    dof: str = "full"  # full (rotation + translation) | translation | depth (along the viewing ray)
    max_rotation_deg: float = 15.0  # a larger total rotation change: rejected (input kept)
    max_shift_frac: float = 0.3  # a larger total translation (fraction of the diameter): rejected

    def __post_init__(self) -> None:
        if self.dof not in DOF_CHOICES:
            raise InvalidInputError(f"contour refine dof must be one of {DOF_CHOICES}, got {self.dof!r}")
        if not 1 <= self.iterations <= 50:
            raise InvalidInputError(f"contour refine iterations must be in [1, 50], got {self.iterations}")
        if not 0.5 <= self.final_search_px <= self.search_px <= 64:
            raise InvalidInputError("contour refine search: need 0.5 <= final_search_px <= search_px <= 64")
        if not 32 <= self.side <= 1024:
            raise InvalidInputError(f"contour refine side must be in [32, 1024], got {self.side}")
        if not 8 <= self.min_points <= self.n_points:
            raise InvalidInputError("contour refine: need 8 <= min_points <= n_points")
        if min(self.huber_px, self.damping, self.rot_prior_deg, self.min_gradient, self.mask_gate_px,
               self.mask_sigma_px) < 0 or self.huber_px <= 0:
            raise InvalidInputError("contour refine: huber_px must be > 0 and the weights and thresholds >= 0")


@dataclass
class ContourResult:
    """Refined pose (4, 4) and diagnostics: points used in the last step, its median |residual| (px)."""

    T_cam_obj: np.ndarray
    n_points: int
    residual_px: float
    iterations: int
    ok: bool


def _rot(w: np.ndarray) -> np.ndarray:
    """(3, 3) rotation of the rotation vector ``w`` (3,)."""
    R, _ = cv2.Rodrigues(np.asarray(w, dtype=np.float64).reshape(3, 1))
    return R


def _edge_offsets(gx: np.ndarray, gy: np.ndarray, us: np.ndarray, vs: np.ndarray, nx: np.ndarray, ny: np.ndarray,
                  offs: np.ndarray, r: float, prior: np.ndarray | None = None,
                  prior_sigma: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Offset (N,) of the nearest strong edge along each normal (sub-sample) and its gradient (N,).

    The gradient across the contour (``gx``, ``gy`` (H, W) float32) is sampled at ``offs`` (M,) pixels along
    the normals (``nx``, ``ny``) of the points (``us``, ``vs``), weighted towards 0 (Gaussian, 0.6 ``r``)
    and, with ``prior`` (H, W) float32 distances (to the stage-1 mask boundary), towards small distances
    (Gaussian, ``prior_sigma``).
    """
    mx = (us[:, None] + offs[None] * nx[:, None]).astype(np.float32)
    my = (vs[:, None] + offs[None] * ny[:, None]).astype(np.float32)
    sx = cv2.remap(gx, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    sy = cv2.remap(gy, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    gn = np.abs(sx * nx[:, None] + sy * ny[:, None])
    wgt = gn * np.exp(-0.5 * (offs[None] / max(0.6 * r, 1.0)) ** 2)
    if prior is not None and prior_sigma > 0:
        dm = cv2.remap(prior, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=1e3)
        wgt = wgt * np.exp(-0.5 * (dm / prior_sigma) ** 2)
    rows = np.arange(len(us))
    j = np.argmax(wgt, axis=1)
    jj = np.clip(j, 1, len(offs) - 2)
    a, b, c = wgt[rows, jj - 1], wgt[rows, jj], wgt[rows, jj + 1]
    den = a - 2 * b + c
    ok = (np.abs(den) > 1e-6) & (j == jj)
    sub = np.where(ok, 0.5 * (a - c) / np.where(ok, den, 1.0), 0.0)
    step = float(offs[1] - offs[0]) if len(offs) > 1 else 1.0
    return offs[j] + np.clip(sub, -0.5, 0.5) * step, gn[rows, j]


class ContourRefiner:
    """Pulls a pose's rendered contour onto the image edges (see module doc).

    ``render(K, W, H, obj, T) -> RenderOutput`` renders one object (the verifier's renderer).
    """

    def __init__(
        self,
        render: Callable[[np.ndarray, int, int, OnboardedObject, np.ndarray], RenderOutput],
        config: ContourRefineConfig | None = None,
    ) -> None:
        self.render = render
        self.config = config or ContourRefineConfig()

    def _crop(self, K: np.ndarray, T: np.ndarray, obj: OnboardedObject, shape: tuple[int, int],
              pad_px: float) -> tuple[tuple[int, int, int, int], tuple[int, int], np.ndarray, float] | None:
        """(box, (Wc, Hc), Kc, crop px per image px) around the projected model box padded by ``pad_px``."""
        proj = projected_bbox(K, T, obj)
        if proj is None:
            return None
        H, W = shape
        x0, y0 = np.floor(proj[0] - pad_px)
        x1, y1 = np.ceil(proj[1] + pad_px) + 1
        x0, y0, x1, y1 = max(x0, -W), max(y0, -H), min(x1, 2 * W), min(y1, 2 * H)
        if x1 - x0 < 8 or y1 - y0 < 8:
            return None
        box = (int(x0), int(y0), int(x1), int(y1))
        size, Kc = crop_camera(K, box, self.config.side)
        return box, size, Kc, float(np.sqrt(size[0] / (box[2] - box[0]) * size[1] / (box[3] - box[1])))

    def _measure(
        self, gray_full: np.ndarray, mask_full: np.ndarray | None, K: np.ndarray, obj: OnboardedObject,
        T: np.ndarray, r_full: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float] | None:
        """Contour points of ``obj`` rendered at ``T`` and their observed edge offsets, or None (too few).

        Returns (model points (N, 3) m, outward normals (N, 2), edge offsets along them (N,) crop px, the
        crop intrinsics Kc (3, 3), crop px per image px); ``r_full``: search half-length in image px.
        """
        c = self.config
        H, W = gray_full.shape
        crop = self._crop(K, T, obj, (H, W), r_full + 4)
        if crop is None:
            return None
        box, (Wc, Hc), Kc, s = crop
        out = self.render(Kc, Wc, Hc, obj, T)
        rend = np.asarray(out.mask, dtype=bool)
        if int(rend.sum()) < 30:
            return None
        gray = resize_to(crop_region(gray_full, box), (Wc, Hc), cv2.INTER_AREA).astype(np.float32)
        gray = cv2.GaussianBlur(gray, (0, 0), 1.0)
        gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3) / 8.0
        gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3) / 8.0
        inside = inside_image(box, (Wc, Hc), (H, W))
        # contour pixels, outward normals
        er = cv2.erode(rend.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        soft = cv2.GaussianBlur(rend.astype(np.float32), (0, 0), 1.5)
        sgx = cv2.Sobel(soft, cv2.CV_32F, 1, 0, ksize=3)
        sgy = cv2.Sobel(soft, cv2.CV_32F, 0, 1, ksize=3)
        vs, us = np.nonzero(rend & ~er & inside)
        nx, ny = -sgx[vs, us], -sgy[vs, us]
        nn = np.hypot(nx, ny)
        keep = nn > 1e-3
        vs, us, nx, ny, nn = vs[keep], us[keep], nx[keep], ny[keep], nn[keep]
        if len(vs) < c.min_points:
            return None
        nx, ny = nx / nn, ny / nn
        if len(vs) > c.n_points:
            # even spacing along the raster order is close enough to even spacing along the contour
            idx = np.linspace(0, len(vs) - 1, c.n_points).round().astype(np.int64)
            vs, us, nx, ny = vs[idx], us[idx], nx[idx], ny[idx]
        r = max(1.0, r_full * s)  # crop pixels
        dist = None
        if mask_full is not None:
            m = resize_to(crop_region(mask_full, box), (Wc, Hc), cv2.INTER_NEAREST)
            mb = m.astype(bool) & ~cv2.erode(m, np.ones((3, 3), np.uint8)).astype(bool)
            if not mb.any():
                return None
            dist = cv2.distanceTransform(np.where(mb, 0, 255).astype(np.uint8), cv2.DIST_L2, 3)
            gate = dist[vs, us] <= max(r, c.mask_gate_px * s)
            vs, us, nx, ny = vs[gate], us[gate], nx[gate], ny[gate]
            if len(vs) < c.min_points:
                return None
        # edge search along each normal (sub-pixel), in the image and, for the reference position of the
        # rendered edge (half a pixel outside the contour pixels, blurred alike), in the rendered mask
        offs = np.arange(-np.ceil(r), np.ceil(r) + 0.5, 0.5, dtype=np.float32)
        d, gmax = _edge_offsets(gx, gy, us, vs, nx, ny, offs, r, dist, c.mask_sigma_px * s)
        rmask = cv2.GaussianBlur(rend.astype(np.float32) * 255.0, (0, 0), 1.0)
        rgx = cv2.Sobel(rmask, cv2.CV_32F, 1, 0, ksize=3) / 8.0
        rgy = cv2.Sobel(rmask, cv2.CV_32F, 0, 1, ksize=3) / 8.0
        d_ref, _ = _edge_offsets(rgx, rgy, us, vs, nx, ny, offs[np.abs(offs) <= 2.0], 2.0)
        strong = gmax >= c.min_gradient
        if int(strong.sum()) < c.min_points:
            return None
        xyz = np.asarray(out.xyz, dtype=np.float64)[vs[strong], us[strong]]
        normals = np.stack([nx[strong], ny[strong]], axis=1)
        return xyz, normals, (d - d_ref)[strong].astype(np.float64), Kc, s

    def _step(
        self, T: np.ndarray, center: np.ndarray, xyz: np.ndarray, normals: np.ndarray, d: np.ndarray,
        Kc: np.ndarray, s: float, w_acc: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, float]:
        """One robust damped Gauss-Newton step: (rotation change (3,) rad, translation (3,) m, median |residual| px).

        ``w_acc`` (3,): the rotation vector already turned away from the input (for the rotation prior).
        """
        c = self.config
        X = transform_points(T, xyz)
        z = np.maximum(X[:, 2], 1e-4)
        fx, fy = Kc[0, 0], Kc[1, 1]
        du = np.stack([fx / z, np.zeros_like(z), -fx * X[:, 0] / z**2], axis=1)
        dv = np.stack([np.zeros_like(z), fy / z, -fy * X[:, 1] / z**2], axis=1)
        dn = normals[:, :1] * du + normals[:, 1:] * dv  # (N, 3) d(normal displacement) / dX
        cc_cam = transform_points(T, center[None])[0]
        ray = cc_cam / np.linalg.norm(cc_cam)
        if c.dof == "full":
            J = np.concatenate([np.cross(X - cc_cam, dn), dn], axis=1)  # dn . (w x Y) = w . (Y x dn)
        elif c.dof == "translation":
            J = dn
        else:
            J = (dn @ ray)[:, None]
        xi = np.zeros(J.shape[1])
        for _ in range(4):  # IRLS with Huber weights
            a = np.abs(J @ xi - d)
            w = np.where(a <= c.huber_px * s, 1.0, c.huber_px * s / np.maximum(a, 1e-9))
            A = J.T @ (J * w[:, None])
            A = A + c.damping * np.diag(np.diag(A)) + 1e-9 * np.eye(J.shape[1])
            b = J.T @ (w * d)
            if c.dof == "full" and c.rot_prior_deg > 0:
                # prior: the total rotation change costs like every point off by (angle / rot_prior) px
                lam = len(d) / math.radians(c.rot_prior_deg) ** 2
                A[:3, :3] += lam * np.eye(3)
                b[:3] -= lam * w_acc
            xi = np.linalg.solve(A, b)
        med = float(np.median(np.abs(J @ xi - d))) / s
        if c.dof == "full":
            return xi[:3], xi[3:], med
        if c.dof == "translation":
            return np.zeros(3), xi, med
        return np.zeros(3), xi[0] * ray, med

    def __call__(
        self, obs: Observation, seg: SegmentationResult | None, obj: OnboardedObject, T_cam_obj: np.ndarray
    ) -> ContourResult:
        """Refined ``T_cam_obj`` (4, 4); ``ok`` False (and the input pose) when it could not be refined."""
        c = self.config
        T0 = np.asarray(T_cam_obj, dtype=np.float64)
        T = T0.copy()
        center = np.asarray(getattr(obj.model, "center", np.zeros(3)), dtype=np.float64)
        diameter = float(obj.model.diameter)
        gray_full = cv2.cvtColor(obs.rgb, cv2.COLOR_RGB2GRAY)
        mask_full = None if seg is None or c.mask_gate_px <= 0 else np.asarray(seg.mask, dtype=np.uint8)
        fail = ContourResult(T0.copy(), 0, float("nan"), 0, False)
        n_used, med = 0, float("nan")
        w_acc = np.zeros(3)  # rotation vector of the rotation change so far (camera frame)
        for it in range(c.iterations):
            r_full = c.search_px + (c.final_search_px - c.search_px) * it / max(c.iterations - 1, 1)
            meas = self._measure(gray_full, mask_full, obs.camera.K, obj, T, r_full)
            if meas is None:
                return fail
            xyz, normals, d, Kc, s = meas
            dw, dt, med = self._step(T, center, xyz, normals, d, Kc, s, w_acc)
            n_used = len(d)
            # one step turns at most 3 degrees and moves at most 5 % of the diameter
            ang = float(np.linalg.norm(dw))
            if ang > math.radians(3.0):
                dw = dw * math.radians(3.0) / ang
            sh = float(np.linalg.norm(dt))
            if sh > 0.05 * diameter:
                dt = dt * 0.05 * diameter / sh
            R_new = _rot(dw) @ T[:3, :3]
            w_acc = cv2.Rodrigues(R_new @ T0[:3, :3].T)[0].ravel()
            c_new = transform_points(T, center[None])[0] + dt
            T = np.eye(4)
            T[:3, :3] = R_new
            T[:3, 3] = c_new - R_new @ center
        # a runaway is rejected
        dR = T[:3, :3] @ T0[:3, :3].T
        ang = math.degrees(math.acos(float(np.clip((np.trace(dR) - 1) / 2, -1, 1))))
        shift = np.linalg.norm(transform_points(T, center[None])[0] - transform_points(T0, center[None])[0])
        if ang > c.max_rotation_deg or shift > c.max_shift_frac * diameter:
            return fail
        return ContourResult(T, n_used, med, c.iterations, True)


@dataclass
class ContourChoice:
    """Result of :class:`RgbContourRefine`: the pose (4, 4), its verification (None when not refined: the
    caller's stands) and the refinement's diagnostics."""

    T_cam_obj: np.ndarray
    verification: Verification | None
    result: ContourResult


class RgbContourRefine:
    """The contour refinement of an RGB pose, verified. Kept whenever it succeeds (``ok``): on our three own
    val sets keeping it only when the raw verification score rose was no better (docs/results.md, session 22)."""

    def __init__(self, verifier: Verifier, config: ContourRefineConfig | None = None) -> None:
        self.verifier = verifier
        self.config = config or ContourRefineConfig()
        self._refine = ContourRefiner(verifier.render_view, self.config)

    def __call__(
        self,
        obs: Observation,
        seg: SegmentationResult | None,
        obj: OnboardedObject,
        T_cam_obj: np.ndarray,
        extra: dict[str, float] | None = None,
    ) -> ContourChoice:
        """Refined ``T_cam_obj`` (4, 4) and its verification (the depth of ``obs`` unused)."""
        rgb_only = Observation(obs.rgb, obs.camera, None)
        r = self._refine(rgb_only, seg, obj, T_cam_obj)
        if not r.ok:
            return ContourChoice(np.asarray(T_cam_obj, dtype=np.float64), None, r)
        return ContourChoice(r.T_cam_obj, self.verifier.verify(rgb_only, seg, obj, r.T_cam_obj, False, extra), r)
