"""numpy images <-> torch tensors, one convention for training and inference."""

from __future__ import annotations

import numpy as np
import torch


def rgb_tensor(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, H, W, 3) or (H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    if t.ndim == 3:
        t = t.unsqueeze(0)
    return t.permute(0, 3, 1, 2).float() / 255.0


def mask_tensor(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, H, W) or (H, W) {0, 1} (bool/uint8/float) -> (B, 1, H, W) float32."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    if t.ndim == 2:
        t = t.unsqueeze(0)
    return t.unsqueeze(1).float()


def xyz_tensor(x: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, H, W, 3) float16/32 model coordinates -> (B, 3, H, W) float32."""
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device).permute(0, 3, 1, 2)
