"""Shared training loop: resumable checkpoints, seeds, validation, curves, DDP and AMP.

Each stage provides a :class:`TrainTask` (model factory, one training step, validation). The loop
runs on CPU here and scales with ``torchrun --nproc_per_node N osop train ...`` (DDP: gloo on CPU,
nccl on CUDA; each rank samples its own batches with a rank-offset seed; rank 0 writes files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import yaml
from torch import nn

from osop_ros.core.config import build_dataclass
from osop_ros.core.types import InvalidInputError
from osop_ros.nets.checkpoint import resolve_device, save_checkpoint

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """One training run (YAML: ``osop train <stage> --config FILE``)."""

    stage: str = "correspond"
    train_dir: str = "~/.cache/osop/data/prepared/train"
    val_dir: str = "~/.cache/osop/data/prepared/val"
    out_dir: str = "~/.cache/osop/train/correspond"
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    max_steps: int = 20000
    max_hours: float = 0.0  # stop (after a checkpoint) when this wall time is used; 0 = no limit
    val_every: int = 500  # an "epoch" for validation purposes
    ckpt_every_s: float = 300.0
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    amp: bool = True  # autocast on CUDA only
    init_from: str = ""  # warm start from these weights (e.g. weights/<stage>.pt) when out_dir has no last.pt
    model: dict[str, Any] = field(default_factory=dict)  # architecture overrides
    task: dict[str, Any] = field(default_factory=dict)  # stage-specific options

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> TrainConfig:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise InvalidInputError(f"training config {path} must contain a mapping")
        return build_dataclass(cls, {**data, **(overrides or {})}, str(path))

    def path(self, name: str) -> Path:
        return Path(os.path.expanduser(getattr(self, name)))


class TrainTask(Protocol):
    """What a stage plugs into :func:`run_training`."""

    metric: str  # validation key used to keep the best checkpoint
    higher_is_better: bool

    def build_model(self) -> nn.Module: ...

    def step(self, model: nn.Module, rng: np.random.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        """One batch: returns losses (``loss`` is optimised)."""
        ...

    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]: ...


def _dist_info() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def plot_curves(history: dict[str, list], path: Path, metric: str) -> None:
    """Loss (train) and validation curves to one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if history["train"]:
        steps = [h["step"] for h in history["train"]]
        for k in history["train"][0]:
            if k != "step":
                axes[0].plot(steps, [h.get(k, math.nan) for h in history["train"]], label=k)
    axes[0].set_xlabel("step")
    axes[0].set_title("train losses (running mean)")
    if history["train"]:
        axes[0].legend(fontsize=7)
        axes[0].set_yscale("log")
    if history["val"]:
        steps = [h["step"] for h in history["val"]]
        for k in history["val"][0]:
            if k not in ("step", "n"):  # counts would squash the [0, 1] metrics
                axes[1].plot(steps, [h.get(k, math.nan) for h in history["val"]], marker="o", label=k)
    axes[1].set_title(f"validation (held-out objects); best by {metric}")
    axes[1].set_xlabel("step")
    if history["val"]:
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_training(task: TrainTask, cfg: TrainConfig) -> dict[str, Any]:
    """Train until ``max_steps`` / ``max_hours``; resumes from ``out_dir/last.pt`` if present."""
    rank, world = _dist_info()
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"
        torch.distributed.init_process_group(backend)
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = cfg.path("out_dir")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    model = task.build_model().to(device)
    groups = model.param_groups(cfg.lr) if hasattr(model, "param_groups") else model.parameters()
    opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, best, history, wall = 0, None, {"train": [], "val": []}, 0.0
    rng = np.random.default_rng(cfg.seed + 1000 * rank)
    last = out / "last.pt"
    if last.exists():
        st = torch.load(last, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        for group in opt.param_groups:  # the config's learning rate wins (lower it to fine-tune a run)
            group["lr"] = cfg.lr * group.get("lr_scale", 1.0)
        step, best, wall = int(st["step"]), st.get("best"), float(st.get("wall_s", 0.0))
        history = json.loads(st["history"])
        rng = np.random.default_rng(cfg.seed + 1000 * rank + step)
        log.info("resumed %s at step %d (best %s)", last, step, best)
    elif cfg.init_from:
        from osop_ros.nets.checkpoint import load_checkpoint_dict, load_trained_state

        ck = load_checkpoint_dict(os.path.expanduser(cfg.init_from))
        # head-only files: the backbone stays, a tuned copy of its last blocks starts as the pretrained ones
        load_trained_state(model, ck["state_dict"], cfg.init_from, getattr(model, "warm_start_optional", ()))
        step = int(ck.get("meta", {}).get("step", 0))
        wall = float(ck.get("meta", {}).get("wall_s", 0.0))
        log.info("warm start from %s (step %d of its run)", cfg.init_from, step)
    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    use_amp = cfg.amp and device.type == "cuda"

    def save_last() -> None:
        if rank != 0:
            return
        tmp = out / "last.pt.tmp"
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "best": best,
                "wall_s": wall,
                "history": json.dumps(history),
                "config": json.dumps(dataclasses.asdict(cfg)),
            },
            tmp,
        )
        os.replace(tmp, last)
        plot_curves(history, out / "curves.png", task.metric)

    t_start = time.time()
    wall0 = wall
    t_ckpt = time.time()
    running: dict[str, float] = {}
    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"train {cfg.stage}", disable=rank != 0, mininterval=10)
    stop_reason = "max_steps"
    while step < cfg.max_steps:
        model.train()
        with torch.autocast(device.type, enabled=use_amp, dtype=torch.bfloat16):
            losses = task.step(ddp_model, rng, device)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        bar.update(1)
        for k, v in losses.items():
            fv = float(v.detach())
            running[k] = 0.98 * running.get(k, fv) + 0.02 * fv
        wall = wall0 + time.time() - t_start
        if step % 50 == 0:
            history["train"].append({"step": step, **{k: round(v, 5) for k, v in running.items()}})
            bar.set_postfix({k: f"{v:.3f}" for k, v in running.items()})
        if step % cfg.val_every == 0 or step == cfg.max_steps:
            if rank == 0:
                model.eval()
                with torch.no_grad():
                    metrics = task.validate(model, device)
                history["val"].append({"step": step, **metrics})
                log.info("step %d val %s", step, metrics)
                m = metrics[task.metric]
                if best is None or (m > best if task.higher_is_better else m < best):
                    best = m
                    save_checkpoint(
                        out / "best.pt",
                        model,
                        meta={
                            "step": step,
                            "wall_s": round(wall, 1),
                            "val": metrics,
                            "config": dataclasses.asdict(cfg),
                        },
                    )
            save_last()
            t_ckpt = time.time()
        elif time.time() - t_ckpt > cfg.ckpt_every_s:
            save_last()
            t_ckpt = time.time()
        if cfg.max_hours and wall > cfg.max_hours * 3600:
            stop_reason = "max_hours"
            break
    bar.close()
    save_last()
    if world > 1:
        torch.distributed.barrier()
    return {"step": step, "best": best, "wall_s": round(wall, 1), "stop": stop_reason, "out_dir": str(out)}
