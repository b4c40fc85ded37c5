"""Stage 3 training: query crop + paired template -> per-pixel binned model coordinates + mask.

Loss = Dice + BCE on the visible mask + cross-entropy per axis over coordinate bins on the
visible object pixels (the paper's "Dice + per-pixel classification"). Validation: median 3D
error of the decoded coordinates on held-out objects, in % of the object diameter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from osop_ros.nets.corrnet import CorrNet, CorrNetConfig, coordinate_targets, decode_coordinates
from osop_ros.nets.segnet import dice_loss
from osop_ros.nets.tensors import xyz_tensor
from osop_ros.train.data import (
    affine_grid,
    color_jitter,
    load_shards,
    mask_noise,
    random_blur,
    random_cutout,
    to_tensor_mask,
    to_tensor_rgb,
    warp,
)


def normalise_xyz(xyz: torch.Tensor, center: torch.Tensor, diameter: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) metres -> (xyz - centre) / diameter + 0.5 (in [0, 1] for points on the model)."""
    return (xyz - center.view(-1, 3, 1, 1)) / diameter.view(-1, 1, 1, 1) + 0.5


class CorrespondTask:
    """Plugs stage 3 into :func:`osop_ros.train.common.run_training`."""

    metric = "median_err_pct"
    higher_is_better = False

    def __init__(
        self, train_dir: Path, val_dir: Path, batch_size: int, model_cfg: dict[str, Any], opts: dict[str, Any]
    ) -> None:
        self.train = load_shards(train_dir, "instances")
        self.val = load_shards(val_dir, "instances")
        self.batch_size = batch_size
        self.model_cfg = model_cfg
        self.max_val = int(opts.get("max_val", 600))
        self.gen = torch.Generator().manual_seed(int(opts.get("seed", 0)))

    def build_model(self) -> nn.Module:
        """``model: {arch: featcorr, ...}`` trains a head on the frozen pretrained backbone; else a CorrNet."""
        cfg = dict(self.model_cfg or {})
        if cfg.pop("arch", "corrnet") == "featcorr":
            from osop_ros.nets.featnets import FeatCorrNet, FeatCorrNetConfig

            return FeatCorrNet(FeatCorrNetConfig.from_dict({**FeatCorrNetConfig().to_dict(), **cfg}))
        return CorrNet(CorrNetConfig.from_dict({**CorrNetConfig().to_dict(), **cfg}) if cfg else CorrNetConfig())

    def _batch(
        self, model: nn.Module, data: dict[str, np.ndarray], idx: np.ndarray, device: torch.device, augment: bool
    ):
        q_rgb = to_tensor_rgb(data["q_rgb"][idx], device)
        q_mask = to_tensor_mask(data["q_mask"][idx], device)
        q_xyz = xyz_tensor(data["q_xyz"][idx], device)
        t_rgb = to_tensor_rgb(data["t_rgb"][idx], device)
        t_mask = to_tensor_mask(data["t_mask"][idx], device)
        t_xyz = xyz_tensor(data["t_xyz"][idx], device)
        center = torch.from_numpy(data["center"][idx]).to(device)
        diam = torch.from_numpy(data["diameter"][idx]).to(device)
        if augment:
            S = q_rgb.shape[-1]
            grid = affine_grid(len(idx), S, self.gen, 15.0, 0.1, 0.06, device)
            q_rgb = warp(q_rgb, grid)
            q_mask = warp(q_mask, grid, nearest=True)
            q_xyz = warp(q_xyz, grid, nearest=True)
            q_rgb = random_blur(color_jitter(q_rgb, self.gen), self.gen)
            q_rgb, occ = random_cutout(q_rgb, q_mask, self.gen, p=0.25)
            q_mask = occ
            t_rgb = color_jitter(t_rgb, self.gen, 0.1)
        in_mask = mask_noise(q_mask, self.gen) if augment else q_mask
        net = model.module if hasattr(model, "module") else model  # DDP wraps the network
        x = net.make_input(q_rgb, in_mask, t_rgb, t_mask, normalise_xyz(t_xyz, center, diam) * t_mask)
        target_n = normalise_xyz(q_xyz, center, diam).clamp(0, 1 - 1e-6)
        return x, q_mask, target_n, diam

    def step(self, model: nn.Module, rng: np.random.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        idx = rng.integers(0, len(self.train["obj_id"]), self.batch_size)
        x, mask, target_n, _ = self._batch(model, self.train, idx, device, augment=True)
        mask_logit, coord_logits = model(x)
        n_bins = coord_logits.shape[2]
        bins = coordinate_targets(target_n, n_bins)  # (B, 3, S, S)
        ce = F.cross_entropy(
            coord_logits.permute(0, 1, 3, 4, 2).reshape(-1, n_bins), bins.reshape(-1), reduction="none"
        )
        w = mask.expand(-1, 3, -1, -1).reshape(-1)
        l_ce = (ce * w).sum() / w.sum().clamp_min(1.0)
        l_dice = dice_loss(mask_logit, mask)
        l_bce = F.binary_cross_entropy_with_logits(mask_logit, mask)
        return {"loss": l_ce + l_dice + l_bce, "ce": l_ce.detach(), "dice": l_dice.detach(), "bce": l_bce.detach()}

    @torch.no_grad()
    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        n = min(self.max_val, len(self.val["obj_id"]))
        errs, ious = [], []
        for s in range(0, n, 32):
            idx = np.arange(s, min(n, s + 32))
            x, mask, target_n, diam = self._batch(model, self.val, idx, device, augment=False)
            mask_logit, coord_logits = model(x)
            pred, _ = decode_coordinates(coord_logits)
            e = (pred - target_n).norm(dim=1)  # (B, S, S) in diameters
            for i in range(len(idx)):
                m = mask[i, 0] > 0.5
                if m.any():
                    errs.append(e[i][m].cpu().numpy())
                pm = torch.sigmoid(mask_logit[i, 0]) > 0.5
                union = (pm | m).sum().item()
                ious.append((pm & m).sum().item() / union if union else 1.0)
        allerr = np.concatenate(errs) if errs else np.array([np.nan])
        per_inst = [float(np.median(e)) for e in errs]
        return {
            "median_err_pct": float(np.median(allerr) * 100),
            "median_inst_err_pct": float(np.median(per_inst) * 100) if per_inst else float("nan"),
            "within_10pct": float((allerr < 0.1).mean()),
            "mask_iou": float(np.mean(ious)),
        }
