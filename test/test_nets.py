"""Tiny randomly initialised networks: shapes, maths of the building blocks, checkpoint I/O."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from osop_ros.nets.backbone import ResNet, ResNetConfig
from osop_ros.nets.checkpoint import CheckpointError, from_checkpoint, save_checkpoint
from osop_ros.nets.corrnet import CorrNet, CorrNetConfig, coordinate_targets, decode_coordinates
from osop_ros.nets.matchnet import MatchNet, MatchNetConfig, rotate_inplane
from osop_ros.nets.segnet import SegNet, SegNetConfig, colour_histogram, colour_prior, dice_loss, pearson_correlation

TINY = ResNetConfig(widths=(8, 16, 16, 16), blocks=(1, 1, 1, 1))


def tiny_seg() -> SegNet:
    return SegNet(SegNetConfig(backbone=TINY, dec_channels=(16, 8, 8)))


def tiny_match() -> MatchNet:
    return MatchNet(
        MatchNetConfig(backbone=ResNetConfig(in_channels=4, widths=(8, 8, 16, 16)), crop_size=32, latent_dim=128)
    )


def tiny_corr() -> CorrNet:
    return CorrNet(
        CorrNetConfig(
            backbone=ResNetConfig(in_channels=11, widths=(8, 8, 16, 16)),
            dec_channels=(16, 8, 8),
            crop_size=32,
            n_bins=16,
        )
    )


def test_resnet_strides_and_resnet50_config() -> None:
    feats = ResNet(TINY)(torch.zeros(1, 3, 64, 96))
    assert [f.shape[-2:] for f in feats] == [(32, 48), (16, 24), (8, 12), (4, 6)]
    r50 = ResNet(ResNetConfig.resnet50())
    assert r50.out_channels == [256, 512, 1024, 2048]


def test_pearson_correlation_matches_numpy() -> None:
    g = torch.Generator().manual_seed(0)
    f = torch.randn(1, 5, 2, 3, generator=g)
    o = torch.randn(1, 4, 5, generator=g)
    corr = pearson_correlation(f, o).numpy()
    for k in range(4):
        for y in range(2):
            for x in range(3):
                ref = np.corrcoef(f[0, :, y, x].numpy(), o[0, k].numpy())[0, 1]
                assert corr[0, k, y, x] == pytest.approx(ref, abs=1e-4)


def test_segnet_shapes_and_dice() -> None:
    net = tiny_seg()
    rgb, mask = torch.rand(6, 3, 32, 32), torch.ones(6, 1, 32, 32)
    hist = colour_histogram(rgb, mask)
    tv = net.template_vectors(rgb, mask, hist)
    assert [v.shape for v in tv] == [(6, 8), (6, 16), (6, 16)]
    out = net(torch.rand(2, 3, 48, 64), [v.view(2, 3, -1) for v in tv], hist.view(2, 3, -1).mean(1))
    assert out.shape == (2, 1, 48, 64)
    with pytest.raises(ValueError, match="colour histogram"):
        net(torch.rand(1, 3, 48, 64), [v[:3].unsqueeze(0) for v in tv])


def test_colour_prior_highlights_template_colours() -> None:
    img = torch.zeros(1, 3, 20, 20)
    img[0, :, :, :] = torch.tensor([0.2, 0.2, 0.8]).view(3, 1, 1)  # blue background
    img[0, :, 5:10, 5:10] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)  # red object
    tmpl = torch.zeros(1, 3, 8, 8)
    tmpl[0] = torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1)
    hist = colour_histogram(tmpl, torch.ones(1, 1, 8, 8))
    assert hist.sum().item() == pytest.approx(1.0)
    prior = colour_prior(img, hist)
    assert prior.shape == (1, 2, 20, 20)
    assert prior[0, 1, 7, 7] > 0.5 and prior[0, 1, 0, 0] < -0.5
    assert prior[0, 0, 7, 7] > prior[0, 0, 0, 0]
    t = torch.zeros(1, 1, 4, 4)
    t[..., :2, :2] = 1
    assert dice_loss(torch.where(t > 0, 50.0, -50.0), t).item() == pytest.approx(0.0, abs=1e-4)
    assert dice_loss(torch.where(t > 0, -50.0, 50.0), t).item() > 0.9


def test_matchnet_unit_embeddings() -> None:
    e = tiny_match()(torch.rand(3, 3, 32, 32), torch.ones(3, 1, 32, 32))
    assert e.shape == (3, 128)
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)


def test_rotate_inplane_moves_pixels_like_a_camera_roll() -> None:
    """A camera roll Rz(+d) maps a point at (x, y) rel. to the centre to (x cos d - y sin d, x sin d + y cos d)."""
    S = 33
    img = torch.zeros(1, 1, S, S)
    img[0, 0, 16, 26] = 1.0  # 10 px right of the centre (16, 16)
    out = rotate_inplane(img, torch.tensor([90.0]), nearest=True)
    v, u = np.unravel_index(out[0, 0].numpy().argmax(), (S, S))
    assert (u, v) == (16, 26)  # rolled by +90 deg: +x goes to +y (down in the image)


def test_corrnet_shapes_and_decoding() -> None:
    net = tiny_corr()
    x = CorrNet.make_input(
        torch.rand(2, 3, 32, 32),
        torch.ones(2, 1, 32, 32),
        torch.rand(2, 3, 32, 32),
        torch.ones(2, 1, 32, 32),
        torch.rand(2, 3, 32, 32),
    )
    m, c = net(x)
    assert m.shape == (2, 1, 32, 32) and c.shape == (2, 3, 16, 32, 32)
    target = torch.rand(1, 3, 4, 4)
    bins = coordinate_targets(target, 16)
    logits = torch.full((1, 3, 16, 4, 4), -30.0)
    logits.scatter_(2, bins.unsqueeze(2), 30.0)
    dec, peak = decode_coordinates(logits)
    assert torch.allclose(dec, (bins.float() + 0.5) / 16, atol=1e-5)
    assert torch.all(peak > 0.99)
    assert (dec - target).abs().max() <= 0.5 / 16 + 1e-6


def test_checkpoint_round_trip_fp16(tmp_path) -> None:
    net = tiny_corr().eval()
    path = tmp_path / "c.pt"
    save_checkpoint(path, net, meta={"note": "test"}, half=True)
    loaded = from_checkpoint(path, "cpu", arch="corrnet")
    assert loaded.meta["note"] == "test"
    x = torch.rand(1, 11, 32, 32)
    with torch.no_grad():
        a, b = net(x)[0], loaded(x)[0]
    assert torch.allclose(a, b, atol=2e-2)


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        from_checkpoint(tmp_path / "missing.pt", "cpu")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        from_checkpoint(bad, "cpu")
    p = tmp_path / "m.pt"
    save_checkpoint(p, tiny_match())
    with pytest.raises(CheckpointError, match="expected one of segnet"):
        from_checkpoint(p, "cpu", arch="segnet")
    torch.save({"arch": "matchnet", "config": tiny_match().cfg.to_dict(), "state_dict": {}}, p)
    with pytest.raises(CheckpointError, match="do not fit"):
        from_checkpoint(p, "cpu")


def test_load_trained_state_allows_only_frozen_prefixes_to_be_missing() -> None:
    """Head-only checkpoints (frozen pretrained backbone) warm-start training; other gaps are errors."""
    from torch import nn

    from osop_ros.nets.checkpoint import load_trained_state
    from osop_ros.nets.errors import CheckpointError

    class Net(nn.Module):
        frozen_prefixes = ("backbone.",)

        def __init__(self) -> None:
            super().__init__()
            self.backbone = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

    src, dst = Net(), Net()
    head_only = {k: v.half() for k, v in src.state_dict().items() if k.startswith("head.")}
    load_trained_state(dst, head_only, "head.pt")
    assert torch.equal(dst.head.weight, src.head.weight.half().float())
    with pytest.raises(CheckpointError, match="missing"):
        load_trained_state(dst, {"head.weight": src.head.weight}, "broken.pt")
    with pytest.raises(CheckpointError, match="unexpected"):
        load_trained_state(dst, {**head_only, "extra.weight": torch.zeros(1)}, "extra.pt")
