"""The proposal ranking: colour histograms, the conditional-logit fit, and collecting queries from a BOP dataset."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

from osop_ros.core.geometry import make_T
from osop_ros.core.proposals import HIST_BINS, ProposalFeatures, colour_histogram, object_histogram
from osop_ros.core.types import InvalidInputError, Observation
from osop_ros.data.bop import BopDataset, bop_gt_entry
from osop_ros.train.proposal_rank import RankQuery, collect, fit_ranking, report, top1


def _bc(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(a * b).sum())


def _pixels(rgb: tuple[int, int, int], n: int = 200) -> np.ndarray:
    return np.tile(np.array(rgb, np.uint8), (n, 1))


def test_colour_histogram_keeps_hue_across_brightness_and_separates_hues() -> None:
    red, dark_red, blue = colour_histogram(_pixels((220, 40, 40))), colour_histogram(_pixels((120, 20, 20))), \
        colour_histogram(_pixels((40, 70, 210)))
    assert red.shape == (HIST_BINS,) and red.sum() == pytest.approx(1.0)
    assert _bc(red, dark_red) > 0.9  # a shaded template and a lit photo share bins
    assert _bc(red, blue) < 0.05
    white, black = colour_histogram(_pixels((240, 240, 240))), colour_histogram(_pixels((10, 10, 10)))
    assert _bc(white, black) < 0.05 and _bc(white, red) < 0.05  # greys are binned by value
    assert np.allclose(colour_histogram(np.zeros((0, 3), np.uint8)), 1.0 / HIST_BINS)
    tmpl = np.zeros((2, 8, 8, 3), np.uint8)
    mask = np.zeros((2, 8, 8), bool)
    tmpl[:, 2:6, 2:6], mask[:, 2:6, 2:6] = (220, 40, 40), True  # background pixels (black) are not counted
    assert _bc(object_histogram(tmpl, mask), red) > 0.99


def _queries(rng: np.random.Generator, n: int) -> list[RankQuery]:
    """Queries where the descriptor cosine is a weak cue and colour a strong one (columns cos, head, cover, colour)."""
    out = []
    for _ in range(n):
        k = 6
        f = np.column_stack([rng.uniform(0.5, 0.7, k), rng.uniform(0, 0.3, k), rng.uniform(0, 1, k),
                             rng.uniform(0.0, 0.5, k)])
        t = int(rng.integers(k))
        f[t, 0] += 0.05
        f[t, 3] += 0.4
        iou = np.full(k, 0.05, np.float32)
        iou[t] = 0.9
        out.append(RankQuery(f, iou))
    return out


def test_fit_learns_the_cue_that_identifies_the_object() -> None:
    rng = np.random.default_rng(0)
    train, test = _queries(rng, 150), _queries(rng, 150)
    w = fit_ranking(train)
    assert w[0] == pytest.approx(1.0)  # relative to the cosine's weight
    assert w[3] > 1.0 and abs(w[1]) < 0.5 * w[3] and abs(w[2]) < 0.5 * w[3]  # the noise features stay small
    cos_only = top1(test, np.array([1.0, 0, 0, 0]))
    fitted = top1(test, w)
    assert fitted["mean_iou"] > cos_only["mean_iou"] + 0.2
    assert fitted["share_iou_0.5"] > 0.9 and fitted["oracle_mean_iou"] == pytest.approx(0.9)
    r = report(test, w, np.array([1.0, 0.2, 0, 0]))
    assert set(r["weights"]) == {"cos", "head", "cover", "colour"}
    assert r["top1_fitted"]["mean_iou"] > r["top1_current"]["mean_iou"]
    with pytest.raises(InvalidInputError, match="IoU"):
        fit_ranking([RankQuery(np.zeros((3, 4)), np.full(3, 0.1, np.float32))])


def _write(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    """One image, objects 1 (visible, with mask_visib) and 2 (visib 0.05: skipped), 80 x 60 px."""
    root = tmp_path / "ds"
    _write(root / "camera.json", {"cx": 40.0, "cy": 30.0, "fx": 100.0, "fy": 100.0, "width": 80, "height": 60})
    _write(root / "models" / "models_info.json", {"1": {"diameter": 50.0}, "2": {"diameter": 50.0}})
    sd = root / "test" / "000000"
    T = make_T(np.eye(3), [0.0, 0.0, 0.5])
    _write(sd / "scene_gt.json", {"0": [bop_gt_entry(1, T), bop_gt_entry(2, T)]})
    _write(sd / "scene_gt_info.json", {"0": [{"visib_fract": 0.9}, {"visib_fract": 0.05}]})
    _write(sd / "scene_camera.json", {"0": {"cam_K": [100.0, 0, 40, 0, 100, 30, 0, 0, 1], "depth_scale": 1.0}})
    (sd / "rgb").mkdir()
    cv2.imwrite(str(sd / "rgb" / "000000.png"), np.full((60, 80, 3), 128, np.uint8))
    (sd / "mask_visib").mkdir()
    m = np.zeros((60, 80), np.uint8)
    m[10:30, 10:30] = 255
    cv2.imwrite(str(sd / "mask_visib" / "000000_000000.png"), m)
    cv2.imwrite(str(sd / "mask_visib" / "000000_000001.png"), m)
    _write(root / "test_targets_bop19.json", [{"scene_id": 0, "im_id": 0, "obj_id": 1, "inst_count": 1},
                                               {"scene_id": 0, "im_id": 0, "obj_id": 2, "inst_count": 1}])
    return root


class FakeCandidates:
    """Three proposals: the object's visible square, its left half, and a square elsewhere."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def candidates(self, obs: Observation, obj: object) -> tuple[np.ndarray, np.ndarray, ProposalFeatures]:
        self.calls.append(obj)
        masks = np.zeros((3, 60, 80), bool)
        masks[0, 10:30, 10:30] = True
        masks[1, 10:30, 10:20] = True
        masks[2, 35:55, 50:70] = True
        f = np.array([0.6, 0.7, 0.8], np.float32)
        return masks, np.zeros((60, 80), np.float32), ProposalFeatures(f, f * 0, f * 0, np.array([0.9, 0.9, 0.1]))


def test_collect_scores_every_candidate_against_the_visible_mask(scenes: Path) -> None:
    ds = BopDataset(scenes)
    seg = FakeCandidates()
    objects = {1: SimpleNamespace(name="one"), 2: SimpleNamespace(name="two")}
    q = collect(ds, objects, seg)
    assert len(q) == 1 and seg.calls == [objects[1]]  # object 2 is too occluded to teach anything
    assert q[0].obj_id == 1 and q[0].image == (0, 0) and q[0].features.shape == (3, 4)
    assert np.allclose(q[0].iou, [1.0, 0.5, 0.0], atol=1e-6)
    assert np.allclose(q[0].features[:, 3], [0.9, 0.9, 0.1])
    (scenes / "test" / "000000" / "mask_visib" / "000000_000000.png").unlink()
    with pytest.raises(InvalidInputError, match="mask_visib"):
        collect(BopDataset(scenes), objects, FakeCandidates())
