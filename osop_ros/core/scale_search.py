"""Depth along the viewing ray for frames without depth: a verified search over the pose's distance.

Without depth, PnP on the dense correspondences fixes the object's direction well but its distance
poorly: on the LM-O sample, for poses with the right rotation the median distance error was 3.6 % (a
quarter of the diameter), and the true distance alone would double the MSSD recall (docs/results.md,
session 21). The selected pose is moved along the ray through its model centre, ``c' = s c`` for ``s``
on a log-spaced grid in ``[1 / (1 + max_frac), 1 + max_frac]`` (rotation and image position kept), each
candidate rendered and scored by the verifier, and the factor whose raw verification score, averaged with
its two grid neighbours, is highest wins. The raw score's peak is flat and noisy to about +-2 % of the
distance even on a clean render (test_scale_search.py), hence the 3-tap average. Chosen on our own val set
(cal_val) among the verifier's features (raw score, silhouette IoU, edges, texture, colour, mask recall and
precision, sums of them, a prior towards s = 1): the raw score, plain or averaged, gave the most MSSD
(docs/results.md, session 21).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from osop_ros.core.geometry import transform_points
from osop_ros.core.types import InvalidInputError, Observation, SegmentationResult

if TYPE_CHECKING:
    from osop_ros.core.stages import OnboardedObject
    from osop_ros.core.verify import Verification, Verifier


@dataclass
class ScaleSearchConfig:
    """``max_frac``: largest relative change of the distance searched; ``steps``: grid size (s = 1 added)."""

    max_frac: float = 0.2
    steps: int = 21

    def __post_init__(self) -> None:
        if not 0.0 < self.max_frac <= 0.5:
            raise InvalidInputError(f"scale search max_frac must be in (0, 0.5], got {self.max_frac}")
        if not 3 <= self.steps <= 101:
            raise InvalidInputError(f"scale search steps must be in [3, 101], got {self.steps}")

    def scales(self) -> np.ndarray:
        """(steps [+1],) float64 distance factors, ascending, 1.0 included."""
        r = math.log1p(self.max_frac)
        s = np.exp(np.linspace(-r, r, self.steps))
        return np.unique(np.concatenate([s, [1.0]]))


def along_ray(T_cam_obj: np.ndarray, center_obj: np.ndarray, s: float) -> np.ndarray:
    """(4, 4) pose with the model centre ``center_obj`` (3,) moved from c to ``s`` c (camera frame), same R."""
    c = transform_points(T_cam_obj, center_obj[None])[0]
    T = np.array(T_cam_obj, dtype=np.float64, copy=True)
    T[:3, 3] = s * c - T[:3, :3] @ center_obj
    return T


@dataclass
class ScaleChoice:
    """Result of :class:`RgbScaleSearch`: the chosen pose (4, 4), its verification and factor ``scale``."""

    T_cam_obj: np.ndarray
    verification: Verification
    scale: float


class RgbScaleSearch:
    """Moves an RGB pose along its viewing ray to the distance the verifier scores best."""

    def __init__(self, verifier: Verifier, config: ScaleSearchConfig | None = None) -> None:
        self.verifier = verifier
        self.config = config or ScaleSearchConfig()
        self._scales = self.config.scales()

    def __call__(
        self,
        obs: Observation,
        seg: SegmentationResult | None,
        obj: OnboardedObject,
        T_cam_obj: np.ndarray,
        extra: dict[str, float] | None = None,
    ) -> ScaleChoice:
        """Best-verified pose among ``T_cam_obj`` (4, 4) moved along the ray (the depth of ``obs`` unused)."""
        rgb_only = Observation(obs.rgb, obs.camera, None)
        center = np.asarray(getattr(obj.model, "center", np.zeros(3)), dtype=np.float64)
        poses = [along_ray(T_cam_obj, center, float(s)) for s in self._scales]
        checks = [self.verifier.verify(rgb_only, seg, obj, T, False, extra) for T in poses]
        raw = np.array([v.raw for v in checks], dtype=np.float64)
        smooth = np.convolve(np.pad(raw, 1, mode="edge"), np.full(3, 1.0 / 3.0), mode="valid")
        one = int(np.argmin(np.abs(self._scales - 1.0)))
        i = int(np.argmax(smooth))
        if smooth[i] <= smooth[one]:  # ties keep the solver's distance
            i = one
        return ScaleChoice(poses[i], checks[i], float(self._scales[i]))
