"""Optional tracking mode: refine the previous pose with ICP only; the pipeline falls back to the full
four stages when the fit is poor (fitness below threshold, implausible correction, no depth)."""

from __future__ import annotations

import time

import cv2
import numpy as np

from osop_ros.core.overlay import model_silhouette
from osop_ros.core.solver import IcpRefiner, scene_points
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import Observation, PoseEstimate


class IcpTracker:
    """Previous ``T_cam_obj`` -> ICP against the depth inside the model's projected silhouette (dilated).

    Returns None (-> full pipeline) without depth, with too few depth points, or when ICP fitness is
    below ``min_fitness``. The score of a tracked pose is its ICP fitness.
    """

    def __init__(self, icp: IcpRefiner | None = None, min_fitness: float = 0.6, dilate_px: int = 12,
                 n_samples: int = 3000) -> None:
        self.icp = icp or IcpRefiner(max_dist_fracs=(0.1, 0.04, 0.015), iterations=(10, 15, 20))
        self.min_fitness = min_fitness
        self.dilate_px = dilate_px
        self.n_samples = n_samples

    def _samples(self, obj: OnboardedObject) -> tuple[np.ndarray, np.ndarray]:
        if "track_samples" not in obj.extra:
            obj.extra["track_samples"] = obj.model.sample_surface(self.n_samples, seed=0)
        return obj.extra["track_samples"]

    def __call__(self, obs: Observation, obj: OnboardedObject, prev: PoseEstimate) -> PoseEstimate | None:
        if obs.depth is None:
            return None
        t0 = time.perf_counter()
        pts, normals = self._samples(obj)
        K = obs.camera.K
        sil = model_silhouette(K, prev.T_cam_obj, pts, obs.depth.shape).astype(np.uint8)
        if not sil.any():
            return None
        sil = cv2.dilate(sil, np.ones((2 * self.dilate_px + 1, 2 * self.dilate_px + 1), np.uint8))
        scene = scene_points(obs.depth, K, sil.astype(bool), dilate_px=0)
        res = self.icp(prev.T_cam_obj, pts, normals, scene, obj.model.diameter, obj.model.center)
        if not res.accepted or res.fitness < self.min_fitness:
            return None
        return PoseEstimate(
            obj.name,
            res.T_cam_obj,
            float(res.fitness),
            diagnostics={"tracked": True, "icp_fitness": float(res.fitness), "icp_rmse": float(res.rmse)},
            timings={"track": time.perf_counter() - t0, "total": time.perf_counter() - t0},
        )
