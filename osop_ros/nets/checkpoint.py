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

from osop_ros.core.types import OsopError
from osop_ros.nets.corrnet import CorrNet, CorrNetConfig
from osop_ros.nets.matchnet import MatchNet, MatchNetConfig
from osop_ros.nets.segnet import SegNet, SegNetConfig

ARCHS: dict[str, tuple[type[nn.Module], Any]] = {
    "segnet": (SegNet, SegNetConfig),
    "matchnet": (MatchNet, MatchNetConfig),
    "corrnet": (CorrNet, CorrNetConfig),
}


class CheckpointError(OsopError):
    """A weights file is missing, unreadable or of the wrong architecture."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OsopError(f"device {device!r} requested but CUDA is not available (torch {torch.__version__})")
    return torch.device(device)


def save_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, meta: dict[str, Any] | None = None, half: bool = False
) -> None:
    """Write ``model`` (+ config + meta) atomically; ``half`` stores floating tensors as fp16."""
    state = {
        k: (v.half() if half and v.is_floating_point() else v).detach().cpu().clone()
        for k, v in model.state_dict().items()
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
    if arch is not None and ckpt["arch"] != arch:
        raise CheckpointError(f"{path} holds a {ckpt['arch']}, expected a {arch}")
    cls, cfg_cls = ARCHS[ckpt["arch"]]
    model = cls(cfg_cls.from_dict(ckpt["config"]))
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the stored architecture: {exc}") from exc
    model.meta = ckpt.get("meta", {})
    return model.to(resolve_device(device)).eval()


def file_digest(path: str | os.PathLike[str]) -> str:
    """Short sha256 of a file (feature cache keys depend on the weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
