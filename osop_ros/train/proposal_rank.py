"""Fit the ranking of the stage-1 proposals (:mod:`osop_ros.core.proposals`) on scenes with visible masks.

For every image and every object visible in it (``visib_fract`` >= ``min_visib``), the proposal
segmenter's candidates for that object (grid + head-peak proposals, before ranking), their ranking
features and their IoU with the object's visible mask (best instance) are collected. A conditional
logit (softmax over the proposals of one query, L2-regularised) is fitted to put the proposal with the
highest IoU first; queries whose best proposal reaches less than ``min_target_iou`` teach nothing about
the choice and are left out. The weights are reported relative to the descriptor cosine's (the ranking
is invariant to a positive scale), the form :class:`~osop_ros.core.proposals.ProposalConfig` takes.

Use our own generator's held-out scenes (``osop data synth --split val``) to fit, and check the result on
data it did not make (``osop eval-stages --stage1-only --segmenter proposals``, docs/results.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from osop_ros.core.proposals import FEATURE_NAMES, ProposalFeatures
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import InvalidInputError, Observation
from osop_ros.data.bop import BopDataset

log = logging.getLogger(__name__)


class Candidates(Protocol):
    """What the fit needs of the proposal segmenter: its unranked candidates for one object."""

    def candidates(self, obs: Observation, obj: OnboardedObject) -> tuple[np.ndarray, np.ndarray, ProposalFeatures]:
        ...


@dataclass
class RankQuery:
    """The proposals of one (image, present object) query.

    features: (N, 4) float64 in the order of :data:`~osop_ros.core.proposals.FEATURE_NAMES`.
    iou: (N,) float32 IoU of each proposal with the object's visible mask (best instance).
    """

    features: np.ndarray
    iou: np.ndarray
    image: tuple[int, int] = (0, 0)  # (scene_id, im_id)
    obj_id: int = 0


def collect(
    ds: BopDataset,
    objects: Mapping[int, OnboardedObject],
    segmenter: Candidates,
    max_images: int | None = None,
    min_visib: float = 0.1,
    min_pixels: int = 50,
    progress: Callable[[int, int], None] | None = None,
) -> list[RankQuery]:
    """Ranking queries of every visible instance of ``objects`` in ``ds`` (needs ``mask_visib``)."""
    images = sorted({(t.scene_id, t.im_id) for t in ds.targets if t.obj_id in objects})
    if max_images is not None:
        images = images[:max_images]
    out: list[RankQuery] = []
    for n, (sid, iid) in enumerate(images):
        gts = ds.gt(sid, iid)
        visible: dict[int, list[np.ndarray]] = {}
        for gi, g in enumerate(gts):
            if g.obj_id not in objects or g.visib_fract < min_visib:
                continue
            m = ds.mask_visib(sid, iid, gi)
            if m is None:
                raise InvalidInputError(
                    f"{ds.root}: image {sid}/{iid} has no mask_visib for GT {gi}; the ranking is fitted on "
                    "datasets with visible masks (`osop data synth` output)"
                )
            if m.sum() >= min_pixels:
                visible.setdefault(g.obj_id, []).append(m)
        if not visible:
            continue
        obs = ds.load_observation(sid, iid, with_depth=False)
        for oid, gt_masks in sorted(visible.items()):
            masks, _, feats = segmenter.candidates(obs, objects[oid])
            if len(masks) == 0:
                continue
            flat = masks.reshape(len(masks), -1).astype(np.float32)
            area = flat.sum(1)
            iou = np.zeros(len(masks), np.float32)
            for gm in gt_masks:
                v = gm.ravel().astype(np.float32)
                inter = flat @ v
                iou = np.maximum(iou, inter / np.maximum(area + v.sum() - inter, 1.0))
            out.append(RankQuery(feats.matrix(), iou, (sid, iid), oid))
        if progress is not None:
            progress(n + 1, len(images))
    return out


def fit_ranking(queries: list[RankQuery], l2: float = 1e-3, min_target_iou: float = 0.3) -> np.ndarray:
    """(4,) ranking weights, the cosine's scaled to 1, of a conditional logit on ``queries``."""
    data = [(torch.from_numpy(q.features), int(q.iou.argmax())) for q in queries
            if len(q.iou) > 1 and q.iou.max() >= min_target_iou]
    if not data:
        raise InvalidInputError(f"no query has a proposal with IoU >= {min_target_iou}: nothing to fit")
    w = torch.zeros(len(FEATURE_NAMES), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=500, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        nll = sum(-torch.log_softmax(x @ w, 0)[t] for x, t in data) / len(data)
        loss = nll + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    raw = w.detach().numpy()
    if not raw[0] > 0:
        raise InvalidInputError(f"fitted descriptor-cosine weight is {raw[0]:.3g} (<= 0): the data does not support "
                                "a ranking led by the descriptor")
    return raw / raw[0]


def top1(queries: list[RankQuery], weights: np.ndarray) -> dict[str, float]:
    """Mean IoU of the top-ranked proposal, share with IoU >= 0.5, and the oracle's mean IoU."""
    picked = np.array([q.iou[int(np.argmax(q.features @ weights))] for q in queries])
    best = np.array([q.iou.max() for q in queries])
    if len(picked) == 0:
        return {"queries": 0, "mean_iou": float("nan"), "share_iou_0.5": float("nan"), "oracle_mean_iou": float("nan")}
    return {"queries": len(picked), "mean_iou": round(float(picked.mean()), 4),
            "share_iou_0.5": round(float((picked >= 0.5).mean()), 4), "oracle_mean_iou": round(float(best.mean()), 4)}


def report(queries: list[RankQuery], weights: np.ndarray, current: np.ndarray) -> dict[str, Any]:
    """Fitted weights and top-1 numbers of the fitted, the current and the cosine-only ranking."""
    return {
        "weights": {k: round(float(v), 4) for k, v in zip(FEATURE_NAMES, weights, strict=True)},
        "top1_fitted": top1(queries, weights),
        "top1_current": top1(queries, current),
        "top1_cosine_only": top1(queries, np.eye(len(FEATURE_NAMES))[0]),
    }
