"""In-memory training data (shards from :mod:`osop_ros.train.prepare`) and batched torch augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from osop_ros.core.types import InvalidInputError
from osop_ros.nets.tensors import mask_tensor as to_tensor_mask
from osop_ros.nets.tensors import rgb_tensor as to_tensor_rgb

__all__ = ["to_tensor_mask", "to_tensor_rgb"]  # re-exported for the training tasks


def load_shards(directory: Path, prefix: str) -> dict[str, np.ndarray]:
    """Concatenate every ``<prefix>-NNNN.npz`` in ``directory`` (no pickle)."""
    files = sorted(directory.glob(f"{prefix}-*.npz"))
    files = [f for f in files if ".tmp" not in f.name]
    if not files:
        raise InvalidInputError(f"no {prefix}-*.npz shards in {directory} (run `osop train prepare` first)")
    parts: dict[str, list[np.ndarray]] = {}
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            for k in z.files:
                parts.setdefault(k, []).append(z[k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def load_objects(directory: Path) -> dict[str, np.ndarray]:
    """Mini template banks: obj_id (O,), rgb (O,V,S,S,3) u8, mask (O,V,S,S) u8, R (O,V,3,3), center, diameter."""
    path = directory / "objects.npz"
    if not path.exists():
        raise InvalidInputError(f"missing {path} (run `osop train prepare` first)")
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def color_jitter(x: torch.Tensor, gen: torch.Generator, strength: float = 0.3) -> torch.Tensor:
    """Per-sample brightness/contrast/saturation/hue-ish channel gains + noise. x: (B, 3, H, W) in [0, 1]."""
    b = x.shape[0]
    dev = x.device

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return torch.rand(b, *shape, generator=gen).to(dev) * (hi - lo) + lo

    s = strength
    x = x * u(1 - s, 1 + s, 1, 1, 1) + u(-s / 3, s / 3, 1, 1, 1)  # brightness (gain, offset)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * u(1 - s, 1 + s, 1, 1, 1) + mean  # contrast
    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * u(1 - s, 1 + s, 1, 1, 1) + grey  # saturation
    x = x * u(1 - s / 3, 1 + s / 3, 3, 1, 1)  # colour cast
    x = x + torch.randn(x.shape, generator=gen).to(dev) * u(0.0, 0.04, 1, 1, 1)  # sensor noise
    return x.clamp(0, 1)


def random_blur(x: torch.Tensor, gen: torch.Generator, p: float = 0.3) -> torch.Tensor:
    """Box-ish blur (3x3 average) on a random subset of the batch."""
    sel = (torch.rand(x.shape[0], generator=gen) < p).to(x.device).view(-1, 1, 1, 1).float()
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return sel * blurred + (1 - sel) * x


def affine_grid(
    b: int,
    size: int,
    gen: torch.Generator,
    max_rot_deg: float,
    max_scale: float,
    max_shift: float,
    device: torch.device,
) -> torch.Tensor:
    """Random similarity transforms as a sampling grid (B, S, S, 2) for ``grid_sample``."""
    ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(max_rot_deg)
    sc = 1 + (torch.rand(b, generator=gen) * 2 - 1) * max_scale
    sh = (torch.rand(b, 2, generator=gen) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(ang) / sc, torch.sin(ang) / sc
    theta = torch.stack([torch.stack([cos, -sin, sh[:, 0]], 1), torch.stack([sin, cos, sh[:, 1]], 1)], 1)
    return F.affine_grid(theta.to(device), [b, 1, size, size], align_corners=False)


def warp(x: torch.Tensor, grid: torch.Tensor, nearest: bool = False) -> torch.Tensor:
    """Sample (B, C, S, S) with a grid; zeros outside."""
    return F.grid_sample(x, grid, mode="nearest" if nearest else "bilinear", padding_mode="zeros", align_corners=False)


def mask_noise(m: torch.Tensor, gen: torch.Generator, max_px: int = 2) -> torch.Tensor:
    """Randomly dilate or erode each mask by up to ``max_px`` pixels (imperfect stage-1 masks). m: (B,1,H,W)."""
    out = []
    for i in range(m.shape[0]):
        r = int(torch.randint(-max_px, max_px + 1, (1,), generator=gen))
        mi = m[i : i + 1]
        if r > 0:
            mi = F.max_pool2d(mi, 2 * r + 1, 1, r)
        elif r < 0:
            mi = -F.max_pool2d(-mi, -2 * r + 1, 1, -r)
        out.append(mi)
    return torch.cat(out)


def mask_shape_noise(m: torch.Tensor, gen: torch.Generator, p: float = 0.5, max_drop: float = 0.3) -> torch.Tensor:
    """Local shape errors of real stage-1 masks, (B, 1, H, W) binary -> same shape.

    With probability ``p`` per sample, half the time a part is cut off (the mask pixels beyond a random line,
    5 %..``max_drop`` of the area: a missed part), else an ellipse is added at a random boundary pixel (10-25 %
    of the mask's size: a shadow or a neighbour taken in). The crop's pixels are unchanged, so an added region
    shows the background there, as a real mask does.
    """
    out = m.clone()
    b, _, h, w = m.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    for i in range(b):
        if float(torch.rand(1, generator=gen)) >= p:
            continue
        on = out[i, 0] > 0.5
        ys, xs = torch.nonzero(on, as_tuple=True)
        if len(ys) < 16:
            continue
        if float(torch.rand(1, generator=gen)) < 0.5:  # cut a part off
            a = float(torch.rand(1, generator=gen)) * 2 * math.pi
            proj = xs.float() * math.cos(a) + ys.float() * math.sin(a)
            frac = 0.05 + (max_drop - 0.05) * float(torch.rand(1, generator=gen))
            cut = torch.quantile(proj, 1.0 - frac)
            drop = proj > cut
            out[i, 0, ys[drop], xs[drop]] = 0
        else:  # add a blob at the boundary
            edge = on & ~(-F.max_pool2d(-on[None, None].float(), 3, 1, 1)[0, 0] > 0.5)
            ey, ex = torch.nonzero(edge, as_tuple=True)
            k = int(torch.randint(0, len(ey), (1,), generator=gen))
            size = float(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
            ry = size * (0.10 + 0.15 * float(torch.rand(1, generator=gen)))
            rx = size * (0.10 + 0.15 * float(torch.rand(1, generator=gen)))
            blob = ((yy - float(ey[k])) / ry) ** 2 + ((xx - float(ex[k])) / rx) ** 2 <= 1.0
            out[i, 0][blob.to(out.device)] = 1
    return out


def random_cutout(
    x: torch.Tensor, m: torch.Tensor, gen: torch.Generator, p: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Occlude a random rectangle (filled with noise) in a subset of samples; updates masks accordingly."""
    b, _, h, w = x.shape
    x, m = x.clone(), m.clone()
    for i in range(b):
        if float(torch.rand(1, generator=gen)) >= p:
            continue
        ch, cw = (
            int(h * (0.2 + 0.3 * float(torch.rand(1, generator=gen)))),
            int(w * (0.2 + 0.3 * float(torch.rand(1, generator=gen)))),
        )
        y0 = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        x[i, :, y0 : y0 + ch, x0 : x0 + cw] = torch.rand(3, 1, 1, generator=gen).to(x.device)
        m[i, :, y0 : y0 + ch, x0 : x0 + cw] = 0
    return x, m
