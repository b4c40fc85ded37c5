"""Synthetic BOP-format training/validation scenes rendered from the training mesh library.

Every image is sampled independently (seeded by ``(seed, split, scene, image)``): 3-8 objects of the split
plus 0-3 distractors of the same split, clustered so that they occlude each other, at 0.35-1.5 m, with
random full 3D or upright orientations, intrinsics close to a real RGB-D camera, random lighting, photo or
procedural background and photometric degradation (geometric augmentation is left to training time).

Layout written under ``out_dir`` (BOP, plus ``xyz/``)::

    models/                       links to the split's models + filtered models_info.json
    camera.json                   nominal camera (per-image K in scene_camera.json)
    test_targets_bop19.json       instances with visib_fract >= 0.1
    synth_info.json               config, seed, counts, throughput
    {split_dir}/{scene:06d}/rgb/{im:06d}.jpg   split_dir: train_synth (train) or test (val)
                            depth/{im:06d}.png               uint16, depth_scale 0.1 (0.1 mm units)
                            mask/{im:06d}_{inst:06d}.png     full silhouette (inside the image)
                            mask_visib/{im:06d}_{inst:06d}.png
                            xyz/{im:06d}.npz                 xyz (H, W, 3) float16 model coords (m), inst (H, W) uint8
                            scene_gt.json, scene_camera.json, scene_gt_info.json

``inst`` in the npz is the position in the image's ``scene_gt`` list + 1 (0 = background). Depth is the clean
rendered depth of the objects; behind them a random plane (or nothing) stands in for the table/wall.
Resumable: an image is finished when ``.partial/{im:06d}.json`` exists (written last), a scene when its three
JSON files exist.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from osop_ros.core.geometry import backproject, make_T, random_rotation, rotation_about_axis
from osop_ros.core.types import InvalidInputError
from osop_ros.data import augment
from osop_ros.data.meshes import atomic_write_bytes, atomic_write_json, list_images, load_manifest, split_object_ids
from osop_ros.data.tabletop import TabletopConfig, render_tabletop, sample_tabletop

if TYPE_CHECKING:
    from osop_ros.core.render import Renderer

log = logging.getLogger(__name__)

DEPTH_SCALE = 0.1  # BOP depth_scale: depth_mm = png_value * 0.1
SPLIT_CODES = {"train": 1, "val": 2}
MIN_VISIB_TARGET = 0.1
LAYOUTS = ("floating", "tabletop")


@dataclass(frozen=True)
class SynthConfig:
    """Scene sampling and rendering parameters (lengths in metres, angles in degrees, sizes in pixels)."""

    width: int = 640
    height: int = 480
    images_per_scene: int = 25
    objects_per_image: tuple[int, int] = (3, 8)
    distractors_per_image: tuple[int, int] = (0, 3)
    depth_range: tuple[float, float] = (0.35, 1.5)
    depth_spread: float = 0.12  # std of object depths around the cluster depth
    fx_range: tuple[float, float] = (570.0, 620.0)  # at 640 px width; scaled with the width
    principal_jitter: float = 8.0  # px at 640 px width
    p_upright: float = 0.35
    upright_tilt_deg: float = 10.0
    elevation_range_deg: tuple[float, float] = (5.0, 80.0)
    min_center_sep: float = 0.6  # centres at least this x (r_i + r_j) apart
    min_projected_diameter: float = 30.0  # px at 640 px width: annotated objects are placed no farther than this
    p_albedo_override: float = 0.1
    p_photo_background: float = 0.7
    p_background_plane: float = 0.8
    p_feather: float = 0.5
    ambient_range: tuple[float, float] = (0.15, 0.6)
    diffuse_range: tuple[float, float] = (0.3, 0.9)
    specular_range: tuple[float, float] = (0.0, 0.4)
    p_headlight: float = 0.15
    jpeg_quality: int = 95
    photometric: augment.PhotometricConfig = field(default_factory=augment.PhotometricConfig)
    # "floating": objects in front of a photo (the original generator); "tabletop": objects resting on a
    # textured table with shadows and sensor effects (osop_ros.data.tabletop)
    layout: str = "floating"
    tabletop: TabletopConfig = field(default_factory=TabletopConfig)

    def __post_init__(self) -> None:
        if self.width < 16 or self.height < 16:
            raise InvalidInputError(f"image size must be >= 16x16, got {self.width}x{self.height}")
        lo, hi = self.objects_per_image
        if lo < 1 or hi < lo:
            raise InvalidInputError(f"objects_per_image must be 1 <= lo <= hi, got {self.objects_per_image}")
        if lo + self.distractors_per_image[1] > 255:
            raise InvalidInputError("at most 255 instances per image (uint8 instance map)")
        if self.images_per_scene < 1:
            raise InvalidInputError("images_per_scene must be >= 1")
        if self.layout not in LAYOUTS:
            raise InvalidInputError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not 0 < self.depth_range[0] < self.depth_range[1] <= 6.5:
            raise InvalidInputError(f"depth_range must satisfy 0 < near < far <= 6.5 m, got {self.depth_range}")


@dataclass
class ImageSpec:
    """Everything random about one image (before background/augmentation)."""

    K: np.ndarray  # (3, 3)
    obj_ids: list[int]
    poses: list[np.ndarray]  # (4, 4) T_cam_obj, metres
    distractor: list[bool]
    light_dir_cam: np.ndarray | None
    ambient: float
    diffuse: float
    specular: float
    albedo: list[np.ndarray | None]


class MeshLibrary:
    """The mesh library directory of ``osop data meshes``: manifest, models_info and lazily loaded models."""

    def __init__(self, mesh_dir: str | Path) -> None:
        self.root = Path(mesh_dir)
        self.manifest = load_manifest(self.root)
        info_path = self.root / "models" / "models_info.json"
        try:
            self.models_info = {int(k): v for k, v in json.loads(info_path.read_text()).items()}
        except (OSError, ValueError) as exc:
            raise InvalidInputError(f"{info_path}: cannot read models_info ({exc})") from exc

    def object_ids(self, split: str) -> list[int]:
        ids = split_object_ids(self.manifest, split)
        missing = [i for i in ids if i not in self.models_info]
        if missing:
            raise InvalidInputError(f"{self.root}: objects {missing[:5]} of split {split!r} lack models_info entries")
        return ids

    def diameter(self, obj_id: int) -> float:
        """Metres."""
        return float(self.models_info[obj_id]["diameter"]) / 1000.0

    def model_path(self, obj_id: int) -> Path:
        return self.root / "models" / f"obj_{obj_id:06d}.ply"

    def load(self, obj_id: int) -> Any:
        from osop_ros.core.mesh import ObjectModel

        return ObjectModel.load(self.model_path(obj_id), units="mm", name=f"obj_{obj_id:06d}")


def _upright_rotation(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """R_cam_obj with the model +z roughly along the world up seen from a camera at a random elevation."""
    el = np.deg2rad(rng.uniform(*cfg.elevation_range_deg))
    up_cam = np.array([0.0, -np.cos(el), -np.sin(el)])
    # rotation taking model z to up_cam: columns x, y, z of R_cam_obj
    x = np.cross(np.array([0.0, -np.sin(el), np.cos(el)]), up_cam)  # camera-frame direction of model x (yaw 0)
    x /= np.linalg.norm(x)
    y = np.cross(up_cam, x)
    R = np.stack([x, y, up_cam], axis=1)
    R = R @ rotation_about_axis(np.array([0.0, 0.0, 1.0]), rng.uniform(0, 2 * np.pi))  # yaw about model z
    tilt_axis = rng.normal(size=3)
    return rotation_about_axis(tilt_axis, np.deg2rad(rng.normal(0, cfg.upright_tilt_deg))) @ R


def sample_intrinsics(rng: np.random.Generator, cfg: SynthConfig) -> np.ndarray:
    """(3, 3) K with fx ~ U(fx_range) (scaled to the width), fy ~ fx, jittered principal point."""
    s = cfg.width / 640.0
    fx = rng.uniform(*cfg.fx_range) * s
    fy = fx * rng.uniform(0.995, 1.005)
    cx = (cfg.width - 1) / 2.0 + rng.uniform(-1, 1) * cfg.principal_jitter * s
    cy = (cfg.height - 1) / 2.0 + rng.uniform(-1, 1) * cfg.principal_jitter * s
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def sample_image_spec(
    rng: np.random.Generator, pool: Sequence[int], diameters: dict[int, float], cfg: SynthConfig
) -> ImageSpec:
    """Random objects (from ``pool``), poses, intrinsics and lighting for one image."""
    if not pool:
        raise InvalidInputError("no objects to place")
    W, H = cfg.width, cfg.height
    K = sample_intrinsics(rng, cfg)
    n_main = min(int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1)), len(pool))
    n_dis = min(int(rng.integers(cfg.distractors_per_image[0], cfg.distractors_per_image[1] + 1)), len(pool) - n_main)
    chosen = [int(i) for i in rng.choice(np.asarray(pool), size=n_main + n_dis, replace=False)]
    near, far = cfg.depth_range
    z0 = rng.uniform(near, far)
    uc = rng.uniform(0.3, 0.7) * W
    vc = rng.uniform(0.3, 0.7) * H
    spread = rng.uniform(0.06, 0.2) * W
    obj_ids: list[int] = []
    poses: list[np.ndarray] = []
    distractor: list[bool] = []
    centres: list[tuple[np.ndarray, float]] = []
    for k, oid in enumerate(chosen):
        is_dis = k >= n_main
        r = diameters[oid] / 2.0
        placed = None
        for _ in range(30):
            z_far = (
                far if is_dis else float(np.clip(K[0, 0] * 2 * r / (cfg.min_projected_diameter * W / 640.0), near, far))
            )
            z = float(np.clip(z0 + rng.normal(0, cfg.depth_spread), near, z_far))
            if is_dis:
                u, v = rng.uniform(-0.05, 1.05) * W, rng.uniform(-0.05, 1.05) * H
            else:
                u = float(np.clip(uc + rng.normal(0, spread), 0.05 * W, 0.95 * W))
                v = float(np.clip(vc + rng.normal(0, spread), 0.05 * H, 0.95 * H))
            c = backproject(np.array([[u, v]]), np.array([z]), K)[0]
            if all(np.linalg.norm(c - c2) >= cfg.min_center_sep * (r + r2) for c2, r2 in centres):
                placed = c
                break
        if placed is None:
            continue
        R = _upright_rotation(rng, cfg) if rng.random() < cfg.p_upright else random_rotation(rng)
        centres.append((placed, r))
        obj_ids.append(oid)
        poses.append(make_T(R, placed))
        distractor.append(is_dis)
    if rng.random() < cfg.p_headlight:
        light = None
    else:
        d = rng.normal(size=3)
        d[2] = abs(d[2]) + 0.3  # light travels away from the camera side
        light = d / np.linalg.norm(d)
    albedo: list[np.ndarray | None] = [
        rng.uniform(0.05, 1.0, size=3) if rng.random() < cfg.p_albedo_override else None for _ in obj_ids
    ]
    return ImageSpec(
        K=K,
        obj_ids=obj_ids,
        poses=poses,
        distractor=distractor,
        light_dir_cam=light,
        ambient=float(rng.uniform(*cfg.ambient_range)),
        diffuse=float(rng.uniform(*cfg.diffuse_range)),
        specular=float(rng.uniform(*cfg.specular_range)) if rng.random() < 0.6 else 0.0,
        albedo=albedo,
    )


def background_plane_depth(
    rng: np.random.Generator, K: np.ndarray, width: int, height: int, z_behind: float, max_tilt_deg: float = 35.0
) -> np.ndarray:
    """(H, W) float32 depth of a random plane crossing the optical axis at ``z_behind`` metres; 0 where the
    plane is not in front of the camera or farther than 6.5 m."""
    tilt = np.deg2rad(rng.uniform(0, max_tilt_deg))
    az = rng.uniform(0, 2 * np.pi)
    n = np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), np.cos(tilt)])  # plane normal
    us, vs = np.meshgrid(np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64))
    rx = (us - K[0, 2]) / K[0, 0]
    ry = (vs - K[1, 2]) / K[1, 1]
    denom = n[0] * rx + n[1] * ry + n[2]
    with np.errstate(divide="ignore", invalid="ignore"):
        z = n[2] * z_behind / denom
    z[~np.isfinite(z) | (z <= 0) | (z > 6.5)] = 0.0
    return z.astype(np.float32)


def encode_png(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover
        raise InvalidInputError("PNG encoding failed")
    return buf.tobytes()


def bbox_xywh(mask: np.ndarray, x_off: int = 0, y_off: int = 0) -> list[int]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [-1, -1, -1, -1]
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0 + x_off, y0 + y_off, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def instance_annotation(
    obj_id: int, T: np.ndarray, visib: np.ndarray, full_crop: np.ndarray, x0: int, y0: int, depth_valid: np.ndarray
) -> tuple[np.ndarray, dict[str, Any], dict[str, Any]]:
    """BOP ground truth of one instance.

    visib: (H, W) bool visible mask; full_crop: (h, w) bool unoccluded silhouette whose top-left pixel is
    (x0, y0) in image coordinates (may lie outside the image); depth_valid: (H, W) bool pixels with depth;
    T: (4, 4) T_cam_obj in metres. Returns (full mask (H, W) bool inside the image, scene_gt entry,
    scene_gt_info entry).
    """
    H, W = visib.shape
    full = np.zeros((H, W), bool)
    if full_crop.size:
        ys, xs = np.nonzero(full_crop)
        xs, ys = xs + x0, ys + y0
        ok = (xs >= 0) & (xs < W) & (ys >= 0) & (ys < H)
        full[ys[ok], xs[ok]] = True
    full |= visib  # rasterisation is identical; guards against tiny differences
    px_all = int(max(full_crop.sum() if full_crop.size else 0, full.sum()))
    px_vis = int(visib.sum())
    gt = {
        "cam_R_m2c": [float(x) for x in T[:3, :3].reshape(-1)],
        "cam_t_m2c": [float(x) * 1000.0 for x in T[:3, 3]],
        "obj_id": int(obj_id),
    }
    info = {
        "bbox_obj": bbox_xywh(full_crop, x0, y0) if full_crop.size else [-1, -1, -1, -1],
        "bbox_visib": bbox_xywh(visib),
        "px_count_all": px_all,
        "px_count_valid": int((full & depth_valid).sum()),
        "px_count_visib": px_vis,
        "visib_fract": float(px_vis / px_all) if px_all > 0 else 0.0,
    }
    return full, gt, info


class SynthGenerator:
    """Renders BOP scenes for one split of a :class:`MeshLibrary` with a :class:`~osop_ros.core.render.Renderer`."""

    def __init__(
        self,
        library: MeshLibrary,
        renderer: Renderer,
        config: SynthConfig | None = None,
        backgrounds: Sequence[Path] = (),
    ) -> None:
        self.library = library
        self.renderer = renderer
        self.cfg = config or SynthConfig()
        self.backgrounds = list(backgrounds)
        self._hull: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------------ objects
    def _ensure(self, obj_id: int) -> np.ndarray:
        """Upload ``obj_id`` once; returns its convex-hull points (H, 3) metres (for projected extents)."""
        hull = self._hull.get(obj_id)
        if hull is None:
            model = self.library.load(obj_id)
            self.renderer.add_object(str(obj_id), model)
            hull = model.hull_points()
            self._hull[obj_id] = hull
        return hull

    def _full_mask(self, obj_id: int, T: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Unoccluded silhouette of one object over its projected bbox, in a canvas 3x the image (BOP style).

        Returns (mask (h, w) bool, x0, y0): the mask's top-left pixel in image coordinates (may be negative).
        """
        W, H = self.cfg.width, self.cfg.height
        hull = self._ensure(obj_id)
        pc = hull @ T[:3, :3].T + T[:3, 3]
        uv = pc[:, :2] / pc[:, 2:3] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
        x0 = int(math.floor(uv[:, 0].min())) - 2
        y0 = int(math.floor(uv[:, 1].min())) - 2
        x1 = int(math.ceil(uv[:, 0].max())) + 3
        y1 = int(math.ceil(uv[:, 1].max())) + 3
        x0, y0 = max(x0, -W), max(y0, -H)
        x1, y1 = min(x1, 2 * W), min(y1, 2 * H)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((0, 0), bool), 0, 0
        w = int(64 * math.ceil((x1 - x0) / 64))  # round up: reuse the renderer's cached framebuffers
        h = int(64 * math.ceil((y1 - y0) / 64))
        Kw = K.copy()
        Kw[0, 2] -= x0
        Kw[1, 2] -= y0
        out = self.renderer.render(Kw, w, h, [(str(obj_id), T)])
        return out.mask, x0, y0

    # ------------------------------------------------------------------ one image
    def _compose_floating(
        self, rng: np.random.Generator, pool: Sequence[int], diam: dict[int, float]
    ) -> tuple[ImageSpec, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Objects floating in front of a photo/procedural background -> (spec, rgb, depth, inst, xyz)."""
        cfg = self.cfg
        W, H = cfg.width, cfg.height
        spec = sample_image_spec(rng, pool, diam, cfg)
        for oid in spec.obj_ids:
            self._ensure(oid)
        objs = [(str(oid), T) for oid, T in zip(spec.obj_ids, spec.poses, strict=True)]
        out = self.renderer.render(
            spec.K,
            W,
            H,
            objs,
            light_dir_cam=spec.light_dir_cam,
            ambient=spec.ambient,
            diffuse=spec.diffuse,
            specular=spec.specular,
            albedo=spec.albedo,
        )
        # background, compositing, photometric degradation
        bg = augment.random_background(rng, H, W, self.backgrounds, cfg.p_photo_background)
        feather = 0.6 if rng.random() < cfg.p_feather else 0.0
        rgb = augment.composite(out.rgb, out.mask, bg, feather_sigma=feather)
        rgb = augment.photometric_augment(rgb, rng, cfg.photometric)
        depth = out.depth.astype(np.float32)
        if rng.random() < cfg.p_background_plane and out.mask.any():
            z_behind = float(depth[out.mask].max()) + rng.uniform(0.03, 0.6)
            plane = background_plane_depth(rng, spec.K, W, H, z_behind)
            depth = np.where(out.mask, depth, plane).astype(np.float32)
        inst = out.inst.astype(np.uint8)
        xyz = np.where(out.mask[..., None], out.xyz, 0.0).astype(np.float32)
        return spec, rgb, depth, inst, xyz

    def _compose_tabletop(
        self, rng: np.random.Generator, pool: Sequence[int], diam: dict[int, float]
    ) -> tuple[ImageSpec, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Objects resting on a textured table (:mod:`osop_ros.data.tabletop`) -> (spec, rgb, depth, inst, xyz)."""
        cfg = self.cfg
        W, H = cfg.width, cfg.height
        n_main = int(rng.integers(cfg.objects_per_image[0], cfg.objects_per_image[1] + 1))
        n_dis = int(rng.integers(cfg.distractors_per_image[0], cfg.distractors_per_image[1] + 1))
        scene = sample_tabletop(rng, pool, n_main, n_dis, diam, self._ensure, W, H, cfg.tabletop)
        albedo = [rng.uniform(0.05, 1.0, size=3) if rng.random() < cfg.p_albedo_override else None
                  for _ in scene.obj_ids]
        bg = augment.random_background(rng, H, W, self.backgrounds, cfg.p_photo_background)
        img = render_tabletop(
            self.renderer, scene, rng, W, H, self.backgrounds, cfg.tabletop,
            ambient=float(rng.uniform(*cfg.ambient_range)), diffuse=float(rng.uniform(*cfg.diffuse_range)),
            specular=float(rng.uniform(*cfg.specular_range)) if rng.random() < 0.6 else 0.0,
            albedo=albedo, background=bg,
        )
        rgb = augment.photometric_augment(img.rgb, rng, cfg.photometric)
        spec = ImageSpec(K=scene.K, obj_ids=scene.obj_ids, poses=scene.poses, distractor=scene.distractor,
                         light_dir_cam=scene.light_dir_cam, ambient=0.0, diffuse=0.0, specular=0.0, albedo=albedo)
        return spec, rgb, img.depth, img.inst, img.xyz

    def render_image(self, rng: np.random.Generator, pool: Sequence[int]) -> dict[str, Any]:
        """Sample and render one image. Returns rgb (H,W,3) u8, depth (H,W) f32 m, xyz (H,W,3) f32, inst (H,W) u8,
        masks / masks_visib lists of (H,W) bool, and the BOP JSON entries gt / camera / gt_info."""
        cfg = self.cfg
        diam = {i: self.library.diameter(i) for i in pool}
        if cfg.layout == "tabletop":
            spec, rgb, depth, inst, xyz = self._compose_tabletop(rng, pool, diam)
        else:
            spec, rgb, depth, inst, xyz = self._compose_floating(rng, pool, diam)

        gt, gt_info, masks, masks_visib = [], [], [], []
        for k, (oid, T) in enumerate(zip(spec.obj_ids, spec.poses, strict=True)):
            visib = inst == k + 1
            fm, x0, y0 = self._full_mask(oid, T, spec.K)
            full, g, info = instance_annotation(int(oid), T, visib, fm, x0, y0, depth > 0)
            gt.append(g)
            gt_info.append(info)
            masks.append(full)
            masks_visib.append(visib)
        camera = {"cam_K": [float(x) for x in spec.K.reshape(-1)], "depth_scale": DEPTH_SCALE}
        return {
            "rgb": rgb,
            "depth": depth,
            "xyz": xyz,
            "inst": inst,
            "masks": masks,
            "masks_visib": masks_visib,
            "gt": gt,
            "gt_info": gt_info,
            "camera": camera,
            "distractor": spec.distractor,
        }

    # ------------------------------------------------------------------ files
    def write_image(self, scene_dir: Path, im_id: int, data: dict[str, Any]) -> None:
        """Write one image's files atomically; the ``.partial`` JSON last (marks the image finished)."""
        q = int(self.cfg.jpeg_quality)
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(data["rgb"], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
        if not ok:  # pragma: no cover
            raise InvalidInputError("JPEG encoding failed")
        atomic_write_bytes(scene_dir / "rgb" / f"{im_id:06d}.jpg", buf.tobytes())
        d = np.clip(np.round(data["depth"] * 1000.0 / DEPTH_SCALE), 0, 65535).astype(np.uint16)
        atomic_write_bytes(scene_dir / "depth" / f"{im_id:06d}.png", encode_png(d))
        for k, (m, mv) in enumerate(zip(data["masks"], data["masks_visib"], strict=True)):
            atomic_write_bytes(scene_dir / "mask" / f"{im_id:06d}_{k:06d}.png", encode_png(m.astype(np.uint8) * 255))
            atomic_write_bytes(
                scene_dir / "mask_visib" / f"{im_id:06d}_{k:06d}.png", encode_png(mv.astype(np.uint8) * 255)
            )
        bio = io.BytesIO()
        np.savez_compressed(bio, xyz=data["xyz"].astype(np.float16), inst=data["inst"].astype(np.uint8))
        atomic_write_bytes(scene_dir / "xyz" / f"{im_id:06d}.npz", bio.getvalue())
        atomic_write_json(
            scene_dir / ".partial" / f"{im_id:06d}.json",
            {"gt": data["gt"], "gt_info": data["gt_info"], "camera": data["camera"]},
            indent=None,
        )

    @staticmethod
    def scene_complete(scene_dir: Path) -> bool:
        return all((scene_dir / n).is_file() for n in ("scene_gt.json", "scene_camera.json", "scene_gt_info.json"))

    def finish_scene(self, scene_dir: Path, n_images: int) -> None:
        """Merge the per-image partial JSONs into the BOP scene files; remove ``.partial``."""
        gt, cam, info = {}, {}, {}
        for im_id in range(n_images):
            p = json.loads((scene_dir / ".partial" / f"{im_id:06d}.json").read_text())
            gt[str(im_id)] = p["gt"]
            cam[str(im_id)] = p["camera"]
            info[str(im_id)] = p["gt_info"]
        atomic_write_json(scene_dir / "scene_gt_info.json", info)
        atomic_write_json(scene_dir / "scene_camera.json", cam)
        atomic_write_json(scene_dir / "scene_gt.json", gt)  # last: its presence marks the scene complete
        shutil.rmtree(scene_dir / ".partial", ignore_errors=True)

    # ------------------------------------------------------------------ dataset
    def __call__(
        self,
        out_dir: str | Path,
        split: str,
        n_scenes: int,
        seed: int = 0,
        split_dir: str | None = None,
        progress: bool = True,
    ) -> dict[str, Any]:
        """Render ``n_scenes`` scenes of ``split`` into ``out_dir`` (resuming finished work); returns stats."""
        from tqdm import tqdm

        if split not in SPLIT_CODES:
            raise InvalidInputError(f"split must be 'train' or 'val', got {split!r}")
        if n_scenes < 1:
            raise InvalidInputError(f"--scenes must be >= 1, got {n_scenes}")
        cfg = self.cfg
        out_dir = Path(out_dir)
        split_dir = split_dir or default_split_dir(split)
        pool = self.library.object_ids(split)
        if not pool:
            raise InvalidInputError(f"the mesh library has no {split!r} objects")
        out_dir.mkdir(parents=True, exist_ok=True)
        self._check_previous_run(out_dir, split, seed, split_dir)
        link_models(self.library, pool, out_dir / "models")
        n_per = cfg.images_per_scene
        todo: list[tuple[int, int]] = []
        for s in range(n_scenes):
            sd = out_dir / split_dir / f"{s:06d}"
            if self.scene_complete(sd):
                continue
            todo += [(s, i) for i in range(n_per) if not (sd / ".partial" / f"{i:06d}.json").is_file()]
        n_total = n_scenes * n_per
        log.info(
            "%s: %d of %d images to render (%d objects in split %r)", out_dir, len(todo), n_total, len(pool), split
        )
        t0 = time.perf_counter()
        done = 0
        bar = tqdm(
            total=n_total,
            initial=n_total - len(todo),
            desc=f"synth {split}",
            disable=not progress,
            unit="img",
            mininterval=2.0,
        )
        by_scene: dict[int, list[int]] = {}
        for s, i in todo:
            by_scene.setdefault(s, []).append(i)
        for s in range(n_scenes):
            sd = out_dir / split_dir / f"{s:06d}"
            if self.scene_complete(sd):
                continue
            for i in by_scene.get(s, []):
                rng = np.random.default_rng([seed, SPLIT_CODES[split], s, i])
                self.write_image(sd, i, self.render_image(rng, pool))
                done += 1
                bar.update(1)
            self.finish_scene(sd, n_per)
        bar.close()
        elapsed = time.perf_counter() - t0
        targets = write_test_targets(out_dir, split_dir, n_scenes)
        stats = {
            "split": split,
            "split_dir": split_dir,
            "scenes": n_scenes,
            "images": n_total,
            "rendered_now": done,
            "seconds": round(elapsed, 2),
            "images_per_s": round(done / elapsed, 3) if done and elapsed > 0 else None,
            "objects_in_split": len(pool),
            "test_targets": len(targets),
        }
        write_dataset_files(out_dir, cfg, split, seed, stats, self.library.root)
        return stats

    def _check_previous_run(self, out_dir: Path, split: str, seed: int, split_dir: str) -> None:
        p = out_dir / "synth_info.json"
        if not p.is_file():
            return
        try:
            prev = json.loads(p.read_text())
        except ValueError:
            return
        same = (
            prev.get("split") == split
            and prev.get("seed") == seed
            and prev.get("split_dir") == split_dir
            and _same_config(prev.get("config"), json.loads(json.dumps(asdict(self.cfg))))
            and prev.get("mesh_dir") == str(self.library.root)
        )
        if not same:
            raise InvalidInputError(
                f"{out_dir} holds a synth run with other settings (split, seed, config or meshes); use another --out"
            )


def _same_config(prev: Any, cur: dict[str, Any]) -> bool:
    """Whether a previous run's config equals ``cur``; keys the previous run did not know (added to
    :class:`SynthConfig` later) count as equal when ``cur`` holds their default."""
    if not isinstance(prev, dict):
        return False
    defaults = json.loads(json.dumps(asdict(SynthConfig())))
    return all(prev.get(k, defaults.get(k)) == v for k, v in cur.items()) and set(prev) <= set(cur)


def default_split_dir(split: str) -> str:
    """Scene folder of a split: ``train_synth`` for training data, ``test`` for validation data (so that
    ``osop eval --dataset DIR`` finds it with its default split and uses ``test_targets_bop19.json``)."""
    return "train_synth" if split == "train" else "test"


def link_models(library: MeshLibrary, obj_ids: Sequence[int], models_dir: Path) -> None:
    """``models_dir`` with links (copies where links fail) to the split's PLYs and a filtered models_info.json."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for oid in obj_ids:
        src = library.model_path(oid).resolve()
        dst = models_dir / src.name
        if dst.exists() or dst.is_symlink():
            continue
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    info = {str(i): library.models_info[i] for i in sorted(obj_ids)}
    atomic_write_json(models_dir / "models_info.json", info)


def write_test_targets(
    out_dir: Path, split_dir: str, n_scenes: int, min_visib: float = MIN_VISIB_TARGET
) -> list[dict[str, int]]:
    """BOP ``test_targets_bop19.json`` over the complete scenes: per (scene, image, obj) the number of instances
    with ``visib_fract >= min_visib``."""
    targets: list[dict[str, int]] = []
    for s in range(n_scenes):
        sd = out_dir / split_dir / f"{s:06d}"
        if not SynthGenerator.scene_complete(sd):
            continue
        gt = json.loads((sd / "scene_gt.json").read_text())
        info = json.loads((sd / "scene_gt_info.json").read_text())
        for im in sorted(gt, key=int):
            counts: dict[int, int] = {}
            for g, inf in zip(gt[im], info[im], strict=True):
                if inf["visib_fract"] >= min_visib:
                    counts[int(g["obj_id"])] = counts.get(int(g["obj_id"]), 0) + 1
            targets += [
                {"im_id": int(im), "inst_count": c, "obj_id": o, "scene_id": s} for o, c in sorted(counts.items())
            ]
    atomic_write_json(out_dir / "test_targets_bop19.json", targets)
    return targets


def write_dataset_files(
    out_dir: Path, cfg: SynthConfig, split: str, seed: int, stats: dict[str, Any], mesh_dir: Path
) -> None:
    """Nominal ``camera.json`` and ``synth_info.json`` (config, seed, stats)."""
    fx = sum(cfg.fx_range) / 2 * cfg.width / 640.0
    atomic_write_json(
        out_dir / "camera.json",
        {
            "cx": (cfg.width - 1) / 2.0,
            "cy": (cfg.height - 1) / 2.0,
            "depth_scale": DEPTH_SCALE,
            "fx": fx,
            "fy": fx,
            "height": cfg.height,
            "width": cfg.width,
        },
    )
    conf = asdict(cfg)
    atomic_write_json(
        out_dir / "synth_info.json",
        {
            "format": "osop_ros synthetic BOP v1 "
            "(+xyz/*.npz: xyz float16 m model frame, inst uint8 = scene_gt index + 1)",
            "split": split,
            "split_dir": stats["split_dir"],
            "seed": seed,
            "mesh_dir": str(mesh_dir),
            "config": conf,
            "stats": stats,
        },
    )


def make_generator(
    mesh_dir: str | Path,
    renderer: Renderer,
    config: SynthConfig | None = None,
    backgrounds_dir: str | Path | None = None,
) -> SynthGenerator:
    """Convenience constructor: library from ``mesh_dir`` and photo backgrounds from ``backgrounds_dir``."""
    return SynthGenerator(MeshLibrary(mesh_dir), renderer, config, list_images(backgrounds_dir))
