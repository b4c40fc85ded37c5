"""Stage 1 and stage 2 networks on a frozen ImageNet-pretrained backbone (:mod:`osop_ros.nets.pretrained`).

Both are drop-in replacements of :class:`~osop_ros.nets.segnet.SegNet` / :class:`~osop_ros.nets.matchnet.MatchNet`
(same ``template_vectors`` / ``forward`` signatures), so onboarding, the stage classes and training use
them unchanged. The backbone's weights stay in their registry package: checkpoints hold only the
trained head (``frozen_prefixes`` are left out of the saved state dict and re-read from the package).

* :class:`FeatSegNet` (stage 1): linear 1x1 projections of the backbone's stride 4/8/16/32 maps; template
  vectors ``o1..o3`` = masked averages of the projected template maps (a linear projection commutes
  with averaging, so the bank may store raw backbone vectors and training can precompute them);
  Pearson attention after levels 1-3, U-Net decoder, optional colour prior. ``head="cosine"`` is the
  training-free baseline: max-over-templates cosine similarity of raw local features, no trained part.
  ``tune_levels = n`` trains a copy of the backbone blocks that feed the deepest n maps (image and
  templates both go through it; the checkpoint then holds that copy, the rest stays in the package).
* :class:`FeatMatchNet` (stage 2): the masked crop's stride-16 map, average-pooled to ``pool x pool``
  cells (layout kept), each cell L2-normalised, flattened -> unit vector. ``proj_dim > 0`` adds a
  learned 1x1 projection (trained contrastively like MatchNet); 0 = training-free descriptor.
* :class:`FeatCorrNet` (stage 3): query crop and matched template through the frozen backbone; per level,
  query cells attend over the template's cells and read their model coordinates; a U-Net decoder turns
  the fused maps into CorrNet's outputs (mask logit + per-axis coordinate bins).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from osop_ros.nets.backbone import DictConfig, UNetDecoder, conv_block
from osop_ros.nets.pretrained import PretrainedBackbone, PretrainedConfig, freeze_batchnorm
from osop_ros.nets.segnet import PearsonAttention, colour_prior, normalize_rgb


def masked_average(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(T, C, h, w) maps, (T, 1, S, S) masks -> (T, C) averages over the (area-downsampled) mask."""
    m = F.interpolate(mask, size=f.shape[-2:], mode="area")
    return (f * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1e-3)


@dataclass
class FeatSegNetConfig(DictConfig):
    """Architecture of :class:`FeatSegNet`."""

    backbone: str = "efficientnet_lite0"
    head: str = "learned"  # learned | cosine (training-free baseline)
    proj: tuple[int, ...] = (32, 48, 96, 128)  # projection widths of the stride 4/8/16/32 maps
    dec_channels: tuple[int, ...] = (96, 64, 32)
    n_attention: int = 3
    topk: int = 8
    colour_prior: bool = True
    template_size: int = 64  # template crops are resized to this before the backbone (64 = the bank crops)
    cosine_levels: tuple[int, ...] = (2, 3)  # cosine head: levels averaged (0-based: stride 16 and 32)
    cosine_tau: float = 0.25  # cosine head: similarity mapped to probability 0.5 (LM-O: GT median 0.22)
    cosine_scale: float = 20.0
    tune_levels: int = 0  # 0 = frozen backbone; n = a trained copy of the blocks of the deepest n maps
    tune_lr_scale: float = 0.2  # learning rate of the tuned blocks relative to the head's


class FeatSegNet(nn.Module):
    """Image + template vectors of one object -> mask logits, on frozen pretrained features."""

    arch = "featseg"
    frozen_prefixes = ("backbone.",)
    n_template_levels = 4  # template vectors of all four levels (the attention uses the first n_attention)

    def __init__(self, cfg: FeatSegNetConfig | None = None, backbone: PretrainedBackbone | None = None) -> None:
        super().__init__()
        self.cfg = cfg or FeatSegNetConfig()
        self.backbone = backbone or PretrainedBackbone(PretrainedConfig(self.cfg.backbone))
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        chans = self.backbone.out_channels
        if self.cfg.head == "learned":
            self.proj = nn.ModuleList(nn.Conv2d(c, p, 1) for c, p in zip(chans, self.cfg.proj, strict=True))
            self.attention = nn.ModuleList(
                PearsonAttention(self.cfg.proj[i], self.cfg.topk) for i in range(self.cfg.n_attention)
            )
            self.decoder = UNetDecoder(list(self.cfg.proj), list(self.cfg.dec_channels))
            c_extra = 2 if self.cfg.colour_prior else 0
            self.refine = conv_block(self.decoder.out_channels + c_extra, 32)
            self.head = nn.Conv2d(32, 1, 1)
        elif self.cfg.head != "cosine":
            raise ValueError(f"head must be learned|cosine, got {self.cfg.head!r}")
        self.tuned: nn.ModuleList | None = None
        if self.cfg.tune_levels:
            if self.cfg.head != "learned":
                raise ValueError("tune_levels needs the learned head")
            self.tune_start = self.backbone.tail_start(self.cfg.tune_levels)
            self.tuned = nn.ModuleList(copy.deepcopy(b) for b in self.backbone.tail_blocks(self.cfg.tune_levels))
            for p in self.tuned.parameters():
                p.requires_grad_(True)

    # a warm start from a head-only file leaves the tuned copy as the pretrained blocks
    warm_start_optional = ("tuned.",)

    def train(self, mode: bool = True) -> FeatSegNet:
        """BatchNorm of the backbone and of its tuned copy keeps the ImageNet statistics."""
        super().train(mode)
        freeze_batchnorm(self)
        return self

    def param_groups(self, lr: float) -> list[dict[str, object]]:
        """Optimiser groups: the head at ``lr``, the tuned blocks at ``lr * tune_lr_scale``."""
        tuned = {id(p) for p in self.tuned.parameters()} if self.tuned is not None else set()
        head = [p for p in self.parameters() if p.requires_grad and id(p) not in tuned]
        groups = [{"params": head, "lr": lr, "lr_scale": 1.0}]
        if tuned:
            s = self.cfg.tune_lr_scale
            groups.append({"params": list(self.tuned.parameters()), "lr": lr * s, "lr_scale": s})
        return groups

    def features(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """Backbone maps (strides 4, 8, 16, 32) of (B, 3, H, W) rgb in [0, 1]; gradients reach only the
        tuned blocks (if any)."""
        if self.tuned is None:
            with torch.no_grad():
                return self.backbone(rgb)
        with torch.no_grad():
            head, x = self.backbone.forward_head(rgb, self.tune_start)
        return head + self.backbone.forward_tail(x, self.tune_start, self.tuned)

    @torch.no_grad()
    def pre_tune_maps(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Frozen input maps (T, C, h, w) of the tuned blocks for masked template crops (T, 3, S, S), (T, 1, S, S)
        (training caches them once)."""
        x, _ = self._template_input(rgb, mask)
        return self.backbone.forward_head(x, self.tune_start)[1]

    def tuned_template_vectors(self, pre: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Raw vectors [(T, C_l)] of the tuned levels from :meth:`pre_tune_maps` (with gradients)."""
        assert self.tuned is not None
        maps = self.backbone.forward_tail(pre, self.tune_start, self.tuned)
        return [masked_average(f, self._template_size(mask)) for f in maps]

    def _template_size(self, t: torch.Tensor) -> torch.Tensor:
        """(T, C, S, S) crops resized to ``template_size`` (bilinear; unchanged when already that size)."""
        s = self.cfg.template_size
        return t if t.shape[-1] == s else F.interpolate(t, size=(s, s), mode="bilinear", align_corners=False)

    def _template_input(self, rgb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked template crops and their masks at ``template_size``."""
        return self._template_size(rgb * mask), self._template_size(mask)

    @torch.no_grad()
    def raw_template_vectors(self, rgb: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
        """Backbone vectors [(T, C_l)] of masked template crops (T, 3, S, S), (T, 1, S, S), levels 0..3."""
        x, m = self._template_input(rgb, mask)
        return [masked_average(f, m) for f in self.features(x)]

    def project_vectors(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        """Raw backbone vectors -> the vectors the attention correlates with ([(..., C_l)])."""
        if self.cfg.head == "cosine":
            return raw
        return [F.linear(v, p.weight[:, :, 0, 0], p.bias) for v, p in zip(raw, self.proj, strict=False)]

    def template_vectors(
        self, rgb: torch.Tensor, mask: torch.Tensor, hist: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per-template vectors (SegNet interface): rgb (T, 3, S, S), mask (T, 1, S, S) -> [(T, C_l)]."""
        return self.project_vectors(self.raw_template_vectors(rgb, mask))

    def forward(self, rgb: torch.Tensor, tvecs: list[torch.Tensor], hist: torch.Tensor | None = None) -> torch.Tensor:
        """rgb: (B, 3, H, W) in [0, 1]; tvecs[l]: (B, K, C_l); hist: (B, N_BINS) -> logits (B, 1, H, W)."""
        feats = self.features(rgb)
        if self.cfg.head == "cosine":
            return self._cosine(rgb, feats, tvecs)
        h = [p(f) for p, f in zip(self.proj, feats, strict=True)]
        for i in range(self.cfg.n_attention):
            h[i] = self.attention[i](h[i], tvecs[i])
        y = self.decoder(h)
        if self.cfg.colour_prior:
            if hist is None:
                raise ValueError("this FeatSegNet uses a colour prior: pass the object's colour histogram")
            prior = F.interpolate(colour_prior(rgb, hist), size=y.shape[-2:], mode="area")
            y = torch.cat([y, prior], dim=1)
        y = self.head(self.refine(y))
        return F.interpolate(y, size=rgb.shape[-2:], mode="bilinear", align_corners=False)

    def _cosine(self, rgb: torch.Tensor, feats: list[torch.Tensor], tvecs: list[torch.Tensor]) -> torch.Tensor:
        size = feats[self.cfg.cosine_levels[0]].shape[-2:]
        sims = []
        for lvl in self.cfg.cosine_levels:
            f = F.normalize(feats[lvl], dim=1)
            o = F.normalize(tvecs[lvl], dim=-1)
            s = torch.einsum("bchw,bkc->bkhw", f, o).max(dim=1, keepdim=True).values
            sims.append(F.interpolate(s, size=size, mode="bilinear", align_corners=False))
        sim = torch.stack(sims).mean(0)
        y = (sim - self.cfg.cosine_tau) * self.cfg.cosine_scale
        return F.interpolate(y, size=rgb.shape[-2:], mode="bilinear", align_corners=False)


@dataclass
class FeatMatchNetConfig(DictConfig):
    """Architecture of :class:`FeatMatchNet`."""

    backbone: str = "efficientnet_lite0"
    level: int = 2  # 0-based backbone level: 2 = stride 16
    input_size: int = 64  # crops are resized to this before the backbone
    pool: int = 4  # cells per side of the descriptor (spatial layout kept)
    proj_dim: int = 0  # 0 = training-free; > 0 = learned 1x1 projection to this many channels
    crop_size: int = 64  # MatchNet interface (templates' crop size)


class FeatMatchNet(nn.Module):
    """(N, 3, S, S) rgb in [0, 1] + (N, 1, S, S) mask -> (N, D) unit descriptors, D = pool^2 x channels."""

    arch = "featmatch"
    frozen_prefixes = ("backbone.",)

    def __init__(self, cfg: FeatMatchNetConfig | None = None, backbone: PretrainedBackbone | None = None) -> None:
        super().__init__()
        self.cfg = cfg or FeatMatchNetConfig()
        self.backbone = backbone or PretrainedBackbone(PretrainedConfig(self.cfg.backbone, levels=self.cfg.level + 1))
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        c = self.backbone.out_channels[self.cfg.level]
        self.proj = nn.Conv2d(c, self.cfg.proj_dim, 1) if self.cfg.proj_dim > 0 else None
        self.logit_scale = nn.Parameter(torch.tensor(2.3), requires_grad=self.proj is not None)

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        s = self.cfg.input_size
        x = rgb * mask
        if x.shape[-1] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
            mask = F.interpolate(mask, size=(s, s), mode="bilinear", align_corners=False)
        with torch.no_grad():
            f = self.backbone(x)[self.cfg.level]
        if self.proj is not None:
            f = self.proj(f)
        f = f * F.interpolate(mask, size=f.shape[-2:], mode="area")
        f = F.adaptive_avg_pool2d(f, self.cfg.pool)
        f = F.normalize(f, dim=1)
        return F.normalize(f.flatten(1), dim=-1)


@dataclass
class FeatCorrNetConfig(DictConfig):
    """Architecture of :class:`FeatCorrNet`."""

    backbone: str = "efficientnet_lite0"
    levels: int = 3  # backbone maps used: strides 4, 8, 16 of the resized crop
    input_size: int = 96  # query and template crops are resized to this before the backbone
    proj: tuple[int, ...] = (32, 48, 64)  # shared query/template projection widths per level
    fuse: tuple[int, ...] = (48, 64, 96)  # channels of the fused map per level
    dec_channels: tuple[int, ...] = (64, 48)
    crop_size: int = 64
    n_bins: int = 32


class FeatCorrNet(nn.Module):
    """Stage 3 on frozen pretrained features (drop-in for :class:`~osop_ros.nets.corrnet.CorrNet`).

    Query crop and matched template go through the frozen backbone; per level, a shared 1x1 projection,
    then every query cell attends over the template's object cells (cosine x learned temperature) and
    reads their features and normalised model coordinates. The fused maps (query features, attended
    template features and coordinates, the aligned template coordinates, both masks) feed a U-Net
    decoder; a full-resolution refinement sees the raw inputs. Output as CorrNet: mask logit
    (B, 1, S, S) and coordinate bin logits (B, 3, n_bins, S, S).
    """

    arch = "featcorr"
    frozen_prefixes = ("backbone.",)

    def __init__(self, cfg: FeatCorrNetConfig | None = None, backbone: PretrainedBackbone | None = None) -> None:
        super().__init__()
        self.cfg = cfg or FeatCorrNetConfig()
        n = self.cfg.levels
        if not (len(self.cfg.proj) == len(self.cfg.fuse) == n and len(self.cfg.dec_channels) == n - 1):
            raise ValueError("proj and fuse need one entry per level, dec_channels one fewer")
        self.backbone = backbone or PretrainedBackbone(PretrainedConfig(self.cfg.backbone, levels=n))
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        chans = self.backbone.out_channels[:n]
        self.proj = nn.ModuleList(nn.Conv2d(c, p, 1) for c, p in zip(chans, self.cfg.proj, strict=True))
        self.log_temp = nn.Parameter(torch.full((n,), 2.3))  # cosine temperature exp(2.3) ~ 10 per level
        # fused: query feats, attended template feats, attended xyz (3), max cosine (1), aligned xyz (3), masks (2)
        self.fuse = nn.ModuleList(
            conv_block(2 * p + 9, f) for p, f in zip(self.cfg.proj, self.cfg.fuse, strict=True)
        )
        self.decoder = UNetDecoder(list(self.cfg.fuse), list(self.cfg.dec_channels))
        self.full = conv_block(self.decoder.out_channels + 11, 32)
        self.head = nn.Conv2d(32, 1 + 3 * self.cfg.n_bins, 1)

    def train(self, mode: bool = True) -> FeatCorrNet:
        """The backbone's BatchNorm keeps the ImageNet statistics."""
        super().train(mode)
        freeze_batchnorm(self.backbone)
        return self

    @staticmethod
    def make_input(
        q_rgb: torch.Tensor, q_mask: torch.Tensor, t_rgb: torch.Tensor, t_mask: torch.Tensor, t_xyz_n: torch.Tensor
    ) -> torch.Tensor:
        """Stack (B, 11, S, S): query rgb, query mask, masked template rgb, template mask, template xyz in [0, 1]."""
        return torch.cat([q_rgb, q_mask, t_rgb * t_mask, t_mask, t_xyz_n * t_mask], dim=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x from :meth:`make_input` -> (mask logit (B, 1, S, S), coordinate logits (B, 3, n_bins, S, S))."""
        b, _, h, w = x.shape
        q_rgb, q_mask, t_rgb, t_mask, t_xyz = x[:, 0:3], x[:, 3:4], x[:, 4:7], x[:, 7:8], x[:, 8:11]
        s = self.cfg.input_size
        # at inference one query crop meets k templates: its backbone pass is run once
        one_query = b > 1 and torch.equal(q_rgb, q_rgb[:1].expand_as(q_rgb))
        crops = torch.cat([q_rgb[:1] if one_query else q_rgb, t_rgb])
        crops = F.interpolate(crops, size=(s, s), mode="bilinear", align_corners=False)
        with torch.no_grad():
            maps = self.backbone(crops)
        if one_query:
            maps = [torch.cat([f[:1].expand(b, -1, -1, -1), f[1:]]) for f in maps]
        fused = []
        for lvl, (f, proj, fuse) in enumerate(zip(maps, self.proj, self.fuse, strict=True)):
            f = proj(f)
            fq, ft = f[:b], f[b:]
            size = fq.shape[-2:]
            tm = F.interpolate(t_mask, size=size, mode="area")
            t_on = tm > 0.05  # cells on the template's object
            qm = F.interpolate(q_mask, size=size, mode="area")
            txyz = F.interpolate(t_xyz, size=size, mode="area") / tm.clamp_min(1e-3)
            qn = F.normalize(fq, dim=1).flatten(2)  # (B, C, Nq)
            tn = F.normalize(ft, dim=1).flatten(2)  # (B, C, Nt)
            sim = torch.einsum("bcq,bct->bqt", qn, tn)  # (B, Nq, Nt) cosine
            bias = torch.log(tm.flatten(2).clamp_min(1e-4))  # (B, 1, Nt): template background is ignored
            attn = (sim * self.log_temp[lvl].exp() + bias).softmax(dim=-1)
            a_feat = torch.einsum("bqt,bct->bcq", attn, ft.flatten(2)).reshape_as(fq)
            a_xyz = torch.einsum("bqt,bct->bcq", attn, txyz.flatten(2)).reshape(b, 3, *size)
            best = (sim - 2.0 * ~t_on.flatten(2)).max(dim=-1).values.reshape(b, 1, *size)
            fused.append(fuse(torch.cat([fq, a_feat, a_xyz, best, txyz * t_on, qm, tm], dim=1)))
        y = self.decoder(fused)
        y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        raw = [normalize_rgb(q_rgb), q_mask * 2 - 1, normalize_rgb(t_rgb), t_mask * 2 - 1, (t_xyz - 0.5) * 4 * t_mask]
        y = torch.cat([y, *raw], dim=1)  # the CorrNet input, at full resolution
        y = self.head(self.full(y))
        return y[:, :1], y[:, 1:].reshape(b, 3, self.cfg.n_bins, h, w)
