"""Turn synthetic BOP scenes (``osop data synth``) into compact training shards for stages 1-3.

For every visible instance (visib_fract >= ``min_visib``): the query crop framed on its visible
mask (the rule used at test time, with jitter), its visible mask and object coordinates, and a
template rendered like the template bank but at the instance's own viewpoint perturbed by a
random rotation (what a top-1 template match looks like). For every object: a mini template bank
of random views (negatives for stage 2, template vectors for stage 1). For every image: a
downscaled copy with a per-pixel object-id map (stage 1 targets).

Layout of ``out_dir``: ``instances-NNNN.npz``, ``images-NNNN.npz``, ``objects.npz``, ``done.json``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from osop_ros.core.geometry import (
    CropBox,
    centred_view_rotation,
    make_T,
    mask_to_box,
    random_rotation,
    rotation_about_axis,
    symmetry_transforms,
)
from osop_ros.core.mesh import ObjectModel
from osop_ros.core.render import Renderer
from osop_ros.core.templates import TemplateConfig, render_view
from osop_ros.data.meshes import APPEARANCE_SYMMETRIC_MODE

log = logging.getLogger(__name__)


@dataclass
class PrepareConfig:
    """Knobs of the shard preparation."""

    crop_size: int = 64
    image_width: int = 320  # stage-1 image resolution (height follows the aspect ratio)
    min_visib: float = 0.25
    min_px: int = 300
    views_per_object: int = 32
    perturb_deg: float = 8.0  # std of the viewpoint perturbation of the paired template
    inplane_deg: float = 6.0  # max residual in-plane rotation of the paired template
    pad_jitter: tuple[float, float] = (1.1, 1.35)
    shift_jitter: float = 0.06
    shard_size: int = 2000
    seed: int = 0
    instances: bool = True  # False: stage-1 shards only (no instance crops / paired templates)


def perturb_rotation(
    R: np.ndarray, rng: np.random.Generator, std_deg: float, inplane_deg: float
) -> tuple[np.ndarray, float]:
    """Random viewpoint perturbation (random axis, |N(0, std)| angle) then in-plane jitter; returns (R', angle_deg)."""
    axis = rng.normal(size=3)
    ang = np.radians(abs(rng.normal(0.0, std_deg)))
    Rp = rotation_about_axis(axis, ang) @ R
    Rp = rotation_about_axis(np.array([0.0, 0.0, 1.0]), np.radians(rng.uniform(-inplane_deg, inplane_deg))) @ Rp
    c = (np.trace(Rp.T @ R) - 1) / 2
    return Rp, float(np.degrees(np.arccos(np.clip(c, -1, 1))))


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Models(dict):
    """obj_id -> ObjectModel, loaded on first use from a BOP ``models/`` dir (mm)."""

    def __init__(self, meshes_dir: Path) -> None:
        super().__init__()
        self.dir = meshes_dir / "models"
        self.info = _read_json(self.dir / "models_info.json")

    def __contains__(self, oid: object) -> bool:
        return str(oid) in self.info

    def __missing__(self, oid: int) -> ObjectModel:
        m = ObjectModel.load(
            self.dir / f"obj_{oid:06d}.ply", units="mm", name=f"obj_{oid:06d}", symmetries=self.info[str(oid)]
        )
        self[oid] = m
        return m


def _scene_dirs(root: Path) -> list[Path]:
    """Directories holding a ``scene_gt.json`` below ``root`` (symlinks followed)."""
    return sorted(Path(d) for d, _, files in os.walk(root, followlinks=True) if "scene_gt.json" in files)


MAX_SYM = 72


def visual_symmetry_rotations(model: ObjectModel, colour_mode: str) -> np.ndarray:
    """(MAX_SYM, 3, 3) rotations ``S`` with ``R ~ R @ S`` (identity-padded).

    Only uniformly coloured objects are visually symmetric; textured ones look different under
    their geometric symmetries, so they get the identity only. Continuous symmetries: 10 deg steps.
    """
    out = np.tile(np.eye(3, dtype=np.float32), (MAX_SYM, 1, 1))
    if colour_mode != APPEARANCE_SYMMETRIC_MODE or not model.symmetries.is_symmetric:
        return out
    Ts = symmetry_transforms(model.symmetries, max_step_rad=np.radians(10.0))[:MAX_SYM]
    out[: len(Ts)] = np.stack([T[:3, :3] for T in Ts])
    return out


class ShardWriter:
    """Accumulates dict-of-list samples and flushes npz shards of ``shard_size`` samples."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int, start_index: int = 0) -> None:
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.buf: dict[str, list[np.ndarray]] = {}
        self.index = start_index
        self.count = 0

    def add(self, **arrays: np.ndarray) -> None:
        for k, v in arrays.items():
            self.buf.setdefault(k, []).append(np.asarray(v))
        self.count += 1
        if len(next(iter(self.buf.values()))) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.buf or not next(iter(self.buf.values())):
            return
        path = self.out_dir / f"{self.prefix}-{self.index:04d}.npz"
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **{k: np.stack(v) for k, v in self.buf.items()})
        os.replace(tmp, path)
        self.index += 1
        self.buf = {}


def prepare(synth_dir: Path, meshes_dir: Path, out_dir: Path, cfg: PrepareConfig | None = None) -> dict:
    """Write shards for all scenes under ``synth_dir`` (BOP layout). Returns summary counts."""
    from tqdm import tqdm

    cfg = cfg or PrepareConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "done.json").exists():
        log.info("%s already prepared", out_dir)
        return _read_json(out_dir / "done.json")
    rng = np.random.default_rng(cfg.seed)
    models = _Models(meshes_dir)
    tcfg = TemplateConfig(crop_size=cfg.crop_size)
    S = cfg.crop_size
    scene_dirs = _scene_dirs(synth_dir)
    inst_w = ShardWriter(out_dir, "instances", cfg.shard_size)
    img_w = ShardWriter(out_dir, "images", cfg.shard_size)
    used_objects: set[int] = set()
    t0 = time.time()
    with Renderer() as renderer:
        for sdir in tqdm(scene_dirs, desc="scenes"):
            scene_gt = _read_json(sdir / "scene_gt.json")
            scene_cam = _read_json(sdir / "scene_camera.json")
            scene_info = _read_json(sdir / "scene_gt_info.json")
            for im_key, gts in scene_gt.items():
                im = int(im_key)
                rgb_path = next((sdir / "rgb").glob(f"{im:06d}.*"), None)
                xyz_path = sdir / "xyz" / f"{im:06d}.npz"
                if rgb_path is None or not xyz_path.exists():
                    continue
                rgb = cv2.cvtColor(cv2.imread(str(rgb_path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
                with np.load(xyz_path, allow_pickle=False) as z:
                    xyz_img = z["xyz"].astype(np.float32)
                    inst_img = z["inst"].astype(np.int32)
                K = np.asarray(scene_cam[im_key]["cam_K"], dtype=np.float64).reshape(3, 3)
                H, W = rgb.shape[:2]
                objmap = np.zeros((H, W), np.int32)
                for j, gt in enumerate(gts):
                    objmap[inst_img == j + 1] = int(gt["obj_id"])
                sw = cfg.image_width
                sh = round(H * sw / W)
                img_w.add(
                    rgb=cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA),
                    objmap=cv2.resize(objmap.astype(np.uint16), (sw, sh), interpolation=cv2.INTER_NEAREST),
                )
                for j, gt in enumerate(gts):
                    info = scene_info[im_key][j]
                    oid = int(gt["obj_id"])
                    if oid not in models or info.get("visib_fract", 0) < cfg.min_visib:
                        continue
                    vis = inst_img == j + 1
                    if vis.sum() < cfg.min_px:
                        continue
                    used_objects.add(oid)
                    if not cfg.instances:
                        continue
                    model = models[oid]
                    key = f"obj{oid}"
                    if not renderer.has_object(key):
                        renderer.add_object(key, model)
                    T = make_T(np.asarray(gt["cam_R_m2c"]).reshape(3, 3), np.asarray(gt["cam_t_m2c"]) / 1000.0)
                    box = mask_to_box(vis)
                    assert box is not None
                    cb = CropBox.from_box(box, pad=rng.uniform(*cfg.pad_jitter))
                    d = cfg.shift_jitter * cb.side
                    cb = CropBox(cb.cx + rng.uniform(-d, d), cb.cy + rng.uniform(-d, d), cb.side)
                    q_rgb = cb.apply(rgb, S)
                    q_mask = cb.apply(vis.astype(np.uint8), S, cv2.INTER_NEAREST)
                    q_xyz = cb.apply(np.where(vis[..., None], xyz_img, 0).astype(np.float32), S, cv2.INTER_NEAREST)
                    Rc = centred_view_rotation(T, model.center)
                    Rt, ang = perturb_rotation(Rc, rng, cfg.perturb_deg, cfg.inplane_deg)
                    t_rgb, t_mask, t_xyz, _, _ = render_view(renderer, key, model, Rt, tcfg)
                    inst_w.add(
                        q_rgb=q_rgb,
                        q_mask=q_mask,
                        q_xyz=q_xyz.astype(np.float16),
                        t_rgb=t_rgb,
                        t_mask=t_mask.astype(np.uint8),
                        t_xyz=t_xyz.astype(np.float16),
                        obj_id=np.int32(oid),
                        R_q=Rc.astype(np.float32),
                        R_t=Rt.astype(np.float32),
                        angle_deg=np.float32(ang),
                        center=model.center.astype(np.float32),
                        diameter=np.float32(model.diameter),
                        K=K.astype(np.float32),
                    )
        inst_w.flush()
        img_w.flush()
        # mini template banks for every object that has instances
        oids = sorted(used_objects)
        V = cfg.views_per_object
        manifest = _read_json(meshes_dir / "manifest.json") if (meshes_dir / "manifest.json").exists() else {}
        colour = {int(o["obj_id"]): o.get("colour_mode", "") for o in manifest.get("objects", [])}
        mb = {
            "obj_id": np.array(oids, np.int32),
            "sym_R": np.stack([visual_symmetry_rotations(models[o], colour.get(o, "")) for o in oids]).astype(
                np.float32
            ),
            "rgb": np.zeros((len(oids), V, S, S, 3), np.uint8),
            "mask": np.zeros((len(oids), V, S, S), np.uint8),
            "R": np.zeros((len(oids), V, 3, 3), np.float32),
            "center": np.zeros((len(oids), 3), np.float32),
            "diameter": np.zeros(len(oids), np.float32),
        }
        for i, oid in enumerate(tqdm(oids, desc="mini banks")):
            model = models[oid]
            key = f"obj{oid}"
            if not renderer.has_object(key):
                renderer.add_object(key, model)
            mb["center"][i] = model.center
            mb["diameter"][i] = model.diameter
            for v in range(V):
                R = random_rotation(rng)
                r, m, _, _, _ = render_view(renderer, key, model, R, tcfg)
                mb["rgb"][i, v], mb["mask"][i, v], mb["R"][i, v] = r, m, R
        tmp = out_dir / "objects.tmp.npz"
        np.savez(tmp, **mb)
        os.replace(tmp, out_dir / "objects.npz")
    summary = {
        "instances": inst_w.count,
        "images": img_w.count,
        "objects": len(used_objects),
        "seconds": round(time.time() - t0, 1),
        "synth_dir": str(synth_dir),
    }
    with open(out_dir / "done.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    log.info("prepared %s", summary)
    return summary
