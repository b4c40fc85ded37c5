"""ORACLE stage implementations for ablations (they read ground truth; never use them for real estimates).

* :class:`OracleFrame` holds the GT of the current frame (``set_frame``) and renders the visible instance
  masks (all GT objects with mutual occlusion, optionally cut by the measured depth), or takes
  ``mask_visib`` from the dataset when given.
* :class:`OracleSegmenter` (stage 1): the visible GT masks of the queried object.
* :class:`OracleMatcher` (stage 2): templates nearest in rotation to the GT (symmetry-aware, corrected for
  the off-axis viewing direction of the crop), top-k.
(The training-free stage 3 ``TemplateTransferCorrespondences`` is no oracle: it lives in
:mod:`osop_ros.core.correspondence`.)

Every class carries ``is_oracle`` so that runners can label their outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from osop_ros.core.geometry import centred_view_rotation, mask_to_box
from osop_ros.core.types import (
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
        self._mask_key: tuple[int, int, int, bool] | None = None
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
        key = (self._frame_counter, h, w, obs.depth is not None)
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
        if obs is None:
            raise OracleError("cannot associate a mask to one of several GT instances without the observation")
        vis = self.visible_masks(obs)
        ious = []
        for i in cand:
            inter = np.count_nonzero(vis[i] & mask)
            union = np.count_nonzero(vis[i] | mask)
            ious.append(inter / union if union else 0.0)
        if max(ious) > 0:
            return cand[int(np.argmax(ious))]
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
    """ORACLE stage 2: the ``top_k`` templates nearest to the GT instance shown by the mask, with the exact
    in-plane residual.

    The GT rotation is first corrected for the off-axis viewing direction (templates look at the object
    centre; a crop of an off-centre object looks like a view rotated by the smallest rotation that brings
    the centre onto the optical axis). For every template the residual roll about the optical axis is
    solved in closed form (``R_view ~ Rz(inplane) @ R_template``, the convention of
    :attr:`MatchResult.inplane_deg` used by ``rotate_inplane``) and templates are ranked by the rotation
    error left after it (the out-of-plane error), symmetry-aware via ``obj.sym_Ts``. Scores are cos(error).
    """

    is_oracle = True
    name = "oracle-viewpoint"

    def __init__(self, frame: OracleFrame, top_k: int = 1, inplane: bool = True) -> None:
        if top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
        self.frame = frame
        self.top_k = top_k
        self.inplane = inplane

    def set_frame(
        self, gts: Sequence[tuple[int, np.ndarray]], mask_visib: Sequence[np.ndarray | None] | None = None
    ) -> None:
        self.frame.set_frame(gts, mask_visib)

    @staticmethod
    def view_rotation(T_cam_obj: np.ndarray, center_obj: np.ndarray) -> np.ndarray:
        """(3, 3) rotation of the GT as seen by a camera turned to look at the object centre."""
        return centred_view_rotation(T_cam_obj, center_obj)

    @staticmethod
    def rotation_errors_deg(
        R: np.ndarray, R_templates: np.ndarray, sym_Ts: Sequence[np.ndarray], inplane: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per template: (error_deg (T,), inplane_deg (T,)), minimised over symmetries S.

        With ``inplane``: error = min over theta of angle(R @ S_R, Rz(theta) @ R_template), theta returned;
        else the plain angle and theta = 0.
        """
        best_cos = np.full(len(R_templates), -np.inf)
        best_theta = np.zeros(len(R_templates))
        for S in sym_Ts or [np.eye(4)]:
            Rg = R @ np.asarray(S, dtype=np.float64)[:3, :3]
            Rres = np.einsum("ij,tkj->tik", Rg, R_templates)  # Rg @ R_t^T
            if inplane:
                a = Rres[:, 0, 0] + Rres[:, 1, 1]
                b = Rres[:, 1, 0] - Rres[:, 0, 1]
                theta = np.arctan2(b, a)
                cos = (np.hypot(a, b) + Rres[:, 2, 2] - 1.0) / 2.0
            else:
                theta = np.zeros(len(R_templates))
                cos = (np.trace(Rres, axis1=1, axis2=2) - 1.0) / 2.0
            better = cos > best_cos
            best_cos = np.where(better, cos, best_cos)
            best_theta = np.where(better, theta, best_theta)
        return np.degrees(np.arccos(np.clip(best_cos, -1.0, 1.0))), np.degrees(best_theta)

    def __call__(self, obs: Observation, seg: SegmentationResult, obj: OnboardedObject) -> MatchResult:
        g = self.frame.associate(obj.obj_id, seg.mask, obs)
        if g is None:
            raise OracleError(f"oracle matcher: object {obj.obj_id} has no GT instance in this frame")
        T_gt = self.frame._require()[g][1]
        R_view = self.view_rotation(T_gt, obj.model.center)
        err, theta = self.rotation_errors_deg(R_view, obj.bank.poses[:, :3, :3], obj.sym_Ts, self.inplane)
        k = min(self.top_k, len(err))
        ids = np.argsort(err, kind="stable")[:k]
        return MatchResult(
            template_ids=ids.astype(np.int64),
            scores=np.cos(np.radians(err[ids])).astype(np.float32),
            inplane_deg=theta[ids].astype(np.float32),
        )
