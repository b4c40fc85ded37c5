"""Stage 3: dense 2D-3D correspondences (OSOP Sec. 3.4).

Input: the query crop (RGB + its stage-1 mask) and the matched template (RGB, mask and its
object-coordinate map, normalised by the object's bounding box centre and diameter), all
``crop_size`` squares, aligned by the shared crop rule. Output per pixel: a mask logit and, per
axis, logits over ``n_bins`` bins of the normalised model coordinate ``(xyz - centre) / diameter +
0.5`` in [0, 1]. Decoded coordinates use the expected value around the arg-max bin; the confidence
is mask probability x the product of per-axis peak probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from osop_ros.nets.backbone import DictConfig, ResNet, ResNetConfig, UNetDecoder, conv_block
from osop_ros.nets.segnet import normalize_rgb


@dataclass
class CorrNetConfig(DictConfig):
    """Architecture of :class:`CorrNet`."""

    backbone: ResNetConfig = field(
        default_factory=lambda: ResNetConfig(in_channels=11, widths=(48, 64, 96, 128), blocks=(1, 1, 1, 1))
    )
    dec_channels: tuple[int, ...] = (96, 64, 48)
    crop_size: int = 64
    n_bins: int = 32


class CorrNet(nn.Module):
    """Query crop + template crop -> (mask logit (B,1,S,S), coordinate logits (B,3,n_bins,S,S))."""

    arch = "corrnet"

    def __init__(self, cfg: CorrNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or CorrNetConfig()
        self.encoder = ResNet(self.cfg.backbone)
        self.decoder = UNetDecoder(self.encoder.out_channels, list(self.cfg.dec_channels))
        c = self.decoder.out_channels
        c_in = self.cfg.backbone.in_channels
        self.full = conv_block(c + c_in, 32)  # full-resolution refinement with the raw inputs
        self.head = nn.Conv2d(32, 1 + 3 * self.cfg.n_bins, 1)

    @staticmethod
    def make_input(
        q_rgb: torch.Tensor, q_mask: torch.Tensor, t_rgb: torch.Tensor, t_mask: torch.Tensor, t_xyz_n: torch.Tensor
    ) -> torch.Tensor:
        """Stack inputs: rgb (B,3,S,S) in [0,1], masks (B,1,S,S), t_xyz_n (B,3,S,S) normalised to [0,1]."""
        return torch.cat(
            [
                normalize_rgb(q_rgb),
                q_mask * 2 - 1,
                normalize_rgb(t_rgb * t_mask),
                t_mask * 2 - 1,
                (t_xyz_n - 0.5) * 4 * t_mask,
            ],
            dim=1,
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.encoder(x)
        y = self.decoder(feats)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        y = self.head(self.full(torch.cat([y, x], dim=1)))
        b, _, h, w = y.shape
        return y[:, :1], y[:, 1:].reshape(b, 3, self.cfg.n_bins, h, w)


def decode_coordinates(coord_logits: torch.Tensor, window: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Bins -> continuous normalised coordinates.

    coord_logits: (B, 3, n_bins, H, W) -> (coords (B, 3, H, W) in [0, 1], peak prob (B, 3, H, W)).
    The expected bin centre over a window of +-``window`` bins around the arg-max.
    """
    n = coord_logits.shape[2]
    p = coord_logits.softmax(dim=2)
    peak, idx = p.max(dim=2)  # (B, 3, H, W)
    bins = torch.arange(n, device=p.device, dtype=p.dtype).view(1, 1, n, 1, 1)
    near = (bins - idx.unsqueeze(2)).abs() <= window
    pw = p * near
    centre = (pw * (bins + 0.5)).sum(2) / pw.sum(2).clamp_min(1e-8)
    return centre / n, peak


def coordinate_targets(xyz_n: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Normalised coordinates (B, 3, H, W) in [0, 1] -> bin indices (B, 3, H, W) int64."""
    return (xyz_n * n_bins).long().clamp(0, n_bins - 1)
