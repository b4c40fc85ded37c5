"""Interfaces of the four OSOP stages, so that learned and oracle implementations are interchangeable.

A :class:`OnboardedObject` bundles what every stage may need about one object: its model, its
template bank and its symmetry transforms. The :class:`~osop_ros.core.pipeline.Pipeline` chains
``Segmenter -> Matcher -> CorrespondenceEstimator -> PoseSolver`` per object.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from osop_ros.core.types import (
    Correspondences,
    MatchResult,
    Observation,
    PoseHypothesis,
    SegmentationResult,
)

if TYPE_CHECKING:  # imported for annotations only (keeps this module light)
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.templates import TemplateBank


@dataclass
class OnboardedObject:
    """One object ready for inference.

    name:   user-facing name (topic names, CSV obj ids via ``obj_id``).
    model:  loaded mesh (metres).
    bank:   rendered template dictionary (+ network features once extracted).
    sym_Ts: list of (4, 4) symmetry transforms including identity.
    obj_id: integer id (BOP datasets), 0 when unused.
    extra:  stage-specific caches (e.g. template features on the compute device).
    """

    name: str
    model: ObjectModel
    bank: TemplateBank
    sym_Ts: list[np.ndarray]
    obj_id: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Segmenter(Protocol):
    """Stage 1: find the queried object in the image."""

    def __call__(self, obs: Observation, obj: OnboardedObject) -> list[SegmentationResult]:
        """Return instance masks of ``obj`` in ``obs``, best first (may be empty)."""
        ...


class Matcher(Protocol):
    """Stage 2: nearest templates (viewpoint + in-plane rotation) for one segmented instance."""

    def __call__(self, obs: Observation, seg: SegmentationResult, obj: OnboardedObject) -> MatchResult: ...


class CorrespondenceEstimator(Protocol):
    """Stage 3: dense 2D-3D correspondences for one instance given its best template(s)."""

    def __call__(
        self, obs: Observation, seg: SegmentationResult, match: MatchResult, obj: OnboardedObject
    ) -> list[Correspondences]:
        """One set of correspondences per matched template considered (best first)."""
        ...


class PoseSolverStage(Protocol):
    """Stage 4: poses from correspondences (+ depth), refined and ranked."""

    def __call__(
        self,
        obs: Observation,
        seg: SegmentationResult,
        corrs: list[Correspondences],
        obj: OnboardedObject,
    ) -> list[PoseHypothesis]:
        """Ranked hypotheses, best first; raises :class:`~osop_ros.core.types.PoseFailure` when none is trustworthy."""
        ...
