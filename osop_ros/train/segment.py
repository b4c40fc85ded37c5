"""Stage 1 training: image + template vectors of the queried object -> its mask (Dice + BCE).

Each sample queries one object of a synthetic image (``p_absent`` of the time an object that is
absent, target empty, so the network learns to answer "not here"; ``p_hard_absent`` of those absent
queries take a look-alike of an object in the image: one of its ``hard_neighbours`` nearest objects by
frozen-backbone template vectors); its template vectors come from K random views of the object's mini
template bank, computed by the same encoder with gradients (featseg: the frozen backbone's vectors, computed
once, except the levels of ``tune_levels`` tuned blocks, which run with gradients on cached input maps).
Validation: mean IoU of the queried object's mask on held-out objects (at 320 x 240).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from osop_ros.nets.featnets import FeatSegNet, FeatSegNetConfig
from osop_ros.nets.segnet import SegNet, SegNetConfig, colour_histogram, dice_loss
from osop_ros.train.data import color_jitter, load_objects, load_shards, random_blur, to_tensor_mask, to_tensor_rgb


def _present(objmap: np.ndarray, min_px: int) -> list[list[int]]:
    out = []
    for m in objmap:
        ids, counts = np.unique(m, return_counts=True)
        out.append([int(i) for i, c in zip(ids, counts, strict=True) if i != 0 and c >= min_px])
    return out


class SegmentTask:
    """Plugs stage 1 into :func:`osop_ros.train.common.run_training`."""

    metric = "mean_iou"
    higher_is_better = True

    def __init__(
        self, train_dir: Path, val_dir: Path, batch_size: int, model_cfg: dict[str, Any], opts: dict[str, Any]
    ) -> None:
        self.train = load_shards(train_dir, "images")
        self.val = load_shards(val_dir, "images")
        self.tobj = load_objects(train_dir)
        self.vobj = load_objects(val_dir)
        self._obj_dirs = {id(self.tobj): Path(train_dir), id(self.vobj): Path(val_dir)}
        self.t_index = {int(o): i for i, o in enumerate(self.tobj["obj_id"])}
        self.v_index = {int(o): i for i, o in enumerate(self.vobj["obj_id"])}
        self.t_present = [[o for o in p if o in self.t_index] for p in _present(self.train["objmap"], 80)]
        self.v_present = [[o for o in p if o in self.v_index] for p in _present(self.val["objmap"], 200)]
        self.t_images = [i for i, p in enumerate(self.t_present) if p]
        self.batch_size = batch_size
        self.model_cfg = model_cfg
        self.crop = tuple(opts.get("crop", (192, 256)))  # (h, w)
        self.k_range = tuple(opts.get("templates", (12, 24)))
        self.p_absent = float(opts.get("p_absent", 0.15))
        self.max_val = int(opts.get("max_val", 200))
        self.p_hard_absent = float(opts.get("p_hard_absent", 0.0))
        self.hard_neighbours = int(opts.get("hard_neighbours", 16))
        self._neighbours: np.ndarray | None = None  # (N_obj, hard_neighbours) train rows, built on first use
        self.gen = torch.Generator().manual_seed(int(opts.get("seed", 0)))

    def build_model(self) -> nn.Module:
        """``model: {arch: featseg, ...}`` trains a head on the frozen pretrained backbone; else a SegNet."""
        cfg = dict(self.model_cfg or {})
        if cfg.pop("arch", "segnet") == "featseg":
            return FeatSegNet(FeatSegNetConfig.from_dict({**FeatSegNetConfig().to_dict(), **cfg}))
        return SegNet(SegNetConfig.from_dict({**SegNetConfig().to_dict(), **cfg}) if cfg else None)

    @torch.no_grad()
    def _raw_vectors(self, net: FeatSegNet, objs: dict[str, np.ndarray], device: torch.device) -> list[np.ndarray]:
        """Frozen-backbone template vectors of every (object, view): [(N_obj, V, C_l)] float16, computed once.

        The projections are linear, so ``project_vectors`` of these equals ``template_vectors`` of the crops.
        """
        key = f"raw_{net.cfg.backbone}_{net.cfg.template_size}"
        cache = self._obj_dirs[id(objs)] / f"{key}.npz" if id(objs) in self._obj_dirs else None
        if key not in objs and cache is not None and cache.is_file():
            with np.load(cache) as z:
                objs[key] = [z[f"l{i}"] for i in range(len(z.files))]
        if key not in objs:
            n, v = objs["rgb"].shape[:2]
            batches = list(self._per_view(objs, device, net.raw_template_vectors))
            objs[key] = [np.concatenate(level).reshape(n, v, -1) for level in zip(*batches, strict=True)]
            if cache is not None:  # atomic: restarts and resumed runs skip the ~10 min extraction
                tmp = cache.with_suffix(".tmp.npz")
                np.savez(tmp, **{f"l{i}": a for i, a in enumerate(objs[key])})
                os.replace(tmp, cache)
        return objs[key]

    @torch.no_grad()
    def _pre_maps(self, net: FeatSegNet, objs: dict[str, np.ndarray], device: torch.device) -> np.ndarray:
        """Frozen input maps of the tuned blocks for every (object, view): (N_obj, V, C, h, w) float16, once."""
        key = f"pre_{net.cfg.backbone}_{net.cfg.template_size}_{net.tune_start}"
        if key not in objs:
            n, v = objs["rgb"].shape[:2]
            maps = np.concatenate([b[0] for b in self._per_view(objs, device, lambda r, m: [net.pre_tune_maps(r, m)])])
            objs[key] = maps.reshape(n, v, *maps.shape[1:])
        return objs[key]

    @staticmethod
    def _per_view(
        objs: dict[str, np.ndarray],
        device: torch.device,
        fn: Callable[[torch.Tensor, torch.Tensor], list[torch.Tensor]],
        batch: int = 128,
    ) -> Iterator[list[np.ndarray]]:
        """``fn(rgb (b, 3, S, S), mask (b, 1, S, S))`` over every (object, view) in order, in batches; yields its
        outputs as float16 arrays."""
        n, v = objs["rgb"].shape[:2]
        flat_rgb = objs["rgb"].reshape(n * v, *objs["rgb"].shape[2:])
        flat_mask = objs["mask"].reshape(n * v, *objs["mask"].shape[2:])
        for s in range(0, n * v, batch):
            out = fn(to_tensor_rgb(flat_rgb[s : s + batch], device), to_tensor_mask(flat_mask[s : s + batch], device))
            yield [t.cpu().numpy().astype(np.float16) for t in out]

    def _tvecs(
        self, model: nn.Module, objs: dict[str, np.ndarray], rows: list[int], views: np.ndarray, device: torch.device
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Template vectors [(B, K, C_l)] and colour histograms (B, N_BINS) of the queried objects."""
        rgb = objs["rgb"][rows][:, views]  # (B, K, S, S, 3)
        mask = objs["mask"][rows][:, views]
        b, k = rgb.shape[:2]
        net = model.module if hasattr(model, "module") else model
        if isinstance(net, FeatSegNet):
            raw = self._raw_vectors(net, objs, device)
            levels = [torch.from_numpy(r[rows][:, views].astype(np.float32)).to(device) for r in raw]
            r = to_tensor_rgb(rgb.reshape(b * k, *rgb.shape[2:]), device)
            m = to_tensor_mask(mask.reshape(b * k, *mask.shape[2:]), device)
            if net.tuned is not None:  # the tuned levels through the tuned blocks, with gradients
                pre = self._pre_maps(net, objs, device)[rows][:, views]
                pre_t = torch.from_numpy(pre.reshape(b * k, *pre.shape[2:]).astype(np.float32)).to(device)
                tuned = [v.view(b, k, -1) for v in net.tuned_template_vectors(pre_t, m)]
                levels = levels[: len(levels) - len(tuned)] + tuned
            return net.project_vectors(levels), colour_histogram(r, m).view(b, k, -1).mean(1)
        r = to_tensor_rgb(rgb.reshape(b * k, *rgb.shape[2:]), device)
        m = to_tensor_mask(mask.reshape(b * k, *mask.shape[2:]), device)
        hist = colour_histogram(r, m).view(b, k, -1).mean(1)
        vecs = net.template_vectors(r, m, hist.repeat_interleave(k, 0))
        return [v.view(b, k, -1) for v in vecs], hist

    @torch.no_grad()
    def neighbours(self, net: nn.Module, device: torch.device) -> np.ndarray:
        """(N_obj, k) rows of each training object's k most similar other objects (cosine of the view-averaged,
        concatenated frozen-backbone template vectors of all levels)."""
        if self._neighbours is None:
            if not isinstance(net, FeatSegNet):
                raise ValueError("p_hard_absent needs the featseg model (frozen-backbone template vectors)")
            raw = self._raw_vectors(net, self.tobj, device)
            d = np.concatenate([r.astype(np.float32).mean(1) for r in raw], axis=1)
            d = (d - d.mean(0)) / (d.std(0) + 1e-6)
            d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-9
            sim = d @ d.T
            np.fill_diagonal(sim, -np.inf)
            k = min(self.hard_neighbours, len(d) - 1)
            self._neighbours = np.argsort(-sim, axis=1)[:, :k]
        return self._neighbours

    def _absent_object(self, i: int, rng: np.random.Generator, model: nn.Module, device: torch.device) -> int:
        """An object id not in training image ``i``: a look-alike of a present one ``p_hard_absent`` of the time."""
        net = model.module if hasattr(model, "module") else model
        present = set(self.t_present[i])
        if self.p_hard_absent > 0 and rng.random() < self.p_hard_absent:
            rows = self.neighbours(net, device)[self.t_index[int(rng.choice(self.t_present[i]))]]
            ids = [int(self.tobj["obj_id"][r]) for r in rows]
            hard = [o for o in ids if o not in present]
            if hard:
                return int(rng.choice(hard))
        return int(rng.choice([o for o in self.t_index if o not in present]))

    def step(self, model: nn.Module, rng: np.random.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        B = self.batch_size
        h, w = self.crop
        H, W = self.train["rgb"].shape[1:3]
        imgs, targets, rows = [], [], []
        for _ in range(B):
            i = int(rng.choice(self.t_images))
            if rng.random() < self.p_absent:
                oid = self._absent_object(i, rng, model, device)
            else:
                oid = int(rng.choice(self.t_present[i]))
            y0, x0 = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
            imgs.append(self.train["rgb"][i, y0 : y0 + h, x0 : x0 + w])
            targets.append(self.train["objmap"][i, y0 : y0 + h, x0 : x0 + w] == oid)
            rows.append(self.t_index[oid])
        k = int(rng.integers(self.k_range[0], self.k_range[1] + 1))
        V = self.tobj["rgb"].shape[1]
        views = rng.choice(V, size=min(k, V), replace=False)
        x = random_blur(color_jitter(to_tensor_rgb(np.stack(imgs), device), self.gen), self.gen)
        t = to_tensor_mask(np.stack(targets).astype(np.float32), device)
        tvecs, hist = self._tvecs(model, self.tobj, rows, views, device)
        logits = model(x, tvecs, hist)
        l_dice = dice_loss(logits, t)
        l_bce = F.binary_cross_entropy_with_logits(logits, t)
        return {"loss": l_dice + l_bce, "dice": l_dice.detach(), "bce": l_bce.detach()}

    @torch.no_grad()
    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        ious, fp = [], []
        V = self.vobj["rgb"].shape[1]
        views = np.arange(V)
        n = 0
        for i, present in enumerate(self.v_present):
            if n >= self.max_val:
                break
            absent = [o for o in self.v_index if o not in present]
            queries = [(o, True) for o in present[:2]] + ([(absent[i % len(absent)], False)] if absent else [])
            for oid, is_present in queries:
                x = to_tensor_rgb(self.val["rgb"][i : i + 1], device)
                tvecs, hist = self._tvecs(model, self.vobj, [self.v_index[oid]], views, device)
                pred = torch.sigmoid(model(x, tvecs, hist))[0, 0] > 0.5
                if is_present:
                    gt = torch.from_numpy(self.val["objmap"][i] == oid).to(device)
                    union = (pred | gt).sum().item()
                    ious.append((pred & gt).sum().item() / max(union, 1))
                    n += 1
                else:
                    fp.append(float(pred.float().mean().item() > 0.002))
        return {
            "mean_iou": float(np.mean(ious)) if ious else 0.0,
            "iou_ge_0.5": float(np.mean(np.array(ious) >= 0.5)) if ious else 0.0,
            "absent_false_pos": float(np.mean(fp)) if fp else float("nan"),
            "n": float(len(ious)),
        }
