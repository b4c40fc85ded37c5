"""Stage 1 by class-agnostic proposals: MobileSAM masks scored by template descriptors (CNOS-style).

Per frame (cached under a content key of the image, shared by every queried object):
MobileSAM embeds the image once and its mask decoder is prompted on a coarse grid of points; the
masks are filtered (predicted IoU, stability, area), de-duplicated by mask IoU (NMS) and each one
is embedded with the stage-2 descriptor (crop framed like a template, background masked).

Per object: the OSOP head (:class:`~osop_ros.core.segmentation.OneShotSegmenter`) adds prompts at
the peaks of its probability map, and every proposal is scored by

    score = max cosine(proposal descriptor, template descriptors) + ``head_weight`` x mean head probability

(both measured on the real LM-O sample and on the second-style held-out set, docs/results.md). The
returned :class:`SegmentationResult` keeps ``score`` = mean head probability inside the mask, the
feature the score calibration was fitted with; the ranking score is ``rank_score`` (the pipeline
reports it as ``diagnostics["seg_rank_score"]``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from osop_ros.core.geometry import mask_to_box
from osop_ros.core.matching import TemplateMatcher
from osop_ros.core.segmentation import OneShotSegmenter, rank_margins
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import InvalidInputError, Observation, SegmentationResult
from osop_ros.nets.mobile_sam import SamImage


@dataclass
class ProposalConfig:
    """Prompting, filtering and scoring of the proposals (see the module docstring).

    grid: (columns, rows) of grid point prompts per frame; head_peaks: extra prompts per object at
    the head's probability peaks >= ``peak_min_prob``; a mask is kept when its predicted IoU >=
    ``min_pred_iou``, its stability (IoU of the masks at logit +-1) >= ``min_stability`` and its area
    is ``min_area_frac``..``max_area_frac`` of the image; ``nms_iou``: duplicate threshold;
    ``min_score``: proposals scoring less are dropped (no mask = "not here"); ``max_results``: masks
    returned per object, best first.
    """

    image_size: int = 512
    grid: tuple[int, int] = (4, 3)
    head_peaks: int = 4
    peak_min_prob: float = 0.3
    min_pred_iou: float = 0.5
    min_stability: float = 0.0
    min_area_frac: float = 2e-4
    max_area_frac: float = 0.3
    nms_iou: float = 0.7
    head_weight: float = 0.2
    min_score: float = 0.0
    max_results: int = 4
    batch: int = 64

    def __post_init__(self) -> None:
        gx, gy = self.grid
        if gx < 0 or gy < 0 or self.head_peaks < 0 or (gx * gy == 0 and self.head_peaks == 0):
            raise InvalidInputError(f"proposals need prompts (grid points or head peaks), got grid {self.grid}")
        if self.max_results < 1 or self.batch < 1:
            raise InvalidInputError("proposals: max_results and batch must be >= 1")


@dataclass
class _Proposals:
    """Masks of one prompt set: full-resolution masks (N, H, W) bool and descriptors (N, D)."""

    masks: np.ndarray
    desc: torch.Tensor
    pred_iou: np.ndarray  # (N,) MobileSAM's predicted IoU


@dataclass
class _Frame:
    """The cached per-frame work: content key, MobileSAM embedding, grid proposals (None until needed)."""

    key: str
    image: SamImage
    grid: _Proposals | None = None


def image_key(rgb: np.ndarray) -> str:
    """Content key of an image (shape + bytes)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(rgb.shape).encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()


def grid_points(width: int, height: int, gx: int, gy: int) -> np.ndarray:
    """(gx * gy, 2) float32 pixel centres of a gx x gy grid of cells."""
    xs = (np.arange(gx) + 0.5) * width / gx
    ys = (np.arange(gy) + 0.5) * height / gy
    return np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2).astype(np.float32)


def probability_peaks(prob: np.ndarray, k: int, min_prob: float, cell: int = 8) -> np.ndarray:
    """(<=k, 2) float32 pixel positions of the k highest local maxima of an (H, W) map, >= min_prob."""
    if k <= 0:
        return np.zeros((0, 2), np.float32)
    H, W = prob.shape
    small = cv2.resize(prob.astype(np.float32), (max(1, W // cell), max(1, H // cell)), interpolation=cv2.INTER_AREA)
    peak = (small >= cv2.dilate(small, np.ones((5, 5), np.uint8))) & (small >= min_prob)
    ys, xs = np.nonzero(peak)
    order = np.argsort(-small[ys, xs])[:k]
    sx, sy = W / small.shape[1], H / small.shape[0]
    return np.stack([(xs[order] + 0.5) * sx, (ys[order] + 0.5) * sy], -1).astype(np.float32)


def mask_nms(masks: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Indices kept by greedy NMS of (N, h, w) bool masks on their pairwise IoU, best score first."""
    if len(masks) == 0:
        return torch.zeros(0, dtype=torch.long)
    flat = masks.flatten(1).float()
    inter = flat @ flat.T
    area = flat.sum(1)
    ious = inter / (area[:, None] + area[None] - inter).clamp(min=1.0)
    order = torch.argsort(scores, descending=True)
    keep: list[int] = []
    suppressed = torch.zeros(len(masks), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= ious[i] > iou
    return torch.tensor(keep, dtype=torch.long)


class ProposalSegmenter:
    """Segmenter protocol: MobileSAM proposals ranked by template descriptor + OSOP head probability.

    ``head`` gives the probability map (prompts at its peaks, the ``seg_score`` of the results);
    ``matcher`` gives the descriptor network and the object's template descriptors; ``sam`` is a
    :class:`~osop_ros.nets.mobile_sam.MobileSAM` (any ``image_size``); ``crop_size`` is the template
    crop side of the banks (proposal descriptors are computed once per frame for every object).
    """

    def __init__(
        self,
        head: OneShotSegmenter,
        sam: torch.nn.Module,
        matcher: TemplateMatcher,
        cfg: ProposalConfig | None = None,
        crop_size: int = 64,
    ) -> None:
        self.head = head
        self.crop_size = crop_size
        self.sam = sam.eval()
        self.matcher = matcher
        self.cfg = cfg or ProposalConfig()
        self._frame: _Frame | None = None

    # --- per frame -------------------------------------------------------------------------------
    def frame(self, rgb: np.ndarray) -> _Frame:
        """The cached embedding (and grid proposals) of ``rgb``; recomputed when the content changes."""
        key = image_key(rgb)
        if self._frame is None or self._frame.key != key:
            self._frame = _Frame(key, self.sam.embed_image(rgb))
        return self._frame

    @torch.no_grad()
    def propose(self, rgb: np.ndarray, frame: _Frame, points_xy: np.ndarray) -> _Proposals:
        """Single-point prompts (N, 2) in pixels -> filtered, de-duplicated proposals with descriptors."""
        c = self.cfg
        H, W = rgb.shape[:2]
        if len(points_xy) == 0:
            return self._empty(H, W)
        logits, ious = [], []
        for s in range(0, len(points_xy), c.batch):
            pts = points_xy[s : s + c.batch, None, :]
            lg, io = self.sam.predict(frame.image, pts, np.ones(pts.shape[:2], np.int64), multimask=True)
            logits.append(lg.flatten(0, 1))
            ious.append(io.flatten())
        raw, io = torch.cat(logits), torch.cat(ious)
        g = raw.shape[-1]
        img = frame.image
        vh = max(1, round(img.resized_hw[0] * g / self.sam.image_size))
        vw = max(1, round(img.resized_hw[1] * g / self.sam.image_size))
        lg = raw[:, :vh, :vw]  # the image inside the padded square
        hi, lo = lg > 1.0, lg > -1.0
        stability = hi.flatten(1).sum(1).float() / lo.flatten(1).sum(1).float().clamp(min=1.0)
        m = lg > 0.0
        area = m.flatten(1).float().mean(1)
        ok = (io >= c.min_pred_iou) & (stability >= c.min_stability)
        ok &= (area >= c.min_area_frac) & (area <= c.max_area_frac)
        idx = torch.nonzero(ok)[:, 0]
        if len(idx) == 0:
            return self._empty(H, W)
        keep = idx[mask_nms(m[idx], io[idx], c.nms_iou)]
        masks = (self.sam.upscale(img, raw[keep, None])[:, 0] > 0.0).cpu().numpy()
        nonempty = masks.reshape(len(masks), -1).any(1)
        masks = masks[nonempty]
        if len(masks) == 0:
            return self._empty(H, W)
        return _Proposals(masks, self._describe(rgb, masks), io[keep].cpu().numpy()[nonempty])

    def _empty(self, H: int, W: int) -> _Proposals:
        return _Proposals(np.zeros((0, H, W), bool), torch.zeros(0, 1), np.zeros(0, np.float32))

    def _describe(self, rgb: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        """(N, D) L2-normalised descriptors of the mask crops (framed like the stage-2 query)."""
        return self.matcher.describe_masks(rgb, masks, self.crop_size)

    # --- per object ------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, obs: Observation, obj: OnboardedObject) -> list[SegmentationResult]:
        """Masks of ``obj`` in ``obs`` best first (at most ``max_results``; empty = not found)."""
        c = self.cfg
        rgb = obs.rgb
        H, W = rgb.shape[:2]
        fr = self.frame(rgb)
        if fr.grid is None:
            pts = grid_points(W, H, *c.grid) if c.grid[0] * c.grid[1] else np.zeros((0, 2), np.float32)
            fr.grid = self.propose(rgb, fr, pts)
        prob = self.head.probability(obs, obj)
        peaks = self.propose(rgb, fr, probability_peaks(prob, c.head_peaks, c.peak_min_prob))
        masks = np.concatenate([fr.grid.masks, peaks.masks])
        if len(masks) == 0:
            return []
        desc = torch.cat([d for d in (fr.grid.desc, peaks.desc) if len(d)])
        cos = self.matcher.template_similarity(desc, obj)
        flat = masks.reshape(len(masks), -1)
        area = flat.sum(1)
        head_mean = (flat.astype(np.float32) @ prob.ravel()) / np.maximum(area, 1)
        score = cos + c.head_weight * head_mean
        if len(peaks.masks) and len(fr.grid.masks):  # a peak mask duplicating a grid mask: keep the better
            keep = mask_nms(torch.from_numpy(masks), torch.from_numpy(score), c.nms_iou).numpy()
        else:
            keep = np.argsort(-score)
        distinct = [int(i) for i in keep]
        margin = dict(zip(distinct, rank_margins(score[distinct]), strict=True))
        keep = [i for i in distinct if score[i] >= c.min_score][: c.max_results]
        return [
            SegmentationResult(
                mask=masks[i],
                prob=prob,
                box=mask_to_box(masks[i]),
                score=float(head_mean[i]),
                rank_score=float(score[i]),
                rank_margin=margin[i],
            )
            for i in keep
        ]
