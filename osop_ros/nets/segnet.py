"""Stage 1: one-shot segmentation network (OSOP Sec. 3.2).

A U-Net whose encoder is modulated, after each of its first three stages, by a pixel-wise
attention block that correlates (Pearson) every image feature vector with the per-template
vectors ``o1, o2, o3`` of the queried object. Template vectors come from the same encoder applied
to the rendered template crops, averaged spatially over the template mask, so a 2880-view
dictionary costs only ``2880 x (c1 + c2 + c3)`` numbers (fp16 on disk).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from osop_ros.nets.backbone import DictConfig, ResNet, ResNetConfig, UNetDecoder, norm


@dataclass
class SegNetConfig(DictConfig):
    """Architecture of :class:`SegNet`."""

    backbone: ResNetConfig = field(default_factory=lambda: ResNetConfig(stem_stride=4))
    dec_channels: tuple[int, ...] = (96, 64, 32)
    n_attention: int = 3  # attention after encoder stages 0..n-1
    topk: int = 8
    colour_prior: bool = True  # 2 extra input channels: colour-histogram back-projection of the templates


def pearson_correlation(f: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of pixel features with template vectors.

    f: (B, C, H, W) image features; o: (B, K, C) template vectors -> (B, K, H, W) in [-1, 1].
    """
    fc = f - f.mean(dim=1, keepdim=True)
    fc = fc / (fc.norm(dim=1, keepdim=True) + 1e-6)
    oc = o - o.mean(dim=-1, keepdim=True)
    oc = oc / (oc.norm(dim=-1, keepdim=True) + 1e-6)
    return torch.einsum("bchw,bkc->bkhw", fc, oc)


class PearsonAttention(nn.Module):
    """Injects template correlation statistics (max, top-k mean, mean over templates) into features."""

    def __init__(self, c: int, topk: int) -> None:
        super().__init__()
        self.topk = topk
        self.att = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU(inplace=True), nn.Conv2d(16, 1, 3, 1, 1))
        self.fuse = nn.Sequential(nn.Conv2d(c + 3, c, 1, bias=False), norm(c))

    def forward(self, f: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        corr = pearson_correlation(f, o)  # (B, K, H, W)
        k = min(self.topk, corr.shape[1])
        stats = torch.stack(
            [corr.max(dim=1).values, corr.topk(k, dim=1).values.mean(dim=1), corr.mean(dim=1)], dim=1
        )  # (B, 3, H, W)
        a = torch.sigmoid(self.att(stats))
        return F.relu(f + self.fuse(torch.cat([f * a, stats], dim=1)))


class SegNet(nn.Module):
    """One-shot segmentation: image + template vectors of one object -> mask logits."""

    arch = "segnet"

    def __init__(self, cfg: SegNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or SegNetConfig()
        if self.cfg.colour_prior and self.cfg.backbone.in_channels == 3:
            self.cfg.backbone = ResNetConfig.from_dict({**self.cfg.backbone.to_dict(), "in_channels": 5})
        self.encoder = ResNet(self.cfg.backbone)
        chans = self.encoder.out_channels
        self.attention = nn.ModuleList(PearsonAttention(chans[i], self.cfg.topk) for i in range(self.cfg.n_attention))
        self.decoder = UNetDecoder(chans, list(self.cfg.dec_channels))
        self.head = nn.Conv2d(self.decoder.out_channels, 1, 1)

    def _input(self, rgb: torch.Tensor, hist: torch.Tensor | None) -> torch.Tensor:
        x = normalize_rgb(rgb)
        if not self.cfg.colour_prior:
            return x
        if hist is None:
            raise ValueError("this SegNet uses a colour prior: pass the object's colour histogram")
        return torch.cat([x, colour_prior(rgb, hist)], dim=1)

    def template_vectors(
        self, rgb: torch.Tensor, mask: torch.Tensor, hist: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Per-template vectors ``o1..on``.

        rgb: (T, 3, S, S) float in [0, 1] (normalised inside); mask: (T, 1, S, S) float {0, 1};
        hist: (T, N_BINS) colour histogram of each template's object (see :func:`colour_histogram`).
        Returns n tensors (T, C_l): features averaged over the (downsampled) template mask.
        """
        x = self._input(rgb * mask, hist) * mask
        feats = []
        h = self.encoder.stem(x)
        for stage in self.encoder.stages[: self.cfg.n_attention]:
            h = stage(h)
            m = F.interpolate(mask, size=h.shape[-2:], mode="area")
            feats.append((h * m).sum(dim=(2, 3)) / m.sum(dim=(2, 3)).clamp_min(1e-3))
        return feats

    def forward(self, rgb: torch.Tensor, tvecs: list[torch.Tensor], hist: torch.Tensor | None = None) -> torch.Tensor:
        """rgb: (B, 3, H, W) in [0, 1]; tvecs[l]: (B, K, C_l); hist: (B, N_BINS) -> logits (B, 1, H, W)."""
        h = self.encoder.stem(self._input(rgb, hist))
        feats = []
        for i, stage in enumerate(self.encoder.stages):
            h = stage(h)
            if i < self.cfg.n_attention:
                h = self.attention[i](h, tvecs[i])
            feats.append(h)
        y = self.head(self.decoder(feats))
        return F.interpolate(y, size=rgb.shape[-2:], mode="bilinear", align_corners=False)


HIST_SHAPE = (8, 8, 4)  # chromaticity r, chromaticity g, intensity
N_BINS = HIST_SHAPE[0] * HIST_SHAPE[1] * HIST_SHAPE[2]


def colour_bins(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, H, W) int64 bin of (r/(r+g+b), g/(r+g+b), intensity)."""
    s = rgb.sum(1).clamp_min(1e-3)
    r = (rgb[:, 0] / s * HIST_SHAPE[0]).long().clamp(0, HIST_SHAPE[0] - 1)
    g = (rgb[:, 1] / s * HIST_SHAPE[1]).long().clamp(0, HIST_SHAPE[1] - 1)
    i = (s / 3 * HIST_SHAPE[2]).long().clamp(0, HIST_SHAPE[2] - 1)
    return (r * HIST_SHAPE[1] + g) * HIST_SHAPE[2] + i


def colour_histogram(rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised colour histograms of masked pixels: (T, 3, S, S), (T, 1, S, S) -> (T, N_BINS)."""
    bins = colour_bins(rgb).flatten(1)
    w = mask.flatten(1).to(rgb.dtype)
    h = torch.zeros(rgb.shape[0], N_BINS, dtype=rgb.dtype, device=rgb.device).scatter_add_(1, bins, w)
    return h / h.sum(1, keepdim=True).clamp_min(1.0)


def colour_prior(rgb: torch.Tensor, hist: torch.Tensor) -> torch.Tensor:
    """Back-projection of an object's colour histogram (Swain-Ballard ratio histogram).

    rgb: (B, 3, H, W) in [0, 1]; hist: (B, N_BINS) -> (B, 2, H, W): the object's colour likelihood
    (sqrt-scaled) and the log ratio of object to image colour frequency (clamped, scaled to [-1, 1]).
    """
    bins = colour_bins(rgb)
    b = bins.flatten(1)
    img = torch.zeros_like(hist).scatter_add_(1, b, torch.ones_like(b, dtype=hist.dtype))
    img = img / img.sum(1, keepdim=True).clamp_min(1.0)
    p_obj = torch.gather(hist, 1, b).view_as(bins)
    p_img = torch.gather(img, 1, b).view_as(bins)
    ratio = torch.log((p_obj + 1e-4) / (p_img + 1e-4)).clamp(-4, 4) / 4
    return torch.stack([p_obj.clamp_min(0).sqrt() * 2 - 1, ratio], dim=1)


def normalize_rgb(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> roughly zero-mean unit-variance."""
    return (x - 0.45) / 0.25


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Soft Dice loss per sample, averaged. logits/target: (B, 1, H, W)."""
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return (1.0 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()
