"""One loader for every network: ``from_checkpoint(path, device)``.

A checkpoint is a plain dict saved with ``torch.save``: ``{"arch": str, "config": dict,
"state_dict": {name: tensor}, "meta": dict}``; it is read with ``weights_only=True`` so no code
from the file is ever executed. Weights may be stored in fp16 and are cast to fp32 on load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from osop_ros.nets.corrnet import CorrNet, CorrNetConfig
from osop_ros.nets.errors import CheckpointError, NetsError
from osop_ros.nets.featnets import (
    FeatCorrNet,
    FeatCorrNetConfig,
    FeatMatchNet,
    FeatMatchNetConfig,
    FeatSegNet,
    FeatSegNetConfig,
)
from osop_ros.nets.matchnet import MatchNet, MatchNetConfig
from osop_ros.nets.segnet import SegNet, SegNetConfig
from osop_ros.nets.specs import TRAINING_FREE_PREFIXES, is_training_free

ARCHS: dict[str, tuple[type[nn.Module], Any]] = {
    "segnet": (SegNet, SegNetConfig),
    "matchnet": (MatchNet, MatchNetConfig),
    "corrnet": (CorrNet, CorrNetConfig),
    "featseg": (FeatSegNet, FeatSegNetConfig),
    "featmatch": (FeatMatchNet, FeatMatchNetConfig),
    "featcorr": (FeatCorrNet, FeatCorrNetConfig),
}
# architectures that can serve each stage
STAGE_ARCHS: dict[str, tuple[str, ...]] = {
    "segment": ("segnet", "featseg"),
    "match": ("matchnet", "featmatch"),
    "correspond": ("corrnet", "featcorr"),
}
# training-free networks named by a spec instead of a weights file: "<spec prefix><backbone name>"
TRAINING_FREE = dict(
    zip(TRAINING_FREE_PREFIXES, (("featseg", {"head": "cosine"}), ("featmatch", {"proj_dim": 0})), strict=True)
)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise NetsError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
    return torch.device(device)


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any] | None = None, half: bool = False
) -> None:
    """Write ``model`` (+ config + meta) atomically; ``half`` stores floating tensors as fp16."""
    frozen = tuple(getattr(model, "frozen_prefixes", ()))
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
        for k, v in model.state_dict().items()
        if not (frozen and k.startswith(frozen))  # pretrained backbones stay in their package
    }
    ckpt = {"arch": model.arch, "config": model.cfg.to_dict(), "state_dict": state, "meta": dict(meta or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint dict safely (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip error is a bad file
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(ckpt, dict) or not {"arch", "config", "state_dict"} <= set(ckpt):
        raise CheckpointError(f"{path} is not an osop_ros checkpoint (needs arch/config/state_dict)")
    if ckpt["arch"] not in ARCHS:
        raise CheckpointError(f"{path}: unknown architecture {ckpt['arch']!r}")
    return ckpt


def from_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device = "auto", arch: str | None = None
) -> nn.Module:
    """Build the network stored in ``path`` on ``device`` in eval mode; ``arch`` checks the kind."""
    ckpt = load_checkpoint_dict(path)
    allowed = STAGE_ARCHS.get(arch, (arch,)) if arch is not None else None
    if allowed is not None and ckpt["arch"] not in allowed:
        raise CheckpointError(f"{path} holds a {ckpt['arch']}, expected one of {', '.join(allowed)}")
    cls, cfg_cls = ARCHS[ckpt["arch"]]
    model = cls(cfg_cls.from_dict(ckpt["config"]))
    load_trained_state(model, ckpt["state_dict"], path)
    model.meta = ckpt.get("meta", {})
    return model.to(resolve_device(device)).eval()


def load_trained_state(
    model: nn.Module, state_dict: dict[str, torch.Tensor], source: object, optional: tuple[str, ...] = ()
) -> None:
    """Load a checkpoint's (trained) state into ``model`` (as float32); parameters under the model's
    ``frozen_prefixes`` (a pretrained backbone read from its package) or under ``optional`` (a warm start
    from a file without them) may be absent. Raises CheckpointError when anything else is missing or
    unexpected."""
    state = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
    frozen = tuple(getattr(model, "frozen_prefixes", ())) + tuple(optional)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: weights do not fit the stored architecture: {exc}") from exc
    missing = [k for k in missing if not (frozen and k.startswith(frozen))]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not fit the stored architecture (missing {missing[:4]}, unexpected {unexpected[:4]})"
        )


def build_network(
    spec: str | os.PathLike[str], device: str | torch.device = "auto", stage: str | None = None
) -> nn.Module:
    """A weights file (see :func:`from_checkpoint`) or a training-free spec (``descriptor:efficientnet_lite0``)."""
    if not is_training_free(spec):
        return from_checkpoint(spec, device, arch=stage)
    prefix = next(p for p in TRAINING_FREE if str(spec).startswith(p))
    arch, overrides = TRAINING_FREE[prefix]
    if stage is not None and arch not in STAGE_ARCHS.get(stage, (stage,)):
        raise CheckpointError(f"{spec!r} is a {arch}, which cannot serve stage {stage}")
    cls, cfg_cls = ARCHS[arch]
    model = cls(cfg_cls.from_dict({**overrides, "backbone": str(spec)[len(prefix) :]}))
    model.meta = {"training_free": True}
    return model.to(resolve_device(device)).eval()


def spec_digest(spec: str | os.PathLike[str]) -> str:
    """Cache-key digest of a weights entry: the file's content, or the training-free spec's text."""
    if is_training_free(spec):
        return hashlib.sha256(str(spec).encode()).hexdigest()[:16]
    return file_digest(spec)


def file_digest(path: str | os.PathLike[str]) -> str:
    """Short sha256 of a file (feature cache keys depend on the weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
