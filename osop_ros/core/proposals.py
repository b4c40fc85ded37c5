"""Stage 1 by class-agnostic proposals: MobileSAM masks scored by template descriptors (CNOS-style).

Per frame (cached under a content key of the image, shared by every queried object):
MobileSAM embeds the image once and its mask decoder is prompted on a coarse grid of points; the
masks are filtered (predicted IoU, stability, area), de-duplicated by mask IoU (NMS) and each one
is embedded with the stage-2 descriptor (crop framed like a template, background masked) and
summarised by a colour histogram.

Per object: the OSOP head (:class:`~osop_ros.core.segmentation.OneShotSegmenter`) adds prompts at
the peaks of its probability map, and every proposal is scored by a linear ranking

    score = max cosine(proposal descriptor, template descriptors)
            + ``head_weight`` x mean head probability inside the proposal
            + ``cover_weight`` x share of the head's mask (probability >= 0.5) inside the proposal
            + ``colour_weight`` x colour agreement (Bhattacharyya coefficient of the proposal's colour
              histogram and the object's, from its rendered templates)

whose weights were fitted on proposals of our own synthetic val scenes (``osop train proposal-rank``,
:mod:`osop_ros.train.proposal_rank`) and checked on the second style and the real LM-O sample
(docs/results.md, session 20). The returned :class:`SegmentationResult` keeps ``score`` = mean head
probability inside the mask, the feature the score calibration was fitted with; the ranking score is
``rank_score`` (the pipeline reports it as ``diagnostics["seg_rank_score"]``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from osop_ros.core.config import (
    PROPOSAL_COLOUR_WEIGHT,
    PROPOSAL_COVER_WEIGHT,
    PROPOSAL_HEAD_WEIGHT,
    PROPOSAL_IMAGE_SIZE,
)
from osop_ros.core.geometry import mask_to_box
from osop_ros.core.matching import TemplateMatcher
from osop_ros.core.segmentation import OneShotSegmenter, rank_margins
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import InvalidInputError, Observation, SegmentationResult
from osop_ros.nets.mobile_sam import SamImage

FEATURE_NAMES = ("cos", "head", "cover", "colour")
"""Columns of :class:`ProposalFeatures` ``matrix()``, in the order of :meth:`ProposalConfig.weights`."""

HIST_HUES, HIST_SATS, HIST_GREYS = 12, 3, 4
HIST_BINS = HIST_HUES * HIST_SATS + HIST_GREYS
GREY_SAT, DARK_VALUE = 50, 40  # OpenCV HSV (0-255): less saturated or darker pixels are binned by value


def colour_histogram(pixels: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 RGB pixels -> (HIST_BINS,) float32 normalised histogram (uniform when N = 0).

    Chromatic pixels: 12 hue x 3 saturation bins; grey or dark ones (saturation < 50 or value < 40 on
    OpenCV's 0-255 HSV): 4 value bins. Hue and saturation barely move with brightness, so a rendered
    template and a real photo of the object share bins (the stage-1 head's histogram,
    :func:`osop_ros.nets.segnet.colour_histogram`, splits by intensity and is a network input, so it is
    not reused here).
    """
    if len(pixels) == 0:
        return np.full(HIST_BINS, 1.0 / HIST_BINS, np.float32)
    hsv = cv2.cvtColor(np.ascontiguousarray(pixels, np.uint8).reshape(-1, 1, 3), cv2.COLOR_RGB2HSV)
    h, s, v = hsv.reshape(-1, 3).astype(np.int32).T
    grey = (s < GREY_SAT) | (v < DARK_VALUE)
    hue = np.minimum(h * HIST_HUES // 180, HIST_HUES - 1)
    sat = np.clip((s - GREY_SAT) * HIST_SATS // (256 - GREY_SAT), 0, HIST_SATS - 1)
    idx = np.where(grey, HIST_HUES * HIST_SATS + np.minimum(v * HIST_GREYS // 256, HIST_GREYS - 1),
                   hue * HIST_SATS + sat)
    hist = np.bincount(idx, minlength=HIST_BINS).astype(np.float32)
    return hist / hist.sum()


def mask_histograms(rgb: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 image, (N, H, W) bool masks -> (N, HIST_BINS) colour histograms of the masked pixels."""
    return np.stack([colour_histogram(rgb[m]) for m in masks]) if len(masks) else np.zeros((0, HIST_BINS), np.float32)


def object_histogram(rgb: np.ndarray, mask: np.ndarray, max_pixels: int = 200_000) -> np.ndarray:
    """Colour histogram of an object's rendered templates: (T, S, S, 3) uint8, (T, S, S) bool -> (HIST_BINS,)."""
    px = rgb[mask]
    return colour_histogram(px[:: max(1, len(px) // max_pixels)])


@dataclass
class ProposalFeatures:
    """The ranking features of N proposals of one queried object, each (N,) float32.

    cos: best template-descriptor cosine; head: mean head probability inside the mask; cover: share of
    the head's mask (probability >= 0.5) inside the proposal (0 when the head finds nothing); colour:
    Bhattacharyya coefficient of the proposal's and the object's colour histograms (0..1).
    """

    cos: np.ndarray
    head: np.ndarray
    cover: np.ndarray
    colour: np.ndarray

    def matrix(self) -> np.ndarray:
        """(N, 4) float64 in the order of :data:`FEATURE_NAMES`."""
        return np.stack([np.asarray(getattr(self, k), np.float64) for k in FEATURE_NAMES], 1)


@dataclass
class ProposalConfig:
    """Prompting, filtering and scoring of the proposals (see the module docstring).

    grid: (columns, rows) of grid point prompts per frame; head_peaks: extra prompts per object at
    the head's probability peaks >= ``peak_min_prob``; a mask is kept when its predicted IoU >=
    ``min_pred_iou``, its stability (IoU of the masks at logit +-1) >= ``min_stability`` and its area
    is ``min_area_frac``..``max_area_frac`` of the image; ``nms_iou``: duplicate threshold;
    ``head_weight``, ``cover_weight``, ``colour_weight``: the ranking's weights (module docstring; the
    descriptor cosine has weight 1; defaults fitted by ``osop train proposal-rank``, session 20);
    ``min_score``: proposals scoring less are dropped (no mask = "not here"); ``max_results``: masks
    returned per object, best first.
    """

    image_size: int = PROPOSAL_IMAGE_SIZE
    grid: tuple[int, int] = (4, 3)
    head_peaks: int = 4
    peak_min_prob: float = 0.3
    min_pred_iou: float = 0.5
    min_stability: float = 0.0
    min_area_frac: float = 2e-4
    max_area_frac: float = 0.3
    nms_iou: float = 0.7
    head_weight: float = PROPOSAL_HEAD_WEIGHT
    cover_weight: float = PROPOSAL_COVER_WEIGHT
    colour_weight: float = PROPOSAL_COLOUR_WEIGHT
    min_score: float = 0.0
    max_results: int = 4
    batch: int = 64

    def __post_init__(self) -> None:
        gx, gy = self.grid
        if gx < 0 or gy < 0 or self.head_peaks < 0 or (gx * gy == 0 and self.head_peaks == 0):
            raise InvalidInputError(f"proposals need prompts (grid points or head peaks), got grid {self.grid}")
        if self.max_results < 1 or self.batch < 1:
            raise InvalidInputError("proposals: max_results and batch must be >= 1")
        if not all(np.isfinite(self.weights())):
            raise InvalidInputError(f"proposals: ranking weights must be finite, got {self.weights()}")

    def weights(self) -> np.ndarray:
        """(4,) float64 ranking weights in the order of :data:`FEATURE_NAMES` (the cosine's is 1)."""
        return np.array([1.0, self.head_weight, self.cover_weight, self.colour_weight], np.float64)


@dataclass
class _Proposals:
    """Masks of one prompt set: full-resolution masks (N, H, W) bool, descriptors (N, D), colour histograms."""

    masks: np.ndarray
    desc: torch.Tensor
    pred_iou: np.ndarray  # (N,) MobileSAM's predicted IoU
    hist: np.ndarray  # (N, HIST_BINS) float32 colour histograms of the masked pixels


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
        self._colours: list[tuple[object, np.ndarray]] = []  # (template bank, its colour histogram), newest first

    max_cached_objects = 64

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
        return _Proposals(masks, self._describe(rgb, masks), io[keep].cpu().numpy()[nonempty],
                          mask_histograms(rgb, masks))

    def _empty(self, H: int, W: int) -> _Proposals:
        return _Proposals(np.zeros((0, H, W), bool), torch.zeros(0, 1), np.zeros(0, np.float32),
                          np.zeros((0, HIST_BINS), np.float32))

    def object_colour(self, obj: OnboardedObject) -> np.ndarray:
        """(HIST_BINS,) colour histogram of ``obj``'s templates (cached per bank, held with it)."""
        bank = obj.bank
        for b, h in self._colours:
            if b is bank:
                return h
        h = object_histogram(bank.rgb, bank.mask)
        self._colours = [(bank, h), *self._colours[: self.max_cached_objects - 1]]
        return h

    def _describe(self, rgb: np.ndarray, masks: np.ndarray) -> torch.Tensor:
        """(N, D) L2-normalised descriptors of the mask crops (framed like the stage-2 query)."""
        return self.matcher.describe_masks(rgb, masks, self.crop_size)

    # --- per object ------------------------------------------------------------------------------
    @torch.no_grad()
    def candidates(self, obs: Observation, obj: OnboardedObject) -> tuple[np.ndarray, np.ndarray, ProposalFeatures]:
        """Every proposal for ``obj`` in ``obs`` before ranking: (N, H, W) bool masks, the head's (H, W)
        probability map and the ranking features (grid proposals first, then the head-peak ones)."""
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
            z = np.zeros(0, np.float32)
            return masks, prob, ProposalFeatures(z, z, z, z)
        desc = torch.cat([d for d in (fr.grid.desc, peaks.desc) if len(d)])
        flat = masks.reshape(len(masks), -1).astype(np.float32)
        area = flat.sum(1)
        fg = (prob >= 0.5).ravel().astype(np.float32)
        hist = np.concatenate([fr.grid.hist, peaks.hist])
        feats = ProposalFeatures(
            cos=self.matcher.template_similarity(desc, obj),
            head=((flat @ prob.ravel()) / np.maximum(area, 1)).astype(np.float32),
            cover=((flat @ fg) / max(1.0, float(fg.sum()))).astype(np.float32),
            colour=np.sqrt(hist * self.object_colour(obj)[None]).sum(1).astype(np.float32),
        )
        return masks, prob, feats

    @torch.no_grad()
    def __call__(self, obs: Observation, obj: OnboardedObject) -> list[SegmentationResult]:
        """Masks of ``obj`` in ``obs`` best first (at most ``max_results``; empty = not found)."""
        c = self.cfg
        masks, prob, feats = self.candidates(obs, obj)
        if len(masks) == 0:
            return []
        score = (feats.matrix() @ c.weights()).astype(np.float32)
        if len(masks) > 1:  # a peak mask duplicating a grid mask: keep the better
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
                score=float(feats.head[i]),
                rank_score=float(score[i]),
                rank_margin=margin[i],
            )
            for i in keep
        ]
