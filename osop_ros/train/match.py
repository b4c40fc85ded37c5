"""Stage 2 training: contrastive template matching with rotation-aware soft targets.

Batches are grouped by object: Q query crops of an object, their paired templates (rendered at
their own, slightly perturbed viewpoints) and V random views of the same object's mini bank as
hard negatives, plus every other group's templates as easy negatives. Each query's target
distribution over all templates in the batch is ``exp(-angle^2 / 2 sigma^2)`` over same-object
templates (0 elsewhere), so near-identical views are not pushed apart. Why not the autoencoder
(bootstrapped L2) reading: see ``weights/match.md`` (measured on held-out objects).

Validation: held-out objects get a coarse bank (``val_grid``, default 8 x 18 x 5 views); top-1 template
after in-plane refinement (the runtime procedure of :class:`osop_ros.core.matching.TemplateMatcher`) ->
median rotation error and share within 15 degrees. ``val_shape_noise`` gives that share of the validation
queries the training's local mask shape errors, drawn once with a fixed seed (the same queries every
validation), so that the metric follows what real stage-1 masks do to stage 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from osop_ros.nets.matchnet import MatchNet, MatchNetConfig
from osop_ros.train.data import (
    affine_grid,
    color_jitter,
    load_objects,
    load_shards,
    mask_noise,
    mask_shape_noise,
    random_blur,
    random_cutout,
    to_tensor_mask,
    to_tensor_rgb,
    warp,
)


def rotation_angles_deg(Ra: np.ndarray, Rb: np.ndarray, sym_R: np.ndarray | None = None) -> np.ndarray:
    """Pairwise geodesic angles: Ra (N,3,3), Rb (M,3,3) -> (N, M) degrees.

    With ``sym_R`` (S, 3, 3) (model symmetries, identity included) the smallest angle between
    ``Ra`` and any ``Rb @ S`` is returned.
    """
    if sym_R is None:
        tr = np.einsum("nij,mij->nm", Ra, Rb)
    else:
        RbS = np.einsum("mij,sjk->msik", Rb, sym_R)
        tr = np.einsum("nij,msij->nms", Ra, RbS).max(axis=2)
    return np.degrees(np.arccos(np.clip((tr - 1) / 2, -1, 1)))


class MatchTask:
    """Plugs stage 2 into :func:`osop_ros.train.common.run_training`."""

    metric = "median_rot_err_deg"
    higher_is_better = False

    def __init__(
        self, train_dir: Path, val_dir: Path, batch_size: int, model_cfg: dict[str, Any], opts: dict[str, Any]
    ) -> None:
        self.train = load_shards(train_dir, "instances")
        self.tobj = load_objects(train_dir)
        self.t_index = {int(o): i for i, o in enumerate(self.tobj["obj_id"])}
        self.by_obj: dict[int, np.ndarray] = {}
        for oid in np.unique(self.train["obj_id"]):
            if int(oid) in self.t_index:
                self.by_obj[int(oid)] = np.nonzero(self.train["obj_id"] == oid)[0]
        self.objs = sorted(self.by_obj)
        self.groups = max(1, batch_size // 4)
        self.q_per = int(opts.get("queries_per_object", 4))
        self.v_neg = int(opts.get("views_per_object", 12))
        self.sigma = float(opts.get("sigma_deg", 10.0))
        self.shape_noise = float(opts.get("mask_shape_noise", 0.0))  # share of queries given local mask errors
        self.model_cfg = model_cfg
        self.gen = torch.Generator().manual_seed(int(opts.get("seed", 0)))
        self.val_dir = val_dir
        self.meshes_dir = Path(opts.get("meshes_dir", "~/.cache/osop/data/meshes")).expanduser()
        self.n_val_objects = int(opts.get("val_objects", 16))
        self.max_val = int(opts.get("max_val", 300))
        self.val_grid = tuple(int(v) for v in opts.get("val_grid", (8, 18, 5)))
        if len(self.val_grid) != 3 or min(self.val_grid) < 1:
            raise ValueError(f"val_grid must be 3 positive integers (elevations, azimuths, in-plane): {self.val_grid}")
        self.val_shape_noise = float(opts.get("val_shape_noise", 0.0))
        self._val: dict[str, Any] | None = None

    def build_model(self) -> nn.Module:
        """``model: {arch: featmatch, proj_dim: D}`` trains a projection on the frozen backbone; else a MatchNet."""
        cfg = dict(self.model_cfg or {})
        if cfg.pop("arch", "matchnet") == "featmatch":
            from osop_ros.nets.featnets import FeatMatchNet, FeatMatchNetConfig

            return FeatMatchNet(FeatMatchNetConfig.from_dict({**FeatMatchNetConfig().to_dict(), **cfg}))
        return MatchNet(MatchNetConfig.from_dict({**MatchNetConfig().to_dict(), **cfg}) if cfg else None)

    def _embed(self, model: nn.Module, rgb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return model(rgb, mask)

    def step(self, model: nn.Module, rng: np.random.Generator, device: torch.device) -> dict[str, torch.Tensor]:
        objs = rng.choice(self.objs, size=min(self.groups, len(self.objs)), replace=False)
        q_idx, q_obj, t_rgb, t_mask, t_R, t_obj = [], [], [], [], [], []
        for oid in objs:
            inst = self.by_obj[int(oid)]
            sel = rng.choice(inst, size=min(self.q_per, len(inst)), replace=False)
            q_idx.extend(sel.tolist())
            q_obj.extend([oid] * len(sel))
            t_rgb.append(self.train["t_rgb"][sel])
            t_mask.append(self.train["t_mask"][sel])
            t_R.append(self.train["R_t"][sel])
            t_obj.extend([oid] * len(sel))
            row = self.t_index[int(oid)]
            views = rng.choice(self.tobj["rgb"].shape[1], size=self.v_neg, replace=False)
            t_rgb.append(self.tobj["rgb"][row, views])
            t_mask.append(self.tobj["mask"][row, views])
            t_R.append(self.tobj["R"][row, views])
            t_obj.extend([oid] * self.v_neg)
        q_idx_a = np.array(q_idx)
        S = self.train["q_rgb"].shape[1]
        q_rgb = to_tensor_rgb(self.train["q_rgb"][q_idx_a], device)
        q_mask = to_tensor_mask(self.train["q_mask"][q_idx_a], device)
        grid = affine_grid(len(q_idx_a), S, self.gen, 0.0, 0.08, 0.05, device)  # no rotation: it changes the label
        q_rgb, q_mask = warp(q_rgb, grid), warp(q_mask, grid, nearest=True)
        q_rgb = random_blur(color_jitter(q_rgb, self.gen), self.gen)
        q_rgb, q_mask = random_cutout(q_rgb, q_mask, self.gen, p=0.2)
        q_mask = mask_noise(q_mask, self.gen)
        if self.shape_noise > 0:
            q_mask = mask_shape_noise(q_mask, self.gen, p=self.shape_noise)
        net = model.module if hasattr(model, "module") else model
        if getattr(net.cfg, "objective", "contrastive") == "autoencoder":
            return self._ae_step(model, net, q_rgb, q_mask, q_idx_a, device)
        tr = to_tensor_rgb(np.concatenate(t_rgb), device)
        tm = to_tensor_mask(np.concatenate(t_mask), device)
        eq = self._embed(model, q_rgb, q_mask)
        et = self._embed(model, color_jitter(tr, self.gen, 0.05), tm)
        all_R = np.concatenate(t_R)
        q_obj_a, t_obj_a = np.array(q_obj), np.array(t_obj)
        ang = np.full((len(q_idx_a), len(all_R)), 180.0)
        for oid in objs:  # symmetry-aware angles within each object's group
            qi, ti = np.nonzero(q_obj_a == oid)[0], np.nonzero(t_obj_a == oid)[0]
            sym = self.tobj["sym_R"][self.t_index[int(oid)]] if "sym_R" in self.tobj else None
            ang[np.ix_(qi, ti)] = rotation_angles_deg(self.train["R_q"][q_idx_a[qi]], all_R[ti], sym)
        same = q_obj_a[:, None] == t_obj_a[None, :]
        target = np.where(same, np.exp(-0.5 * (ang / self.sigma) ** 2), 0.0)
        target = target / target.sum(1, keepdims=True).clip(1e-8)
        logits = net.logit_scale.exp().clamp(max=100) * eq @ et.T
        loss = -(torch.from_numpy(target).float().to(device) * logits.log_softmax(1)).sum(1).mean()
        with torch.no_grad():
            top1 = ang[np.arange(len(q_idx_a)), logits.argmax(1).cpu().numpy()]
        return {"loss": loss, "top1_angle": torch.tensor(float(np.median(top1)))}

    def _ae_step(
        self,
        model: nn.Module,
        net: nn.Module,
        q_rgb: torch.Tensor,
        q_mask: torch.Tensor,
        q_idx: np.ndarray,
        device: torch.device,
    ) -> dict[str, torch.Tensor]:
        """Augmented-autoencoder objective: reconstruct the clean rendering of the query's view from the
        augmented crop; bootstrapped L2 = mean of the 25 % largest per-pixel errors of each sample."""
        target = to_tensor_rgb(self.train["t_rgb"][q_idx], device) * to_tensor_mask(self.train["t_mask"][q_idx], device)
        z = net.embed_raw(q_rgb, q_mask)
        rec = net.decoder(z)
        err = ((rec - target) ** 2).sum(1).flatten(1)
        k = max(1, err.shape[1] // 4)
        loss = err.topk(k, dim=1).values.mean()
        return {"loss": loss}

    def _build_val(self) -> dict[str, Any]:
        from osop_ros.core.mesh import ObjectModel
        from osop_ros.core.render import Renderer
        from osop_ros.core.templates import TemplateBank, TemplateConfig
        from osop_ros.core.views import ViewGridConfig

        val = load_shards(self.val_dir, "instances")
        oids = [int(o) for o in np.unique(val["obj_id"])][: self.n_val_objects]
        cfg = TemplateConfig(
            views=ViewGridConfig(
                n_elevations=self.val_grid[0],
                n_azimuths=self.val_grid[1],
                n_inplane=self.val_grid[2],
                elevation_range_deg=(-90.0, 90.0),
            ),
            crop_size=val["q_rgb"].shape[1],
        )
        banks = {}
        with Renderer() as r:
            for oid in oids:
                model = ObjectModel.load(self.meshes_dir / "models" / f"obj_{oid:06d}.ply", units="mm")
                banks[oid] = TemplateBank.build(model, r, cfg, progress=False)
        keep = np.nonzero(np.isin(val["obj_id"], oids))[0][: self.max_val]
        vobj = load_objects(self.val_dir)
        syms = {int(o): vobj["sym_R"][i] for i, o in enumerate(vobj["obj_id"])} if "sym_R" in vobj else {}
        val = {k: v[keep] for k, v in val.items()}
        if self.val_shape_noise > 0:  # fixed seed: the same corrupted queries at every validation
            gen = torch.Generator().manual_seed(12345)
            m = mask_shape_noise(to_tensor_mask(val["q_mask"]), gen, p=self.val_shape_noise)
            val["q_mask"] = (m[:, 0].numpy() > 0.5).astype(val["q_mask"].dtype)  # {0, 1} like the shards
        return {"val": val, "banks": banks, "syms": syms}

    @torch.no_grad()
    def validate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        from osop_ros.core.matching import embed_templates, match_templates

        if self._val is None:
            self._val = self._build_val()
        val, banks = self._val["val"], self._val["banks"]
        errs = []
        for oid, bank in banks.items():
            emb = embed_templates(model, bank.rgb, bank.mask, device)
            idx = np.nonzero(val["obj_id"] == oid)[0]
            if len(idx) == 0:
                continue
            q = model(to_tensor_rgb(val["q_rgb"][idx], device), to_tensor_mask(val["q_mask"][idx], device))
            for j, i in enumerate(idx):
                res = match_templates(model, q[j], emb, bank.rgb, bank.mask, device, top_k=1)
                R = bank.poses[res.template_ids[0], :3, :3]
                d = np.radians(res.inplane_deg[0])
                Rz = np.array([[np.cos(d), -np.sin(d), 0], [np.sin(d), np.cos(d), 0], [0, 0, 1]])
                sym = self._val["syms"].get(oid)
                errs.append(
                    float(rotation_angles_deg(val["R_q"][i][None].astype(np.float64), (Rz @ R)[None], sym)[0, 0])
                )
        e = np.array(errs)
        return {
            "median_rot_err_deg": float(np.median(e)) if len(e) else 180.0,
            "within_15deg": float((e < 15).mean()) if len(e) else 0.0,
            "n": float(len(e)),
        }
