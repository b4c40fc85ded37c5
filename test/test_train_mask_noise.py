"""Training augmentation of query masks: local shape errors like real stage-1 masks."""

from __future__ import annotations

import torch

from osop_ros.train.data import mask_shape_noise


def _disks(n: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    return (((yy - 32) ** 2 + (xx - 30) ** 2) <= 18**2).float().expand(n, 1, 64, 64).clone()


def test_mask_shape_noise_cuts_parts_off_or_adds_blobs() -> None:
    m = _disks(64)
    out = mask_shape_noise(m, torch.Generator().manual_seed(0), p=1.0)
    assert out.shape == m.shape and set(out.unique().tolist()) <= {0.0, 1.0}
    area, new = m.flatten(1).sum(1), out.flatten(1).sum(1)
    cut, grown = new < area, new > area
    assert cut.sum() >= 16 and grown.sum() >= 16  # both kinds, about half each
    kept = (out * m).flatten(1).sum(1)
    assert torch.all(kept[cut] / area[cut] >= 0.69) and torch.all(kept[cut] / area[cut] <= 0.96)  # 5-30 % cut off
    assert torch.all(kept[grown] == area[grown])  # a blob only adds
    assert torch.all(new[grown] - area[grown] <= 0.5 * area[grown])
    same = mask_shape_noise(m, torch.Generator().manual_seed(0), p=1.0)
    assert torch.equal(out, same)  # reproducible from the generator
    assert torch.equal(mask_shape_noise(m, torch.Generator().manual_seed(0), p=0.0), m)
    tiny = torch.zeros(1, 1, 16, 16)
    tiny[0, 0, 5, 5] = 1
    assert torch.equal(mask_shape_noise(tiny, torch.Generator(), p=1.0), tiny)  # too small to change
