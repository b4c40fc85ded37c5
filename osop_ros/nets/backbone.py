"""Configurable ResNet family (basic or bottleneck blocks, any widths/depths), trained from scratch.

No pretrained weights exist offline here, so networks are small by default; the paper's ResNet-50
is ``ResNetConfig.resnet50()``. GroupNorm is used instead of BatchNorm: batches are small on CPU and
train/eval behaviour stays identical.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def norm(c: int) -> nn.GroupNorm:
    """GroupNorm with up to 8 groups."""
    g = 8
    while c % g:
        g //= 2
    return nn.GroupNorm(g, c)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection."""

    expansion = 1

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.n1 = norm(c)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.n2 = norm(c)
        self.act = nn.ReLU(inplace=True)
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, c, 1, stride, bias=False), norm(c)) if stride != 1 or c_in != c else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.n1(self.conv1(x)))
        y = self.n2(self.conv2(y))
        return self.act(y + (x if self.skip is None else self.skip(x)))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 bottleneck block (ResNet-50 style), output width ``4 * c``."""

    expansion = 4

    def __init__(self, c_in: int, c: int, stride: int = 1) -> None:
        super().__init__()
        out = c * 4
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c, 1, bias=False),
            norm(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 3, stride, 1, bias=False),
            norm(c),
            nn.ReLU(inplace=True),
            nn.Conv2d(c, out, 1, bias=False),
            norm(out),
        )
        self.skip = (
            nn.Sequential(nn.Conv2d(c_in, out, 1, stride, bias=False), norm(out))
            if stride != 1 or c_in != out
            else None
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + (x if self.skip is None else self.skip(x)))


class DictConfig:
    """Plain-dict (de)serialisation of network configs stored in checkpoints.

    Tuples become lists; nested configs (fields whose default is a ``DictConfig``) become dicts.
    ``from_dict`` restores tuples and nested configs from the field defaults' types.
    """

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, DictConfig) else list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        defaults = cls()
        kwargs = {}
        for k, v in d.items():
            ref = getattr(defaults, k)
            kwargs[k] = (
                type(ref).from_dict(v) if isinstance(ref, DictConfig) else tuple(v) if isinstance(ref, tuple) else v
            )
        return cls(**kwargs)


@dataclass
class ResNetConfig(DictConfig):
    """Backbone shape. ``stem_stride`` 2 or 4 (4 adds a max-pool like torchvision ResNets)."""

    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128, 256)
    blocks: tuple[int, ...] = (1, 1, 1, 1)
    block: str = "basic"  # basic | bottleneck
    stem_stride: int = 2

    @classmethod
    def resnet18(cls, in_channels: int = 3, width_mult: float = 1.0) -> ResNetConfig:
        w = tuple(int(c * width_mult) for c in (64, 128, 256, 512))
        return cls(in_channels, w, (2, 2, 2, 2), "basic", 4)

    @classmethod
    def resnet50(cls, in_channels: int = 3) -> ResNetConfig:
        return cls(in_channels, (64, 128, 256, 512), (3, 4, 6, 3), "bottleneck", 4)


class ResNet(nn.Module):
    """Multi-scale encoder. ``forward`` returns the list of stage outputs (strides stem*1, *2, *4, ...)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        block = BasicBlock if cfg.block == "basic" else Bottleneck
        c0 = cfg.widths[0]
        stem: list[nn.Module] = [nn.Conv2d(cfg.in_channels, c0, 3, 2, 1, bias=False), norm(c0), nn.ReLU(inplace=True)]
        if cfg.stem_stride == 4:
            stem.append(nn.MaxPool2d(3, 2, 1))
        elif cfg.stem_stride != 2:
            raise ValueError("stem_stride must be 2 or 4")
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList()
        c_in = c0
        for i, (w, n) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
            layers = []
            for j in range(n):
                layers.append(block(c_in, w, 2 if (j == 0 and i > 0) else 1))
                c_in = w * block.expansion
            self.stages.append(nn.Sequential(*layers))
        self.out_channels = [w * block.expansion for w in cfg.widths]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return feats


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 conv + GroupNorm + ReLU, twice (U-Net decoder unit)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
        norm(c_out),
        nn.ReLU(inplace=True),
    )


class UNetDecoder(nn.Module):
    """Upsamples the deepest feature map, fusing skips; returns a map at the shallowest skip's stride."""

    def __init__(self, enc_channels: list[int], dec_channels: list[int]) -> None:
        super().__init__()
        assert len(dec_channels) == len(enc_channels) - 1
        self.blocks = nn.ModuleList()
        c = enc_channels[-1]
        for skip_c, out_c in zip(reversed(enc_channels[:-1]), dec_channels, strict=True):
            self.blocks.append(conv_block(c + skip_c, out_c))
            c = out_c
        self.out_channels = c

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1]), strict=True):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return x
