"""The OSOP pipeline: segmentation -> template matching -> correspondences -> pose, per object."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from osop_ros.core.stages import (
    CorrespondenceEstimator,
    Matcher,
    OnboardedObject,
    PoseSolverStage,
    Segmenter,
)
from osop_ros.core.types import InvalidInputError, Observation, PoseEstimate, PoseFailure

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Refines the previous pose of an object in a new frame, or returns None to request the full pipeline."""

    def __call__(self, obs: Observation, obj: OnboardedObject, prev: PoseEstimate) -> PoseEstimate | None: ...


class Pipeline:
    """Chains the four stages in memory for every onboarded object.

    The stage objects are injected (learned networks, or oracles for ablations); ``objects`` are
    onboarded once and reused for every frame.
    """

    def __init__(
        self,
        objects: Sequence[OnboardedObject],
        segmenter: Segmenter,
        matcher: Matcher,
        correspondence: CorrespondenceEstimator,
        solver: PoseSolverStage,
        max_instances: int = 1,
        tracker: Tracker | None = None,
        modality: str = "auto",
    ) -> None:
        if modality not in ("auto", "rgb", "rgbd"):
            raise InvalidInputError(f"modality must be auto|rgb|rgbd, got {modality!r}")
        self.modality = modality
        self.objects = list(objects)
        self.segmenter = segmenter
        self.matcher = matcher
        self.correspondence = correspondence
        self.solver = solver
        self.max_instances = max_instances
        self.tracker = tracker
        self._last: dict[str, PoseEstimate] = {}


    def add_object(self, obj: OnboardedObject) -> None:
        """Register another onboarded object (replaces one with the same name)."""
        self.objects = [o for o in self.objects if o.name != obj.name] + [obj]

    def __call__(self, obs: Observation, objects: Sequence[str] | None = None) -> list[PoseEstimate]:
        """Estimate poses of every (or the named) object in ``obs``; failures are logged, not raised."""
        obs.validate()
        if self.modality == "rgb" and obs.depth is not None:
            obs = Observation(obs.rgb, obs.camera, None)
        elif self.modality == "rgbd" and obs.depth is None:
            raise InvalidInputError("pipeline modality is rgbd but the observation has no depth image")
        out: list[PoseEstimate] = []
        for obj in self.objects:
            if objects is not None and obj.name not in objects:
                continue
            out.extend(self.estimate_object(obs, obj))
        return out

    def reset_tracking(self) -> None:
        """Forget previous poses (next frame runs the full pipeline)."""
        self._last.clear()

    def estimate_object(self, obs: Observation, obj: OnboardedObject) -> list[PoseEstimate]:
        """All instances of one object; each estimate carries per-stage diagnostics and timings.

        With a tracker and a previous pose, ICP-only tracking is tried first (single instance); when it
        fails the four stages run as usual.
        """
        if self.tracker is not None and obj.name in self._last:
            tracked = self.tracker(obs, obj, self._last[obj.name])
            if tracked is not None:
                self._last[obj.name] = tracked
                return [tracked]
            del self._last[obj.name]
        estimates = self._full(obs, obj)
        if self.tracker is not None and estimates:
            self._last[obj.name] = estimates[0]
        return estimates

    def _full(self, obs: Observation, obj: OnboardedObject) -> list[PoseEstimate]:
        t0 = time.perf_counter()
        segs = self.segmenter(obs, obj)[: self.max_instances]
        t_seg = time.perf_counter() - t0
        estimates = []
        for seg in segs:
            timings = {"segment": t_seg}
            diag: dict = {"mask_area": int(seg.mask.sum()), "seg_score": float(seg.score)}
            t = time.perf_counter()
            match = self.matcher(obs, seg, obj)
            timings["match"] = time.perf_counter() - t
            diag["template_ids"] = [int(i) for i in match.template_ids]
            diag["match_scores"] = [float(s) for s in match.scores]
            t = time.perf_counter()
            corrs = self.correspondence(obs, seg, match, obj)
            timings["correspond"] = time.perf_counter() - t
            diag["n_correspondences"] = [len(c) for c in corrs]
            t = time.perf_counter()
            try:
                hyps = self.solver(obs, seg, corrs, obj)
            except PoseFailure as exc:
                timings["solve"] = time.perf_counter() - t
                log.debug("%s: no pose (%s)", obj.name, exc.reason)
                continue
            timings["solve"] = time.perf_counter() - t
            if not hyps:
                continue
            best = hyps[0]
            diag.update({"inliers": best.inliers, **best.info})
            timings["total"] = sum(timings.values())
            estimates.append(
                PoseEstimate(
                    object_name=obj.name,
                    T_cam_obj=best.T_cam_obj,
                    score=float(best.score),
                    diagnostics=diag,
                    timings=timings,
                )
            )
        return estimates
