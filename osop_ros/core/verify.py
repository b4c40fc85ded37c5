"""Render-and-compare verification of pose hypotheses, and the calibrated score ("is the pose right?").

:class:`Verifier` renders the object's depth and mask at a hypothesis ``T_cam_obj`` (the project's
:class:`~osop_ros.core.render.Renderer`) in a crop around the stage-1 mask box and the hypothesis'
projected box, at most ``render_side`` pixels on its longer side, and compares it with the
observation resampled into the same crop (nearest for depth/mask, area for the grey image):

* depth (RGB-D): residual ``r = observed - rendered`` over the rendered pixels with valid depth;
  tolerance ``max(depth_tol_floor, depth_tol_frac_z * z)`` metres. ``r < -tol`` (observed surface in
  front of the model) is occlusion, excluded from the error; ``|r| <= tol`` is an inlier; ``r > tol``
  (observed surface behind the model: the model occupies free space) is an error.
  ``depth_inlier = inliers / (inliers + behind)``; ``occluded`` = occluded fraction.
* silhouette: IoU of the visible (not occluded) rendered mask with the stage-1 mask (pixels outside
  the image are ignored).
* edges: fraction of the visible rendered contour (silhouette + depth discontinuities) with an
  observed edge (Canny of the image; RGB-D: + depth discontinuities) within ``edge_radius`` pixels
  and at most ``edge_angle_deg`` apart in orientation, corrected for the chance level of the crop
  (``(hit - chance) / (1 - chance)``, clipped at 0).

* colour: share of visible rendered pixels whose chromaticity (Lab a, b) matches the image within
  ``color_tol`` after removing the median difference (colour cast / white balance).
* texture edges: the edge test for the intensity edges of the rendered (coloured) model inside its
  visible silhouette against the image edges (NaN for untextured models); a calibration feature only.

:func:`model_flips`: 180-degree flips about the model's principal axes. Such poses often agree with the
depth and the silhouette, and only colour and edges tell them apart; :func:`select_hypothesis` can verify
them as extra candidates (``flip_top_n``, off by default), and ``report_flips`` makes the pipeline report
their features as hard negatives for fitting the calibration. ``flip_margin`` (a calibration feature):
the chosen pose's raw score minus the best raw score of its flips that are not symmetries of the object
(:func:`nonsymmetric_flips`): a pose whose upside-down twin explains the image as well is not sure.

``raw`` score (ranking): geometric mean of ``depth_inlier`` (RGB-D), ``iou``, ``edge`` and
``(1 + color) / 2``, times ``visibility = min(1, (1 - occluded) / min_visible_frac)`` (RGB-D), which
penalises hypotheses whose model is mostly hidden behind observed surfaces.

:class:`ScoreCalibration` maps the features to P(pose correct) with a logistic (Platt) model per
modality, loaded from a small YAML/JSON file (``config/score_calibration.yaml``, fitted by
``osop eval --fit-calibration``, see :mod:`osop_ros.eval.calibration`).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import yaml

from osop_ros.core.geometry import transform_points
from osop_ros.core.types import InvalidInputError, Observation, PoseHypothesis, RenderOutput, SegmentationResult

if TYPE_CHECKING:
    from osop_ros.core.stages import OnboardedObject

log = logging.getLogger(__name__)

FEATURE_NAMES = (
    "raw", "iou", "mask_recall", "mask_precision", "edge", "texture_edge", "color", "depth_inlier", "depth_behind",
    "occluded", "depth_valid", "seg_score", "match_score", "seg_rank", "seg_margin", "flip_margin",
)
"""Every feature a :class:`Verification` carries (``depth_*``/``occluded`` are NaN without depth;
``flip_margin`` only when the pipeline verified the pose's flips, see :func:`flip_margins`)."""


@dataclass
class VerifierConfig:
    """Thresholds of :class:`Verifier` (pixels are crop pixels, distances metres)."""

    render_side: int = 112
    pad_frac: float = 0.08
    depth_tol_floor: float = 0.01
    depth_tol_frac_z: float = 0.02
    min_visible_frac: float = 0.4
    edge_radius_frac: float = 0.025
    edge_radius_min_px: float = 1.5
    edge_angle_deg: float = 30.0
    canny_low: int = 30
    canny_high: int = 90
    depth_edge_frac_z: float = 0.04
    min_depth_px: int = 20
    min_render_px: int = 12
    color_tol: float = 14.0
    min_texture_px: int = 15
    # 180-degree flips of the best hypotheses verified as extra candidates (0 = off: measured worse on
    # heldout_b, AR 0.311 -> 0.290, the raw score picks wrong flips of box/can-like objects)
    flip_top_n: int = 0
    # eval: also report the features of the chosen pose's flips (hard negatives for calibration fitting)
    report_flips: bool = False


@dataclass
class Verification:
    """Outcome for one hypothesis: ``raw`` score in [0, 1] (ranking) and every feature (see module doc)."""

    raw: float
    features: dict[str, float]
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)
    scale: float = 1.0


@dataclass
class _Crop:
    """Integer full-image box ``(x0, y0, x1, y1)`` resampled to ``(Wc, Hc)``; ``Kc`` its intrinsics."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    Kc: np.ndarray


def crop_region(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``img[y0:y1, x0:x1]`` with zero padding where the box leaves the image."""
    x0, y0, x1, y1 = box
    H, W = img.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0, *img.shape[2:]), dtype=img.dtype)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, W), min(y1, H)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


def resize_to(img: np.ndarray, size: tuple[int, int], interp: int) -> np.ndarray:
    """``img`` resized to ``size`` = (W, H) with ``interp`` (returned as is when it already has that size)."""
    if (img.shape[1], img.shape[0]) == size:
        return img
    return cv2.resize(img, size, interpolation=interp)


def projected_bbox(K: np.ndarray, T_cam_obj: np.ndarray, obj: OnboardedObject) -> tuple[np.ndarray, np.ndarray] | None:
    """(uv_min (2,), uv_max (2,)) px of the model's bounding-box corners projected with ``K`` (3, 3) at
    ``T_cam_obj`` (4, 4); None when a corner is behind the camera or not finite."""
    lo, hi = np.asarray(obj.model.bbox_min, float), np.asarray(obj.model.bbox_max, float)
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    p = transform_points(T_cam_obj, corners)
    if np.any(p[:, 2] <= 1e-3) or not np.all(np.isfinite(p)):
        return None
    uv = p[:, :2] / p[:, 2:3] * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])
    return uv.min(axis=0), uv.max(axis=0)


def crop_camera(K: np.ndarray, box: tuple[int, int, int, int], side: int) -> tuple[tuple[int, int], np.ndarray]:
    """((Wc, Hc), Kc (3, 3)): the integer full-image ``box`` resampled so its longest side is at most ``side``
    px (never enlarged), and the intrinsics of that crop (pixel centres kept)."""
    w, h = box[2] - box[0], box[3] - box[1]
    s = min(1.0, side / max(w, h))
    Wc, Hc = max(8, round(w * s)), max(8, round(h * s))
    sx, sy = Wc / w, Hc / h
    Kc = np.array(
        [[K[0, 0] * sx, 0.0, (K[0, 2] - box[0] + 0.5) * sx - 0.5],
         [0.0, K[1, 1] * sy, (K[1, 2] - box[1] + 0.5) * sy - 0.5],
         [0.0, 0.0, 1.0]]
    )
    return (Wc, Hc), Kc


def inside_image(box: tuple[int, int, int, int], size: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    """(Hc, Wc) bool: the pixels of ``box`` resampled to ``size`` = (Wc, Hc) that lie inside the ``shape`` =
    (H, W) image."""
    return resize_to(crop_region(np.ones(shape, np.uint8), box), size, cv2.INTER_NEAREST).astype(bool)


def _contour(mask: np.ndarray) -> np.ndarray:
    """Inner boundary pixels of a bool mask (4-connected erosion)."""
    m = mask.astype(np.uint8)
    return mask & ~cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def _depth_edges(depth: np.ndarray, frac: float, floor: float) -> np.ndarray:
    """Pixels with a valid 4-neighbour whose depth differs by more than ``max(floor, frac * z)``."""
    d = depth.astype(np.float32)
    v = d > 0
    out = np.zeros(d.shape, bool)
    for a, b, va, vb, sa, sb in (
        (d[:, 1:], d[:, :-1], v[:, 1:], v[:, :-1], np.s_[:, 1:], np.s_[:, :-1]),
        (d[1:, :], d[:-1, :], v[1:, :], v[:-1, :], np.s_[1:, :], np.s_[:-1, :]),
    ):
        jump = va & vb & (np.abs(a - b) > np.maximum(floor, frac * np.minimum(a, b)))
        out[sa] |= jump
        out[sb] |= jump
    return out


def _orientation(img: np.ndarray) -> np.ndarray:
    """(H, W) gradient direction in radians of a float image (3x3 Sobel)."""
    f = img.astype(np.float32)
    return np.arctan2(cv2.Sobel(f, cv2.CV_32F, 0, 1, ksize=3), cv2.Sobel(f, cv2.CV_32F, 1, 0, ksize=3))


def edge_agreement(
    rendered_edges: np.ndarray,
    rendered_theta: np.ndarray,
    observed_edges: np.ndarray,
    observed_theta: np.ndarray,
    radius_px: float,
    max_angle_deg: float,
) -> tuple[float, float]:
    """(hit fraction, chance level) of rendered edge pixels with an observed edge within ``radius_px``
    whose orientation differs by at most ``max_angle_deg`` (direction-free); all (H, W)."""
    n_r = int(rendered_edges.sum())
    if n_r == 0 or not observed_edges.any():
        return 0.0, 0.0
    src = np.where(observed_edges, 0, 255).astype(np.uint8)
    dist, labels = cv2.distanceTransformWithLabels(src, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
    # labels number the zero pixels (observed edges) in raster order, starting at 1
    theta_of_label = np.concatenate([[0.0], observed_theta[observed_edges]])
    near = dist <= radius_px
    cos_max = math.cos(math.radians(max_angle_deg))
    sel = rendered_edges & near
    d_theta = rendered_theta[sel] - theta_of_label[labels[sel]]
    hit = int((np.abs(np.cos(d_theta)) >= cos_max).sum())
    chance = float(near.mean()) * (2.0 * max_angle_deg / 180.0)
    return hit / n_r, min(chance, 0.99)


class Verifier:
    """Scores pose hypotheses by rendering them (see module doc). One renderer per calling thread,
    created on first use; :meth:`release` frees them."""

    def __init__(self, config: VerifierConfig | None = None, renderer_factory: Callable[[], Any] | None = None) -> None:
        self.config = config or VerifierConfig()
        self._factory = renderer_factory
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    # -- renderer --------------------------------------------------------------------------------
    def _renderer(self) -> tuple[Any, list[tuple[Any, str]]]:
        r = getattr(self._local, "renderer", None)
        if r is None:
            if self._factory is None:
                from osop_ros.core.render import Renderer

                r = Renderer()
            else:
                r = self._factory()
            self._local.renderer, self._local.keys = r, []
            with self._lock:
                self._all.append(r)
        return r, self._local.keys

    def _key(self, obj: OnboardedObject) -> str:
        """The renderer key of ``obj.model`` in this thread's renderer (added on first use).

        Looked up by identity, not by ``id()``: a new model that reused a freed one's id would otherwise be
        rendered with the old mesh. (A handful of objects per pipeline: a list is enough.)
        """
        r, keys = self._renderer()
        for model, key in keys:
            if model is obj.model:
                return key
        key = f"verify_{len(keys)}_{obj.name}"
        r.add_object(key, obj.model)
        keys.append((obj.model, key))
        return key

    def release(self) -> None:
        """Free the renderers of every thread (call when the pipeline is discarded)."""
        with self._lock:
            for r in self._all:
                r.release()
            self._all.clear()
        self._local = threading.local()

    # -- geometry --------------------------------------------------------------------------------
    def _crop(self, K: np.ndarray, T_cam_obj: np.ndarray, obj: OnboardedObject,
              seg_box: tuple[int, int, int, int] | None, shape: tuple[int, int]) -> _Crop | None:
        """Crop around the projected model bounding box and the mask box; None when behind the camera."""
        proj = projected_bbox(K, T_cam_obj, obj)
        if proj is None:
            return None
        H, W = shape
        x0, y0 = np.floor(proj[0])
        x1, y1 = np.ceil(proj[1]) + 1
        # a projection far larger than the image (object at the lens) is clamped to a 3x image window
        x0, x1 = max(x0, -W), min(x1, 2 * W)
        y0, y1 = max(y0, -H), min(y1, 2 * H)
        if seg_box is not None:
            x0, y0 = min(x0, seg_box[0]), min(y0, seg_box[1])
            x1, y1 = max(x1, seg_box[2]), max(y1, seg_box[3])
        if x1 <= x0 or y1 <= y0:
            return None
        pad = self.config.pad_frac * max(x1 - x0, y1 - y0) + 2
        box = (int(x0 - pad), int(y0 - pad), int(x1 + pad), int(y1 + pad))
        size, Kc = crop_camera(K, box, self.config.render_side)
        return _Crop(box, size, Kc)

    def _render_crop(self, crop: _Crop, obj: OnboardedObject, T: np.ndarray) -> Any | None:
        """Render ``obj`` at ``T`` (4, 4) into ``crop``; None when its centre is not in front of the camera."""
        z = float(transform_points(T, obj.model.center[None])[0, 2])
        if not math.isfinite(z) or z <= 1e-3:
            return None
        r, _ = self._renderer()
        return r.render(crop.Kc, crop.size[0], crop.size[1], [(self._key(obj), T)], znear=max(1e-3, 0.25 * z))

    def render_view(
        self, K: np.ndarray, width: int, height: int, obj: OnboardedObject, T_cam_obj: np.ndarray
    ) -> RenderOutput:
        """:class:`~osop_ros.core.types.RenderOutput` of ``obj`` alone at ``T_cam_obj`` (4, 4) with intrinsics
        ``K`` (3, 3) into ``width`` x ``height`` pixels, on this thread's renderer."""
        z = float(transform_points(np.asarray(T_cam_obj, float), obj.model.center[None])[0, 2])
        r, _ = self._renderer()
        return r.render(K, width, height, [(self._key(obj), T_cam_obj)], znear=max(1e-3, 0.25 * z))

    # -- scoring ---------------------------------------------------------------------------------
    def verify(
        self,
        obs: Observation,
        seg: SegmentationResult | None,
        obj: OnboardedObject,
        T_cam_obj: np.ndarray,
        use_depth: bool = True,
        extra: dict[str, float] | None = None,
    ) -> Verification:
        """Render ``T_cam_obj`` (4, 4) and compare with ``obs`` (+ the stage-1 mask of ``seg``)."""
        c = self.config
        feats: dict[str, float] = {k: float("nan") for k in FEATURE_NAMES}
        feats.update(extra or {})
        zero = Verification(0.0, {**feats, "raw": 0.0, "iou": 0.0, "edge": 0.0})
        H, W = obs.rgb.shape[:2]
        K = obs.camera.K
        T = np.asarray(T_cam_obj, dtype=np.float64)
        crop = self._crop(K, T, obj, None if seg is None else seg.box, (H, W))
        if crop is None:
            return zero
        out = self._render_crop(crop, obj, T)
        if out is None:
            return zero
        rend = out.mask
        d_r = out.depth
        inside = inside_image(crop.box, crop.size, (H, W))
        rend_in = rend & inside
        if int(rend_in.sum()) < c.min_render_px:
            return Verification(0.0, {**zero.features}, crop.box, crop.size[0] / (crop.box[2] - crop.box[0]))
        depth = obs.depth if (use_depth and obs.depth is not None) else None
        occl = np.zeros_like(rend)
        d_o = None
        if depth is not None:
            d_o = resize_to(crop_region(depth, crop.box), crop.size, cv2.INTER_NEAREST)
            valid = rend_in & (d_o > 0)
            n_valid = int(valid.sum())
            feats["depth_valid"] = n_valid / max(int(rend_in.sum()), 1)
            if n_valid >= c.min_depth_px:
                res = d_o - d_r
                tol = np.maximum(c.depth_tol_floor, c.depth_tol_frac_z * d_r)
                occl = valid & (res < -tol)
                inl = valid & (np.abs(res) <= tol)
                behind = valid & (res > tol)
                n_inl, n_beh = int(inl.sum()), int(behind.sum())
                feats["occluded"] = int(occl.sum()) / n_valid
                if n_inl + n_beh >= c.min_depth_px:
                    feats["depth_inlier"] = n_inl / (n_inl + n_beh)
                    feats["depth_behind"] = n_beh / (n_inl + n_beh)
                else:  # (almost) everything occluded: no evidence for the model
                    feats["depth_inlier"], feats["depth_behind"] = 0.0, 0.0
        vis = rend_in & ~occl
        # silhouette agreement with the stage-1 mask
        if seg is not None:
            m = resize_to(crop_region(seg.mask.astype(np.uint8), crop.box), crop.size, cv2.INTER_NEAREST).astype(bool)
            inter, union = float((vis & m).sum()), float((vis | m).sum())
            feats["iou"] = inter / union if union > 0 else 0.0
            feats["mask_recall"] = inter / max(float(m.sum()), 1.0)
            feats["mask_precision"] = inter / max(float(vis.sum()), 1.0)
        # edges: rendered silhouette + depth discontinuities vs image (+ depth) edges
        gray = cv2.cvtColor(crop_region(obs.rgb, crop.box), cv2.COLOR_RGB2GRAY)
        gray = resize_to(gray, crop.size, cv2.INTER_AREA)
        gray = cv2.GaussianBlur(gray, (3, 3), 0.8)
        obs_edges = cv2.Canny(gray, c.canny_low, c.canny_high, L2gradient=True).astype(bool) & inside
        obs_theta = _orientation(gray)
        img_edges, img_theta = obs_edges, obs_theta
        if d_o is not None:
            de = _depth_edges(d_o, c.depth_edge_frac_z, c.depth_tol_floor) & inside & ~obs_edges
            if de.any():
                obs_theta = np.where(de, _orientation(np.where(d_o > 0, d_o, d_o.max())), obs_theta)
                obs_edges = obs_edges | de
        rend_edges = (_contour(rend) | _depth_edges(d_r, c.depth_edge_frac_z, c.depth_tol_floor)) & vis
        rend_theta = _orientation(cv2.GaussianBlur(np.where(rend, 1.0 / np.maximum(d_r, 1e-3), 0.0).astype(np.float32),
                                                   (3, 3), 0.8))
        radius = max(c.edge_radius_min_px, c.edge_radius_frac * max(crop.size))
        hit, chance = edge_agreement(rend_edges, rend_theta, obs_edges, obs_theta, radius, c.edge_angle_deg)
        feats["edge"] = max(0.0, (hit - chance) / (1.0 - chance))
        # texture: intensity edges of the rendered (coloured, shaded) model inside its visible silhouette
        gray_r = cv2.GaussianBlur(cv2.cvtColor(out.rgb, cv2.COLOR_RGB2GRAY), (3, 3), 0.8)
        inner = cv2.erode(vis.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        tex = cv2.Canny(gray_r, c.canny_low, c.canny_high, L2gradient=True).astype(bool) & inner & ~rend_edges
        if int(tex.sum()) >= c.min_texture_px:
            hit, chance = edge_agreement(tex, _orientation(gray_r), img_edges, img_theta, radius, c.edge_angle_deg)
            feats["texture_edge"] = max(0.0, (hit - chance) / (1.0 - chance))
        # colour: chromaticity (Lab a, b) of the rendered model vs the image, after removing the median cast
        if int(vis.sum()) >= c.min_render_px:
            rgb_o = resize_to(crop_region(obs.rgb, crop.box), crop.size, cv2.INTER_AREA)
            lab_o = cv2.cvtColor(rgb_o, cv2.COLOR_RGB2LAB)
            lab_r = cv2.cvtColor(out.rgb, cv2.COLOR_RGB2LAB)
            dab = lab_o[vis][:, 1:].astype(np.float32) - lab_r[vis][:, 1:].astype(np.float32)
            dab -= np.median(dab, axis=0)
            feats["color"] = float(np.mean(np.linalg.norm(dab, axis=1) < c.color_tol))
        feats["raw"] = raw_score(feats, c.min_visible_frac)
        return Verification(feats["raw"], feats, crop.box, crop.size[0] / (crop.box[2] - crop.box[0]))

    def colour_scores(
        self,
        obs: Observation,
        seg: SegmentationResult | None,
        obj: OnboardedObject,
        Ts: Sequence[np.ndarray],
        use_depth: bool = True,
        min_std: float = 2.0,
    ) -> np.ndarray:
        """(n,) colour agreement of each pose of ``Ts`` ((4, 4) each, nearly the same silhouette) with ``obs``.

        All are rendered in the crop of ``Ts[0]``; over each pose's visible surface (rendered, inside the
        image, not behind an observed surface, eroded by one pixel) the blurred Lab channels of render and
        image are correlated (Pearson: insensitive to gain, offset and white balance) and averaged with the
        rendered channel's spread as weight. NaN when a pose shows too little or a uniformly coloured surface
        (every channel's spread below ``min_std``).
        """
        c = self.config
        out = np.full(len(Ts), np.nan)
        if not len(Ts):
            return out
        H, W = obs.rgb.shape[:2]
        K = obs.camera.K
        crop = self._crop(K, np.asarray(Ts[0], np.float64), obj, None if seg is None else seg.box, (H, W))
        if crop is None:
            return out
        inside = inside_image(crop.box, crop.size, (H, W))
        rgb_o = resize_to(crop_region(obs.rgb, crop.box), crop.size, cv2.INTER_AREA)
        lab_o = cv2.cvtColor(cv2.GaussianBlur(rgb_o, (3, 3), 1.0), cv2.COLOR_RGB2LAB).astype(np.float32)
        depth = obs.depth if (use_depth and obs.depth is not None) else None
        d_o = None if depth is None else resize_to(crop_region(depth, crop.box), crop.size, cv2.INTER_NEAREST)
        kernel = np.ones((3, 3), np.uint8)
        for n, T in enumerate(Ts):
            ren = self._render_crop(crop, obj, np.asarray(T, dtype=np.float64))
            if ren is None:
                continue
            vis = ren.mask & inside
            if d_o is not None:
                tol = np.maximum(c.depth_tol_floor, c.depth_tol_frac_z * ren.depth)
                vis &= ~((d_o > 0) & (d_o - ren.depth < -tol))
            vis = cv2.erode(vis.astype(np.uint8), kernel).astype(bool)
            if int(vis.sum()) < c.min_render_px:
                continue
            lab_r = cv2.cvtColor(cv2.GaussianBlur(ren.rgb, (3, 3), 1.0), cv2.COLOR_RGB2LAB).astype(np.float32)
            num = den = 0.0
            for ch in range(3):
                x, y = lab_o[vis][:, ch], lab_r[vis][:, ch]
                sx, sy = float(x.std()), float(y.std())
                if sy < min_std:
                    continue
                rho = float(np.mean((x - x.mean()) * (y - y.mean()))) / (sx * sy) if sx > 1e-6 else 0.0
                num += sy * rho
                den += sy
            if den > 0:
                out[n] = num / den
        return out


def raw_score(feats: dict[str, float], min_visible_frac: float = 0.4) -> float:
    """Uncalibrated agreement in [0, 1] from the features (see module doc); NaN terms are left out."""
    iou = feats.get("iou", float("nan"))
    terms = [feats.get("edge", 0.0)]
    if not math.isnan(iou):
        terms.append(iou)
    col = feats.get("color", float("nan"))
    if not math.isnan(col):
        terms.append(0.5 + 0.5 * col)
    d = feats.get("depth_inlier", float("nan"))
    vis = 1.0
    if not math.isnan(d):
        terms.append(d)
        occ = feats.get("occluded", 0.0)
        vis = min(1.0, (1.0 - (0.0 if math.isnan(occ) else occ)) / max(min_visible_frac, 1e-6))
    terms = [max(0.0, min(1.0, t)) for t in terms]
    return float(np.prod(terms) ** (1.0 / len(terms)) * vis)


# ----------------------------------------------------------------------------------------------
# Selection among hypotheses
# ----------------------------------------------------------------------------------------------


@dataclass
class Selected:
    """The chosen hypothesis of one instance with its verification and every candidate's raw score."""

    hypothesis: PoseHypothesis
    verification: Verification
    candidates: list[float] = field(default_factory=list)
    refined: bool = False


def model_flips(obj: OnboardedObject, n_samples: int = 2000) -> list[np.ndarray]:
    """(4, 4) model-frame rotations by 180 deg about the three principal axes through the model centre.

    Poses that differ by such a flip often agree in silhouette and depth (boxes, cylinders, plates) and
    only colour/edges tell them apart, so they are verified as extra hypotheses. Cached in ``obj.extra``.
    """
    if "verify_flips" not in obj.extra:
        pts, _ = obj.model.sample_surface(n_samples, seed=0)
        c = np.asarray(obj.model.center, dtype=np.float64)
        _, _, vt = np.linalg.svd(np.asarray(pts, dtype=np.float64) - c, full_matrices=False)
        flips = []
        for a in vt:
            R = 2.0 * np.outer(a, a) - np.eye(3)  # rotation by pi about the unit axis a
            F = np.eye(4)
            F[:3, :3] = R
            F[:3, 3] = c - R @ c
            flips.append(F)
        obj.extra["verify_flips"] = flips
    return obj.extra["verify_flips"]


def nonsymmetric_flips(obj: OnboardedObject, tol_frac: float = 0.1, n_points: int = 500) -> list[int]:
    """Indices into :func:`model_flips` of the flips that are *not* symmetries of ``obj``.

    A flip counts as a symmetry when some transform of ``obj.sym_Ts`` moves every sampled surface point
    to within ``tol_frac`` x diameter of where the flip moves it (the tolerance of the correctness
    criterion: such a flip of a correct pose is also correct). Cached in ``obj.extra``.
    """
    key = "verify_flips_nonsym"
    if key not in obj.extra:
        flips = model_flips(obj)
        pts, _ = obj.model.sample_surface(n_points, seed=1)
        pts = np.asarray(pts, dtype=np.float64)
        tol = tol_frac * float(obj.model.diameter)
        sym = [np.asarray(S, dtype=np.float64) for S in obj.sym_Ts] or [np.eye(4)]
        keep = []
        for i, F in enumerate(flips):
            pf = transform_points(F, pts)
            dev = min(float(np.max(np.linalg.norm(pf - transform_points(S, pts), axis=1))) for S in sym)
            if dev >= tol:
                keep.append(i)
        obj.extra[key] = keep
    return obj.extra[key]


def flip_margins(raws: Sequence[float], nonsym: Sequence[int]) -> list[float]:
    """``flip_margin`` of each member of the flip group ``[T, T F_0, T F_1, T F_2]``.

    raws (4,): raw scores of the chosen pose and of its three :func:`model_flips`; nonsym: indices of
    the flips that are not symmetries. The flips about orthogonal axes through one centre form a group
    (``F_i F_i = I``, ``F_i F_j = F_k``), so every member's non-symmetric flips are members too: member
    ``a``'s margin is its raw score minus the best raw score of ``a F_i`` over ``i`` in ``nonsym``
    (NaN when every flip is a symmetry).
    """
    if len(raws) != 4:
        raise ValueError("flip_margins: expected the raw scores of a pose and of its 3 flips")

    def compose(a: int, i: int) -> int:  # member index of (member a) @ F_i; member 0 = T, k + 1 = T F_k
        if a == 0:
            return i + 1
        if a == i + 1:
            return 0
        return ({0, 1, 2} - {a - 1, i}).pop() + 1

    out = []
    for a in range(4):
        alts = [float(raws[compose(a, i)]) for i in nonsym]
        out.append(float(raws[a]) - max(alts) if alts else float("nan"))
    return out


def select_hypothesis(
    verifier: Verifier,
    obs: Observation,
    seg: SegmentationResult,
    obj: OnboardedObject,
    hyps: Sequence[PoseHypothesis],
    refine: Callable[[PoseHypothesis], PoseHypothesis | None] | None = None,
    refine_top_n: int = 1,
    extra: Callable[[PoseHypothesis], dict[str, float]] | None = None,
    refine_margin: float = 0.03,
    flips: Sequence[np.ndarray] = (),
) -> Selected | None:
    """Verify every hypothesis (plus, for the ``flip_top_n`` best, their ``flips``: ``T @ F``), refine the
    ``refine_top_n`` best (ICP) and re-verify; the best by raw score wins.

    A refined pose replaces its hypothesis unless its raw score drops by more than ``refine_margin``.
    """
    use_depth = obs.depth is not None
    cands: list[tuple[float, int, PoseHypothesis, Verification, bool]] = []
    for i, h in enumerate(hyps):
        v = verifier.verify(obs, seg, obj, h.T_cam_obj, use_depth, extra(h) if extra else None)
        cands.append((v.raw, i, h, v, False))
    if not cands:
        return None
    cands.sort(key=lambda x: (-x[0], x[1]))
    if flips and verifier.config.flip_top_n > 0:
        n0 = len(cands)
        for k in range(min(verifier.config.flip_top_n, n0)):
            h = cands[k][2]
            for j, F in enumerate(flips):
                hf = PoseHypothesis(h.T_cam_obj @ F, h.score, h.inliers, {**h.info, "flip_axis": j})
                v = verifier.verify(obs, seg, obj, hf.T_cam_obj, use_depth, extra(hf) if extra else None)
                cands.append((v.raw, n0 + len(flips) * k + j, hf, v, False))
        cands.sort(key=lambda x: (-x[0], x[1]))
    all_raw = [c[0] for c in cands]
    if refine is not None:
        for k in range(min(max(0, refine_top_n), len(cands))):
            raw, i, h, _, _ = cands[k]
            h2 = refine(h)
            if h2 is None:
                continue
            v2 = verifier.verify(obs, seg, obj, h2.T_cam_obj, use_depth, extra(h2) if extra else None)
            h2.info["verify_raw_pre_refine"] = raw
            if v2.raw >= raw - refine_margin:
                cands[k] = (v2.raw, i, h2, v2, True)
        cands.sort(key=lambda x: (-x[0], not x[4], x[1]))
    raw, _, h, v, refined = cands[0]
    return Selected(h, v, all_raw, refined)


# ----------------------------------------------------------------------------------------------
# Calibrated score
# ----------------------------------------------------------------------------------------------


def _float(v: Any) -> float:
    """float(v), NaN for None / non-numbers."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


@dataclass
class PlattModel:
    """P(correct) = sigmoid(intercept + sum_i coef_i * (x_i - mean_i) / scale_i); NaN x_i -> mean_i."""

    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float

    def __post_init__(self) -> None:
        n = len(self.features)
        if not (len(self.mean) == len(self.scale) == len(self.coef) == n):
            raise InvalidInputError("calibration model: features, mean, scale and coef must have equal lengths")
        unknown = sorted(set(self.features) - set(FEATURE_NAMES))
        if unknown:
            raise InvalidInputError(f"calibration model: unknown feature(s) {unknown}; known: {list(FEATURE_NAMES)}")

    def matrix(self, rows: Sequence[dict[str, float | None]]) -> np.ndarray:
        """(N, F) standardised feature matrix of feature dicts (missing/NaN -> 0 after standardising)."""
        X = np.array([[_float(r.get(f)) for f in self.features] for r in rows], dtype=np.float64)
        return self.matrix_raw(X.reshape(len(rows), len(self.features)))

    def matrix_raw(self, X: np.ndarray) -> np.ndarray:
        """Standardise an (N, F) array of raw feature values (NaN -> 0, i.e. the mean)."""
        X = (np.asarray(X, dtype=np.float64) - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.where(np.isfinite(X), X, 0.0)

    def probability(self, feats: dict[str, float | None]) -> float:
        """P(correct) of one feature dict."""
        z = float(self.intercept + self.matrix([feats])[0] @ np.asarray(self.coef))
        return float(1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0))))

    def to_dict(self) -> dict[str, Any]:
        return {"features": list(self.features), "mean": [float(v) for v in self.mean],
                "scale": [float(v) for v in self.scale], "coef": [float(v) for v in self.coef],
                "intercept": float(self.intercept)}


@dataclass
class ScoreCalibration:
    """Per-modality (``rgbd``, ``rgb``) Platt models plus provenance (criterion, data, fit statistics)."""

    models: dict[str, PlattModel]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "calibration") -> ScoreCalibration:
        if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
            raise InvalidInputError(f"{where}: expected a mapping with a 'models' mapping (rgbd/rgb)")
        models = {}
        for mod, m in data["models"].items():
            if mod not in ("rgbd", "rgb"):
                raise InvalidInputError(f"{where}: unknown modality {mod!r} (rgbd | rgb)")
            try:
                models[mod] = PlattModel(list(m["features"]), [float(v) for v in m["mean"]],
                                         [float(v) if float(v) > 0 else 1.0 for v in m["scale"]],
                                         [float(v) for v in m["coef"]], float(m["intercept"]))
            except (KeyError, TypeError, ValueError) as exc:
                raise InvalidInputError(f"{where}: model {mod!r} is malformed ({exc})") from exc
        return cls(models, {k: v for k, v in data.items() if k != "models"})

    @classmethod
    def load(cls, path: str | Path) -> ScoreCalibration:
        """Read a ``.yaml``/``.yml`` (yaml.safe_load) or ``.json`` calibration file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise InvalidInputError(f"cannot read score calibration {p}: {exc}") from exc
        try:
            data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as exc:
            raise InvalidInputError(f"score calibration {p} is not valid YAML/JSON: {exc}") from exc
        return cls.from_dict(data, str(p))

    def to_dict(self) -> dict[str, Any]:
        return {**self.meta, "models": {k: m.to_dict() for k, m in self.models.items()}}

    def save(self, path: str | Path) -> Path:
        """Write YAML (or JSON for a ``.json`` path)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_dict()
        text = json.dumps(data, indent=1) if p.suffix.lower() == ".json" else yaml.safe_dump(data, sort_keys=False)
        p.write_text(text, encoding="utf-8")
        return p

    def uses(self, feature: str, modality: str) -> bool:
        """Whether the model of ``modality`` reads ``feature`` (the pipeline computes costly ones only then)."""
        m = self.models.get(modality)
        return m is not None and feature in m.features

    def probability(self, feats: dict[str, float], modality: str) -> float | None:
        """P(correct) of a hypothesis with ``feats`` seen in ``modality``; None without a model for it."""
        m = self.models.get(modality)
        return None if m is None else m.probability(feats)
