"""Stage 1: one-shot segmentation of a queried object with :class:`~osop_ros.nets.segnet.SegNet`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from osop_ros.core.geometry import mask_to_box
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import Observation, SegmentationResult
from osop_ros.nets.tensors import mask_tensor, rgb_tensor

if TYPE_CHECKING:
    from osop_ros.core.matching import TemplateMatcher

RANKINGS = ("descriptor", "head")


def rank_margins(scores: np.ndarray) -> list[float | None]:
    """Per candidate: its ranking score minus the best score of the others; None when it is alone. scores (N,)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) < 2:
        return [None] * len(s)
    best = int(np.argmax(s))
    second = np.delete(s, best).max()
    return [float(v - (second if i == best else s[best])) for i, v in enumerate(s)]


def coarse_view_subset(view_index: np.ndarray, n_target: int = 48) -> np.ndarray:
    """Indices of an evenly strided subset of viewpoints (in-plane index 0) of about ``n_target`` views."""
    base = np.nonzero(view_index[:, 2] == 0)[0]
    if len(base) <= n_target:
        return base
    step = len(base) / n_target
    return base[(np.arange(n_target) * step).astype(int)]


class OneShotSegmenter:
    """Image + the object's template vectors -> instance masks (connected components), best first.

    The network runs at ``input_width`` (aspect kept); probabilities are resized back to the full
    image. Template vectors of a strided subset of ``n_templates`` views (about what the network
    saw per query in training) are computed once per object and cached on the device.

    Components are ranked (``ranking``) by ``"head"``: mean probability x sqrt(area), or by
    ``"descriptor"``: the best cosine of the component's stage-2 descriptor to the object's templates
    (``ranker``, a :class:`~osop_ros.core.matching.TemplateMatcher`) + ``head_weight`` x mean
    probability, the rule of the proposal segmenter (docs/design.md); ``rank_score`` and
    ``rank_margin`` of the results are then set.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        device: torch.device,
        input_width: int = 320,
        threshold: float = 0.5,
        n_templates: int = 48,
        min_area_frac: float = 2e-4,
        ranking: str = "head",
        ranker: TemplateMatcher | None = None,
        head_weight: float = 0.2,
    ) -> None:
        from osop_ros.core.types import InvalidInputError

        if ranking not in RANKINGS:
            raise InvalidInputError(f"stage-1 ranking must be one of {RANKINGS}, got {ranking!r}")
        if ranking == "descriptor" and ranker is None:
            raise InvalidInputError("stage-1 ranking 'descriptor' needs the stage-2 matcher (ranker)")
        self.ranking = ranking
        self.ranker = ranker
        self.head_weight = head_weight
        self.net = net.eval()
        self.device = device
        self.input_width = input_width
        self.threshold = threshold
        self.n_templates = n_templates
        self.min_area_frac = min_area_frac

    @torch.no_grad()
    def template_vectors(self, obj: OnboardedObject) -> tuple[list[torch.Tensor], torch.Tensor]:
        """[(1, K, C_l)] template vectors and the (1, N_BINS) colour histogram, cached in ``obj.extra``.

        Bank features ``seg_o{l}`` / ``seg_hist`` (written by onboarding) are reused when present.
        """
        if "seg_tvecs" not in obj.extra:
            from osop_ros.nets.segnet import colour_histogram

            bank = obj.bank
            sel = coarse_view_subset(bank.view_index, self.n_templates)
            feats = bank.features
            n_att = getattr(self.net, "n_template_levels", self.net.cfg.n_attention)
            if all(f"seg_o{i + 1}" in feats for i in range(n_att)) and "seg_hist" in feats:
                vecs = [
                    torch.from_numpy(feats[f"seg_o{i + 1}"][sel].astype(np.float32)).to(self.device)
                    for i in range(n_att)
                ]
                hist = torch.from_numpy(feats["seg_hist"][sel].astype(np.float32)).to(self.device).mean(0, keepdim=True)
            else:
                rgb, mask = rgb_tensor(bank.rgb[sel], self.device), mask_tensor(bank.mask[sel], self.device)
                hist = colour_histogram(rgb, mask).mean(0, keepdim=True)
                vecs = self.net.template_vectors(rgb, mask, hist.expand(len(sel), -1))
            obj.extra["seg_tvecs"] = ([v.unsqueeze(0) for v in vecs], hist)
        return obj.extra["seg_tvecs"]

    @torch.no_grad()
    def probability(self, obs: Observation, obj: OnboardedObject) -> np.ndarray:
        """(H, W) float32 foreground probability of ``obj`` at full image resolution."""
        H, W = obs.rgb.shape[:2]
        w = self.input_width
        h = max(32, round(H * w / W))
        small = cv2.resize(obs.rgb, (w, h), interpolation=cv2.INTER_AREA)
        x = rgb_tensor(small, self.device)
        tvecs, hist = self.template_vectors(obj)
        prob = torch.sigmoid(self.net(x, tvecs, hist))[0, 0].cpu().numpy()
        return cv2.resize(prob, (W, H), interpolation=cv2.INTER_LINEAR)

    def __call__(self, obs: Observation, obj: OnboardedObject) -> list[SegmentationResult]:
        prob = self.probability(obs, obj)
        fg = (prob >= self.threshold).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
        min_area = self.min_area_frac * fg.size
        out = []
        for i in range(1, n):
            if stats[i, cv2.CC_STAT_AREA] < min_area:
                continue
            m = labels == i
            out.append(SegmentationResult(mask=m, prob=prob, box=mask_to_box(m), score=float(prob[m].mean())))
        if self.ranking == "descriptor" and out:
            return self._rank_by_descriptor(obs, obj, out)
        out.sort(key=lambda s: -s.score * np.sqrt(s.mask.sum()))
        return out

    def _rank_by_descriptor(
        self, obs: Observation, obj: OnboardedObject, segs: list[SegmentationResult]
    ) -> list[SegmentationResult]:
        """``segs`` sorted by template-descriptor cosine + ``head_weight`` x mean probability (best first)."""
        assert self.ranker is not None
        desc = self.ranker.describe_masks(obs.rgb, [s.mask for s in segs], obj.bank.crop_size)
        rank = self.ranker.template_similarity(desc, obj) + self.head_weight * np.array([s.score for s in segs])
        for s, r, m in zip(segs, rank, rank_margins(rank), strict=True):
            s.rank_score, s.rank_margin = float(r), m
        return [segs[i] for i in np.argsort(-rank, kind="stable")]
