"""ORACLE stage implementations for ablations (they read ground truth; never use them for real estimates).

* :class:`OracleFrame` holds the GT of the current frame (``set_frame``) and renders the visible instance
  masks (all GT objects with mutual occlusion, optionally cut by the measured depth), or takes
  ``mask_visib`` from the dataset when given.
* :class:`OracleSegmenter` (stage 1): the visible GT masks of the queried object.
* :class:`OracleMatcher` (stage 2): templates nearest in rotation to the GT (symmetry-aware, corrected for
  the off-axis viewing direction of the crop), top-k.
* :class:`TemplateTransferCorrespondences` (stage 3, not an oracle, not learned): aligns the matched
  template crop to the query crop (both square crops around the mask box) and takes the template's model
  coordinates at template-mask pixels that fall inside the query mask.

Every class carries ``is_oracle`` so that runners can label their outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from osop_ros.core.geometry import CropBox, mask_to_box, transform_points
from osop_ros.core.types import (
    Correspondences,
    InvalidInputError,
    MatchResult,
    Observation,
    OsopError,
    SegmentationResult,
)

if TYPE_CHECKING:
    from osop_ros.core.stages import OnboardedObject

log = logging.getLogger(__name__)


class OracleError(OsopError):
    """An oracle stage was used without the ground truth it needs."""


def rotation_to_optical_axis(direction_cam: np.ndarray) -> np.ndarray:
    """(3, 3) smallest rotation taking the unit vector along ``direction_cam`` to the camera +z axis."""
    a = np.asarray(direction_cam, dtype=np.float64)
    a = a / max(np.linalg.norm(a), 1e-12)
    b = np.array([0.0, 0.0, 1.0])
    v = np.cross(a, b)
    s, c = np.linalg.norm(v), float(a @ b)
    if s < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx * ((1.0 - c) / s**2)


class OracleFrame:
    """Ground truth of the current frame, shared by the oracle stages.

    renderer:    a :class:`~osop_ros.core.render.Renderer` with the models added under ``render_keys[obj_id]``
                 (needed unless every frame provides ``mask_visib``).
    depth_occlusion_tol: metres; with a depth image, rendered mask pixels where the measured depth is more
                 than this in front of the rendered surface are removed (occluders that have no model).
    """

    is_oracle = True

    def __init__(
        self,
        renderer: Any | None = None,
        render_keys: Mapping[int, str] | None = None,
        depth_occlusion_tol: float | None = 0.02,
    ) -> None:
        self.renderer = renderer
        self.render_keys = dict(render_keys or {})
        self.depth_occlusion_tol = depth_occlusion_tol
        self.gts: list[tuple[int, np.ndarray]] | None = None
        self.mask_visib: list[np.ndarray | None] | None = None
        self._masks: list[np.ndarray] | None = None
        self._mask_key: tuple[int, int, int] | None = None
        self._frame_counter = 0

    def set_frame(
        self, gts: Sequence[tuple[int, np.ndarray]], mask_visib: Sequence[np.ndarray | None] | None = None
    ) -> None:
        """Set the GT instances [(obj_id, T_cam_obj (4, 4) metres)] of the next frame (and optional masks)."""
        self.gts = [(int(o), np.asarray(T, dtype=np.float64)) for o, T in gts]
        if mask_visib is not None and len(mask_visib) != len(self.gts):
            raise InvalidInputError(f"{len(mask_visib)} mask_visib entries for {len(self.gts)} GT instances")
        self.mask_visib = list(mask_visib) if mask_visib is not None else None
        self._masks = None
        self._frame_counter += 1

    def _require(self) -> list[tuple[int, np.ndarray]]:
        if self.gts is None:
            raise OracleError("oracle stage used without ground truth: call set_frame() for every frame")
        return self.gts

    def instances(self, obj_id: int) -> list[int]:
        """Indices of the GT instances of ``obj_id`` in the current frame."""
        return [i for i, (o, _) in enumerate(self._require()) if o == obj_id]

    def visible_masks(self, obs: Observation) -> list[np.ndarray]:
        """(H, W) bool visible mask of every GT instance of the current frame (cached per frame)."""
        gts = self._require()
        h, w = obs.rgb.shape[:2]
        key = (self._frame_counter, h, w)
        if self._masks is not None and self._mask_key == key:
            return self._masks
        if self.mask_visib is not None and all(m is not None for m in self.mask_visib):
            masks = [np.asarray(m, dtype=bool) for m in self.mask_visib]  # type: ignore[arg-type]
        else:
            masks = self._render_masks(obs, gts)
        self._masks, self._mask_key = masks, key
        return masks

    def _render_masks(self, obs: Observation, gts: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        h, w = obs.rgb.shape[:2]
        if self.renderer is None:
            raise OracleError("oracle masks need a renderer (or mask_visib from the dataset)")
        items, index = [], []
        for i, (o, T) in enumerate(gts):
            if o in self.render_keys:
                items.append((self.render_keys[o], T))
                index.append(i)
            else:
                log.warning("oracle: object %d has no model in the renderer; it will not occlude others", o)
        masks = [np.zeros((h, w), dtype=bool) for _ in gts]
        if not items:
            return masks
        out = self.renderer.render(obs.camera.K, w, h, items)
        occl = None
        if obs.depth is not None and self.depth_occlusion_tol is not None:
            d = obs.depth
            occl = (d > 0) & (out.depth > 0) & (d < out.depth - self.depth_occlusion_tol)
        for k, i in enumerate(index):
            m = out.inst == k + 1
            if occl is not None:
                m &= ~occl
            masks[i] = m
        return masks

    def associate(self, obj_id: int, mask: np.ndarray, obs: Observation | None = None) -> int | None:
        """GT instance of ``obj_id`` that ``mask`` shows: best IoU with the visible GT masks (needs ``obs``),
        else the instance whose projected model origin is nearest the mask centroid. None if absent."""
        cand = self.instances(obj_id)
        if not cand:
            return None
        if len(cand) == 1:
            return cand[0]
        if obs is not None:
            vis = self.visible_masks(obs)
            ious = []
            for i in cand:
                inter = np.count_nonzero(vis[i] & mask)
                union = np.count_nonzero(vis[i] | mask)
                ious.append(inter / union if union else 0.0)
            if max(ious) > 0:
                return cand[int(np.argmax(ious))]
        if obs is None:
            raise OracleError("cannot associate a mask to a GT instance without the observation")
        ys, xs = np.nonzero(mask)
        if len(xs) == 0:
            return cand[0]
        c = np.array([xs.mean(), ys.mean()])
        K = obs.camera.K
        best, best_d = cand[0], np.inf
        for i in cand:
            t = self._require()[i][1][:3, 3]
            if t[2] <= 0:
                continue
            uv = np.array([K[0, 0] * t[0] / t[2] + K[0, 2], K[1, 1] * t[1] / t[2] + K[1, 2]])
            d = float(np.linalg.norm(uv - c))
            if d < best_d:
                best, best_d = i, d
        return best


class OracleSegmenter:
    """ORACLE stage 1: visible GT masks of the queried object, largest first (score 1)."""

    is_oracle = True
    name = "oracle-mask"

    def __init__(self, frame: OracleFrame, min_area: int = 1) -> None:
        self.frame = frame
        self.min_area = min_area

    def set_frame(
        self, gts: Sequence[tuple[int, np.ndarray]], mask_visib: Sequence[np.ndarray | None] | None = None
    ) -> None:
        self.frame.set_frame(gts, mask_visib)

    def __call__(self, obs: Observation, obj: OnboardedObject) -> list[SegmentationResult]:
        masks = self.frame.visible_masks(obs)
        out = []
        for i in self.frame.instances(obj.obj_id):
            m = masks[i]
            area = int(m.sum())
            if area < self.min_area:
                continue
            out.append(SegmentationResult(m.copy(), m.astype(np.float32), mask_to_box(m), 1.0))
        out.sort(key=lambda s: -int(s.mask.sum()))
        return out


class OracleMatcher:
    """ORACLE stage 2: the ``top_k`` templates nearest in rotation to the GT instance shown by the mask.

    The GT rotation is first corrected for the off-axis viewing direction (templates look at the object
    centre; a crop of an off-centre object looks like a view rotated by the smallest rotation that brings
    the centre onto the optical axis). Symmetry-aware via ``obj.sym_Ts``. Scores are cos(angle).
    """

    is_oracle = True
    name = "oracle-viewpoint"

    def __init__(self, frame: OracleFrame, top_k: int = 1) -> None:
        if top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
        self.frame = frame
        self.top_k = top_k

    def set_frame(
        self, gts: Sequence[tuple[int, np.ndarray]], mask_visib: Sequence[np.ndarray | None] | None = None
    ) -> None:
        self.frame.set_frame(gts, mask_visib)

    @staticmethod
    def view_rotation(T_cam_obj: np.ndarray, center_obj: np.ndarray) -> np.ndarray:
        """(3, 3) rotation of the GT as seen by a camera turned to look at the object centre."""
        c = transform_points(T_cam_obj, np.asarray(center_obj, dtype=np.float64)[None])[0]
        return rotation_to_optical_axis(c) @ T_cam_obj[:3, :3]

    @staticmethod
    def rotation_errors_deg(R: np.ndarray, R_templates: np.ndarray, sym_Ts: Sequence[np.ndarray]) -> np.ndarray:
        """(T,) min over symmetries S of angle(R @ S_R, R_template)."""
        Rs = np.stack([R @ np.asarray(S)[:3, :3] for S in (sym_Ts or [np.eye(4)])])  # (S, 3, 3)
        cos = np.full(len(R_templates), -1.0)
        for lo in range(0, len(Rs), 64):
            tr = np.einsum("sij,tij->ts", Rs[lo : lo + 64], R_templates)
            cos = np.maximum(cos, tr.max(axis=1))
        return np.degrees(np.arccos(np.clip((cos - 1.0) / 2.0, -1.0, 1.0)))

    def __call__(self, obs: Observation, seg: SegmentationResult, obj: OnboardedObject) -> MatchResult:
        g = self.frame.associate(obj.obj_id, seg.mask, obs)
        if g is None:
            raise OracleError(f"oracle matcher: object {obj.obj_id} has no GT instance in this frame")
        T_gt = self.frame._require()[g][1]
        R_view = self.view_rotation(T_gt, obj.model.center)
        err = self.rotation_errors_deg(R_view, obj.bank.poses[:, :3, :3], obj.sym_Ts)
        k = min(self.top_k, len(err))
        ids = np.argsort(err, kind="stable")[:k]
        return MatchResult(
            template_ids=ids.astype(np.int64),
            scores=np.cos(np.radians(err[ids])).astype(np.float32),
            inplane_deg=np.zeros(k, dtype=np.float32),
        )


class TemplateTransferCorrespondences:
    """Stage 3 without learning: 2D-3D pairs by overlaying the matched template crop on the query crop.

    The query crop is the square :class:`CropBox` around the mask box with the bank's ``pad`` (templates
    are framed the same way around the projected model), so template crop pixel (u, v) maps to query crop
    pixel (u, v). Pairs: template-mask pixels inside the resampled query mask; ``pts_obj`` = template
    model coordinates, ``uv`` = the crop pixel mapped back to the full image; conf = 1.
    A non-zero ``match.inplane_deg`` rotates the template crop about its centre by that angle
    (counter-clockwise in the image, as ``cv2.getRotationMatrix2D``) before the overlay.
    """

    is_oracle = False
    name = "template-transfer"

    def __init__(self, n_templates: int = 1, min_pairs: int = 0) -> None:
        if n_templates < 1:
            raise InvalidInputError(f"n_templates must be >= 1, got {n_templates}")
        self.n_templates = n_templates
        self.min_pairs = min_pairs

    def __call__(
        self, obs: Observation, seg: SegmentationResult, match: MatchResult, obj: OnboardedObject
    ) -> list[Correspondences]:
        if seg.box is None or not seg.mask.any():
            return []
        bank = obj.bank
        S = bank.crop_size
        cfg = bank.config
        pad = cfg.pad if cfg is not None else 1.2
        crop = CropBox.from_box(seg.box, pad=pad)
        qmask = crop.apply(seg.mask.astype(np.uint8), S, interp=cv2.INTER_NEAREST) > 0
        out = []
        for j, tid in enumerate(np.asarray(match.template_ids)[: self.n_templates]):
            tmask = bank.mask[int(tid)]
            txyz = bank.xyz[int(tid)].astype(np.float32)
            ang = float(match.inplane_deg[j]) if len(match.inplane_deg) > j else 0.0
            if abs(ang) > 1e-6:
                A = cv2.getRotationMatrix2D(((S - 1) / 2.0, (S - 1) / 2.0), ang, 1.0)
                tmask = cv2.warpAffine(tmask.astype(np.uint8), A, (S, S), flags=cv2.INTER_NEAREST) > 0
                txyz = cv2.warpAffine(txyz, A, (S, S), flags=cv2.INTER_NEAREST)
            both = tmask & qmask
            vs, us = np.nonzero(both)
            uv = crop.crop_to_image(np.stack([us, vs], axis=1).astype(np.float64), S)
            pts = txyz[vs, us].astype(np.float64)
            if len(uv) < self.min_pairs:
                continue
            out.append(Correspondences(uv, pts, np.ones(len(uv), dtype=np.float32)))
        return out
