"""Stage 2: template matching embedding (OSOP Sec. 3.3).

A crop encoder maps a masked object crop (RGB * mask, plus the mask) to an L2-normalised latent
(>= 128 dims). The spatial layout of the last feature map is kept (flattened, not pooled) so the
embedding is sensitive to viewpoint and in-plane rotation. Trained contrastively: the template
rendered at the query's viewpoint is the positive, other views of the same object are (hard)
negatives, with soft targets from the rotation angle (see ``osop_ros/train/match.py`` and its
model card for why this beat the autoencoder interpretation).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from osop_ros.nets.backbone import DictConfig, ResNet, ResNetConfig, norm
from osop_ros.nets.segnet import normalize_rgb


@dataclass
class MatchNetConfig(DictConfig):
    """Architecture of :class:`MatchNet`; inputs are ``crop_size`` squares with 4 channels."""

    backbone: ResNetConfig = field(default_factory=lambda: ResNetConfig(in_channels=4, widths=(32, 64, 96, 128)))
    crop_size: int = 64
    latent_dim: int = 128
    reduce_channels: int = 32
    objective: str = "contrastive"  # contrastive | autoencoder (adds a training-only decoder)


class MatchNet(nn.Module):
    """(N, 3, S, S) rgb in [0, 1] + (N, 1, S, S) mask -> (N, latent_dim) unit vectors."""

    arch = "matchnet"

    def __init__(self, cfg: MatchNetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or MatchNetConfig()
        self.encoder = ResNet(self.cfg.backbone)
        c = self.encoder.out_channels[-1]
        self.reduce = nn.Sequential(
            nn.Conv2d(c, self.cfg.reduce_channels, 1, bias=False), norm(self.cfg.reduce_channels)
        )
        with torch.no_grad():
            s = self.cfg.crop_size
            n = self.encoder(torch.zeros(1, self.cfg.backbone.in_channels, s, s))[-1].shape[-1]
        self.fc = nn.Linear(self.cfg.reduce_channels * n * n, self.cfg.latent_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.3))  # exp(2.3) ~ 10: learnable temperature
        self.decoder = AEDecoder(self.cfg.latent_dim, s) if self.cfg.objective == "autoencoder" else None

    def embed_raw(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Un-normalised latent (N, latent_dim) (the autoencoder's code)."""
        x = torch.cat([normalize_rgb(rgb * mask), mask * 2.0 - 1.0], dim=1)
        h = F.relu(self.reduce(self.encoder(x)[-1]))
        return self.fc(h.flatten(1))

    def forward(self, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed_raw(rgb, mask), dim=-1)


class AEDecoder(nn.Module):
    """Latent -> (N, 3, S, S) image in [0, 1] (augmented-autoencoder objective, training only)."""

    def __init__(self, latent_dim: int, size: int) -> None:
        super().__init__()
        self.n0 = size // 16
        self.fc = nn.Linear(latent_dim, 64 * self.n0 * self.n0)
        layers: list[nn.Module] = []
        c = 64
        for c_out in (64, 48, 32, 16):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c_out, 3, 1, 1), nn.ReLU(inplace=True)]
            c = c_out
        layers.append(nn.Conv2d(c, 3, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body(self.fc(z).view(-1, 64, self.n0, self.n0)))


def rotate_inplane(x: torch.Tensor, deg: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """Rotate square crops about their centre as if the camera rolled by ``deg`` about its optical axis.

    x: (B, C, S, S); deg: (B,) degrees. A crop of the view ``R_cam_obj`` becomes (approximately,
    exactly at the crop centre) the crop of the view ``Rz(deg) @ R_cam_obj``.
    """
    a = torch.deg2rad(deg.to(x.dtype))
    c, s = torch.cos(a), torch.sin(a)
    zero = torch.zeros_like(c)
    theta = torch.stack([torch.stack([c, s, zero], 1), torch.stack([-s, c, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest" if nearest else "bilinear", padding_mode="zeros", align_corners=False)
