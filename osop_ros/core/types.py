"""Dataclasses shared by every stage. Units: metres, radians, pixels; frames in names.

Conventions
-----------
* ``T_a_b`` (4, 4) float64 maps points from frame ``b`` to frame ``a``: ``p_a = T_a_b @ p_b``.
* ``K`` (3, 3) float64 pinhole intrinsics, OpenCV/BOP pixel convention: the centre of pixel
  column ``u`` is at ``u`` (not ``u + 0.5``); image rows grow downwards, camera looks along +z.
* Images are numpy arrays: ``rgb`` (H, W, 3) uint8 in RGB order, ``depth`` (H, W) float32 metres
  with 0 meaning "no measurement", masks (H, W) bool.
* Millimetres exist only at the edges (BOP files, 16UC1 depth images, CLI flags).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class OsopError(Exception):
    """Base class of every error this package raises on purpose."""


class WeightsError(OsopError):
    """Network weights are missing, unreadable or of the wrong architecture."""


class InvalidInputError(OsopError, ValueError):
    """Input data (image, intrinsics, depth, config) is malformed."""


class MeshLoadError(OsopError, ValueError):
    """An object model could not be loaded; the message names the file."""


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole camera. ``fx, fy, cx, cy`` in pixels; ``width, height`` in pixels."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        vals = (self.fx, self.fy, self.cx, self.cy)
        if not all(math.isfinite(float(v)) for v in vals):
            raise InvalidInputError(f"camera intrinsics must be finite, got fx,fy,cx,cy={vals}")
        if self.fx <= 0 or self.fy <= 0:
            raise InvalidInputError(f"focal lengths must be > 0, got fx={self.fx} fy={self.fy}")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise InvalidInputError(f"image size must be > 0, got {self.width}x{self.height}")

    @property
    def K(self) -> np.ndarray:
        """(3, 3) float64 intrinsic matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]], dtype=np.float64)

    @classmethod
    def from_K(cls, K: np.ndarray | list[float], width: int, height: int) -> CameraIntrinsics:
        """Build from a (3, 3) matrix or a flat 9-vector (BOP ``cam_K``)."""
        K = np.asarray(K, dtype=np.float64).reshape(3, 3)
        if abs(K[0, 1]) > 1e-6:
            raise InvalidInputError("skewed intrinsics (K[0,1] != 0) are not supported")
        return cls(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), int(width), int(height))

    def scaled(self, sx: float, sy: float | None = None) -> CameraIntrinsics:
        """Intrinsics of the image resized by (sx, sy); keeps the pixel-centre convention."""
        sy = sx if sy is None else sy
        return CameraIntrinsics(
            self.fx * sx,
            self.fy * sy,
            (self.cx + 0.5) * sx - 0.5,
            (self.cy + 0.5) * sy - 0.5,
            max(1, round(self.width * sx)),
            max(1, round(self.height * sy)),
        )


@dataclass
class Observation:
    """One camera frame.

    rgb:   (H, W, 3) uint8, RGB order.
    depth: (H, W) float32 metres, 0 = invalid; None for RGB-only input. Registered to ``rgb``.
    camera: intrinsics of ``rgb`` (and of ``depth``).
    """

    rgb: np.ndarray
    camera: CameraIntrinsics
    depth: np.ndarray | None = None

    def validate(self) -> None:
        """Raise :class:`InvalidInputError` on shape/dtype/size mismatches; sanitises depth in place."""
        if self.rgb.ndim != 3 or self.rgb.shape[2] != 3 or self.rgb.dtype != np.uint8:
            raise InvalidInputError(f"rgb must be (H, W, 3) uint8, got {self.rgb.shape} {self.rgb.dtype}")
        h, w = self.rgb.shape[:2]
        if (w, h) != (self.camera.width, self.camera.height):
            raise InvalidInputError(
                f"rgb is {w}x{h} but camera intrinsics are for {self.camera.width}x{self.camera.height}"
            )
        if self.depth is not None:
            if self.depth.shape != (h, w):
                raise InvalidInputError(f"depth shape {self.depth.shape} != rgb shape {(h, w)}")
            d = np.asarray(self.depth, dtype=np.float32)
            bad = ~np.isfinite(d) | (d < 0)
            if bad.any():
                d = d.copy()
                d[bad] = 0.0
            self.depth = d


@dataclass
class Symmetries:
    """Object symmetries in the model frame (metres), BOP ``models_info.json`` semantics.

    discrete:   list of (4, 4) float64 transforms ``T`` with ``model == T(model)``.
    continuous: list of (axis (3,), offset (3,) metres) pairs: rotation about ``axis`` through
                ``offset`` by any angle leaves the model unchanged.
    """

    discrete: list[np.ndarray] = field(default_factory=list)
    continuous: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def is_symmetric(self) -> bool:
        return bool(self.discrete or self.continuous)

    @classmethod
    def from_bop_info(cls, info: dict[str, Any], unit_scale: float = 0.001) -> Symmetries:
        """Parse a BOP ``models_info.json`` entry; translations scaled by ``unit_scale`` (mm -> m)."""
        disc = []
        for s in info.get("symmetries_discrete", []) or []:
            T = np.asarray(s, dtype=np.float64).reshape(4, 4).copy()
            T[:3, 3] *= unit_scale
            disc.append(T)
        cont = []
        for s in info.get("symmetries_continuous", []) or []:
            axis = np.asarray(s["axis"], dtype=np.float64)
            axis = axis / max(np.linalg.norm(axis), 1e-12)
            cont.append((axis, np.asarray(s.get("offset", [0, 0, 0]), dtype=np.float64) * unit_scale))
        return cls(disc, cont)


@dataclass
class PoseEstimate:
    """One object instance found in one frame.

    T_cam_obj:   (4, 4) float64, model frame (metres) -> camera optical frame.
    score:       [0, 1], higher is better; below the configured threshold nothing is published.
    diagnostics: per-stage numbers (mask area, template ids, inliers, ICP fitness/RMSE, ...).
    timings:     per-stage wall time in seconds.
    """

    object_name: str
    T_cam_obj: np.ndarray
    score: float
    diagnostics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def R(self) -> np.ndarray:
        """(3, 3) rotation model -> camera."""
        return self.T_cam_obj[:3, :3]

    @property
    def t(self) -> np.ndarray:
        """(3,) translation in metres."""
        return self.T_cam_obj[:3, 3]


@dataclass
class RenderOutput:
    """What the renderer produces for one camera.

    rgb:   (H, W, 3) uint8 shaded colour (0 where no object).
    depth: (H, W) float32 z in metres, 0 = background.
    mask:  (H, W) bool, union of all rendered objects.
    xyz:   (H, W, 3) float32 model-frame coordinates (metres) of the visible surface point of the
           visible object at each pixel, 0 on background.
    inst:  (H, W) int32 instance index + 1 of the visible object at each pixel, 0 = background.
    """

    rgb: np.ndarray
    depth: np.ndarray
    mask: np.ndarray
    xyz: np.ndarray
    inst: np.ndarray


@dataclass
class SegmentationResult:
    """Stage 1 output for one queried object.

    mask:  (H, W) bool at the input image resolution.
    prob:  (H, W) float32 foreground probability.
    box:   (4,) int (x0, y0, x1, y1) inclusive-exclusive pixel box of ``mask``; None if empty.
    score: mean foreground probability inside ``mask`` (0 if empty).
    rank_score: the segmenter's ranking score when it is not ``score`` (proposals: descriptor cosine
                + weighted head probability), else None.
    rank_margin: ``rank_score`` minus the best ranking score of the segmenter's other candidate masks
                 (after de-duplication; how distinct this mask is), None when not ranked or alone.
    """

    mask: np.ndarray
    prob: np.ndarray
    box: tuple[int, int, int, int] | None
    score: float
    rank_score: float | None = None
    rank_margin: float | None = None


@dataclass
class MatchResult:
    """Stage 2 output: best templates for one crop.

    template_ids: (k,) int64 indices into the template bank, best first.
    scores:       (k,) float32 similarity (cosine), best first.
    inplane_deg:  (k,) float32 residual in-plane rotation (deg) applied to each template, 0 if unused.
    """

    template_ids: np.ndarray
    scores: np.ndarray
    inplane_deg: np.ndarray


@dataclass
class Correspondences:
    """Stage 3 output: 2D-3D pairs in full-image pixels.

    uv:      (N, 2) float64 pixel coordinates in the full image.
    pts_obj: (N, 3) float64 model coordinates in metres.
    conf:    (N,) float32 confidence in [0, 1].
    """

    uv: np.ndarray
    pts_obj: np.ndarray
    conf: np.ndarray

    def __len__(self) -> int:
        return int(self.uv.shape[0])


@dataclass
class PoseHypothesis:
    """Stage 4 output for one candidate.

    T_cam_obj: (4, 4) float64.
    score: agreement with mask/depth in [0, 1].
    inliers: number of RANSAC inliers.
    info: solver details (method, icp fitness/rmse, reasons).
    """

    T_cam_obj: np.ndarray
    score: float
    inliers: int
    info: dict[str, Any] = field(default_factory=dict)


class PoseFailure(OsopError):
    """No trustworthy pose: too few correspondences/inliers, degenerate geometry, ..."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
