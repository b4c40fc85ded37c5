"""Tabletop scenes for ``osop data synth --layout tabletop``: objects resting on a textured table.

What a robot's RGB-D camera sees, instead of objects floating in front of a pasted photo:

* objects rest on a support plane (world ``z = 0``) on a convex-hull facet, chosen with probability
  proportional to ``area / h^2`` (``h``: height of the hull centroid above the facet, so broad, low facets
  win as under gravity), random yaw, packed in a cluster without interpenetrating footprints (they
  occlude each other from oblique views);
* a textured table (photo crop or procedural material, tiled) and, sometimes, a wall behind, rendered as
  geometry: they are in the depth image and take the light like the objects;
* one directional light from the upper hemisphere with a coloured tint (2800-7500 K), cast shadows from a
  shadow map rendered from the light, soft edges;
* cameras looking at the cluster from 15-85 degrees elevation at 0.3-1.5 m, focal lengths of 480-720 px
  at 640 px width, small roll;
* sensor effects: vignetting, white-balance error, then the generator's photometric degradation (noise,
  blur, JPEG), and structured-light/ToF depth noise (holes, edge dropouts, noise growing with z^2).

Lengths in metres, angles in degrees, images (H, W).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from osop_ros.core.geometry import invert_T, make_T, rotation_about_axis
from osop_ros.core.mesh import ObjectModel
from osop_ros.data import augment

if TYPE_CHECKING:
    from osop_ros.core.render import Renderer, RenderOutput

TABLE_KEY = "__tabletop_table__"
WALL_KEY = "__tabletop_wall__"
UP = np.array([0.0, 0.0, 1.0])


@dataclass(frozen=True)
class TabletopConfig:
    """Sampling ranges of :func:`render_tabletop`."""

    distance_per_diameter: tuple[float, float] = (2.5, 9.0)  # camera distance / mean object diameter
    distance_range: tuple[float, float] = (0.3, 1.5)  # clip of the camera distance
    elevation_range_deg: tuple[float, float] = (15.0, 85.0)
    roll_std_deg: float = 4.0
    fx_range: tuple[float, float] = (480.0, 720.0)  # at 640 px width
    cluster_radius: tuple[float, float] = (0.04, 0.3)
    footprint_margin: float = 1.0  # centres at least margin x (r_i + r_j) apart (footprint radii)
    table_half_size: float = 1.5
    table_tile: tuple[float, float] = (0.25, 1.2)  # metres per texture tile
    p_table_photo: float = 0.6
    p_wall: float = 0.45
    wall_distance: tuple[float, float] = (0.15, 1.0)  # behind the cluster, along the view azimuth
    light_elevation_deg: tuple[float, float] = (25.0, 90.0)
    p_shadow: float = 0.85
    shadow_strength: tuple[float, float] = (0.3, 0.75)
    shadow_blur_px: tuple[float, float] = (0.5, 3.0)
    light_kelvin: tuple[float, float] = (2800.0, 7500.0)
    p_vignette: float = 0.6
    vignette_strength: tuple[float, float] = (0.1, 0.45)
    white_balance_std: float = 0.06
    p_depth_noise: float = 0.9
    texture_size: int = 256


@dataclass
class TabletopScene:
    """One sampled tabletop image before rendering.

    T_cam_world: (4, 4) world (table) frame in the camera frame, metres.
    poses: per object T_cam_obj (4, 4); distractor: per object, not annotated as a target.
    light_dir_cam: (3,) direction in which the light travels (camera frame).
    """

    K: np.ndarray
    T_cam_world: np.ndarray
    obj_ids: list[int]
    poses: list[np.ndarray]
    distractor: list[bool]
    light_dir_cam: np.ndarray
    light_dir_world: np.ndarray
    wall: bool


# ----------------------------------------------------------------------------------------------- placement


def resting_rotation(hull: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """R_world_obj (3, 3) putting the object on a hull facet (weight area / h^2) with random yaw.

    hull: (N, 3) convex-hull points, model frame, metres.
    """
    from scipy.spatial import ConvexHull

    try:
        ch = ConvexHull(hull)
    except Exception:  # degenerate (flat) hull: any rotation with the normal down  # noqa: BLE001
        return rotation_about_axis(UP, rng.uniform(0, 2 * np.pi))
    tri = hull[ch.simplices]  # (F, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    normals, offsets = ch.equations[:, :3], ch.equations[:, 3]
    c = hull.mean(axis=0)
    h = np.maximum(-(normals @ c + offsets), 1e-4)  # centroid height above each facet plane
    w = area / h**2
    f = int(rng.choice(len(w), p=w / w.sum()))
    n = normals[f] / np.linalg.norm(normals[f])
    R = _rotation_between(n, -UP)
    return rotation_about_axis(UP, rng.uniform(0, 2 * np.pi)) @ R


def _rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 3) rotation taking unit vector ``a`` to unit vector ``b``."""
    v = np.cross(a, b)
    s, cth = float(np.linalg.norm(v)), float(np.dot(a, b))
    if s < 1e-9:
        if cth > 0:
            return np.eye(3)
        perp = np.cross(a, [1.0, 0.0, 0.0] if abs(a[0]) < 0.9 else [0.0, 1.0, 0.0])
        return rotation_about_axis(perp, np.pi)
    return rotation_about_axis(v, float(np.arctan2(s, cth)))


def look_at(cam_pos: np.ndarray, target: np.ndarray, roll: float = 0.0) -> np.ndarray:
    """T_world_cam (4, 4) of an OpenCV camera (x right, y down, z forward) at ``cam_pos`` looking at ``target``."""
    z = target - cam_pos
    z = z / np.linalg.norm(z)
    up = UP if abs(float(z @ UP)) < 0.999 else np.array([0.0, 1.0, 0.0])
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z], axis=1)
    if roll:
        R = R @ rotation_about_axis(np.array([0.0, 0.0, 1.0]), roll)
    return make_T(R, cam_pos)


def sample_tabletop(
    rng: np.random.Generator,
    pool: Sequence[int],
    n_main: int,
    n_distractors: int,
    diameters: dict[int, float],
    hull_of: Callable[[int], np.ndarray],
    width: int,
    height: int,
    cfg: TabletopConfig,
) -> TabletopScene:
    """Objects of ``pool`` resting in a cluster on the table, a camera looking at it, the light."""
    n_main = min(n_main, len(pool))
    n_dis = min(n_distractors, len(pool) - n_main)
    chosen = [int(i) for i in rng.choice(np.asarray(pool), size=n_main + n_dis, replace=False)]
    radius = rng.uniform(*cfg.cluster_radius)
    placed: list[tuple[int, np.ndarray, bool, np.ndarray, float]] = []  # oid, T_world_obj, dis, xy, r
    for k, oid in enumerate(chosen):
        hull = hull_of(oid)
        R = resting_rotation(hull, rng)
        p = hull @ R.T
        c_xy = 0.5 * (p[:, :2].min(0) + p[:, :2].max(0))
        r = float(np.linalg.norm(p[:, :2] - c_xy, axis=1).max())
        spread = radius + (0.2 if k >= n_main else 0.0)
        for _ in range(40):
            ang, rad = rng.uniform(0, 2 * np.pi), spread * np.sqrt(rng.random())
            xy = np.array([np.cos(ang), np.sin(ang)]) * rad
            if all(np.linalg.norm(xy - q) >= cfg.footprint_margin * (r + rq) for _, _, _, q, rq in placed):
                t = np.array([xy[0] - c_xy[0], xy[1] - c_xy[1], -p[:, 2].min()])
                placed.append((oid, make_T(R, t), k >= n_main, xy, r))
                break
    mains = [q for _, _, dis, q, _ in placed if not dis] or [np.zeros(2)]
    centre = np.mean(mains, axis=0)
    diam_mean = float(np.mean([diameters[o] for o, *_ in placed])) if placed else 0.1
    target = np.array([centre[0], centre[1], 0.3 * diam_mean]) + rng.normal(0, 0.02, 3)
    dist = float(np.clip(diam_mean * rng.uniform(*cfg.distance_per_diameter), *cfg.distance_range))
    el = np.deg2rad(rng.uniform(*cfg.elevation_range_deg))
    az = rng.uniform(0, 2 * np.pi)
    view = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    T_world_cam = look_at(target + dist * view, target, np.deg2rad(rng.normal(0, cfg.roll_std_deg)))
    T_cam_world = invert_T(T_world_cam)
    s = width / 640.0
    fx = rng.uniform(*cfg.fx_range) * s
    K = np.array([[fx, 0.0, (width - 1) / 2.0 + rng.uniform(-6, 6) * s],
                  [0.0, fx * rng.uniform(0.995, 1.005), (height - 1) / 2.0 + rng.uniform(-6, 6) * s],
                  [0.0, 0.0, 1.0]])
    lel = np.deg2rad(rng.uniform(*cfg.light_elevation_deg))
    laz = rng.uniform(0, 2 * np.pi)
    to_light = np.array([np.cos(lel) * np.cos(laz), np.cos(lel) * np.sin(laz), np.sin(lel)])
    light_dir_cam = T_cam_world[:3, :3] @ -to_light
    return TabletopScene(
        K=K,
        T_cam_world=T_cam_world,
        obj_ids=[o for o, *_ in placed],
        poses=[T_cam_world @ T for _, T, *_ in placed],
        distractor=[d for _, _, d, _, _ in placed],
        light_dir_cam=light_dir_cam,
        light_dir_world=-to_light,
        wall=bool(rng.random() < cfg.p_wall),
    )


# ----------------------------------------------------------------------------------------------- environment


def _texture(rng: np.random.Generator, photos: Sequence[Path], p_photo: float, size: int) -> np.ndarray:
    """(size, size, 3) uint8 table/wall texture: a photo crop or a procedural material, mirrored 2 x 2 so that
    the renderer's repeat tiles it without seams."""
    half = max(size // 2, 1)
    if photos and rng.random() < p_photo:
        tex = augment.photo_background(photos[int(rng.integers(len(photos)))], rng, half, half)
        if rng.random() < 0.4:  # desaturate towards wood/stone-like materials
            g = tex.mean(axis=2, keepdims=True)
            tex = (0.5 * tex + 0.5 * g).astype(np.uint8)
    else:
        tex = augment.procedural_background(rng, half, half)
    top = np.concatenate([tex, tex[:, ::-1]], axis=1)
    return np.ascontiguousarray(np.concatenate([top, top[::-1]], axis=0))


def _quad(name: str, corners: np.ndarray, uv: np.ndarray, texture: np.ndarray) -> ObjectModel:
    """A textured rectangle: corners (4, 3) metres in order around the rectangle, uv (4, 2)."""
    faces = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32)
    n = np.cross(corners[1] - corners[0], corners[2] - corners[0])
    n = np.tile(n / np.linalg.norm(n), (4, 1)).astype(np.float32)
    v = corners.astype(np.float32)
    return ObjectModel(
        name=name, path=None, vertices=v, faces=faces, normals=n, vertex_colors=None,
        uv=uv.astype(np.float32), texture=texture, diameter=float(np.linalg.norm(v[0] - v[2])),
        bbox_min=v.min(0).astype(np.float64), bbox_max=v.max(0).astype(np.float64),
    )


def add_environment(
    renderer: Renderer, scene: TabletopScene, rng: np.random.Generator, photos: Sequence[Path], cfg: TabletopConfig
) -> list[tuple[str, np.ndarray]]:
    """Upload this image's table (and wall) to ``renderer``; returns their (key, T_cam_obj) render entries."""
    L = cfg.table_half_size
    tile = rng.uniform(*cfg.table_tile)
    corners = np.array([[-L, -L, 0.0], [L, -L, 0.0], [L, L, 0.0], [-L, L, 0.0]])
    rot = rotation_about_axis(UP, rng.uniform(0, np.pi))[:2, :2]
    uv = (corners[:, :2] @ rot.T) / tile
    renderer.add_object(TABLE_KEY, _quad("table", corners, uv, _texture(rng, photos, cfg.p_table_photo,
                                                                        cfg.texture_size)))
    env = [(TABLE_KEY, scene.T_cam_world)]
    if scene.wall:
        cam_w = invert_T(scene.T_cam_world)[:3, 3]
        horiz = -cam_w[:2] / max(float(np.linalg.norm(cam_w[:2])), 1e-6)  # from the camera across the cluster
        d = rng.uniform(*cfg.wall_distance)
        base = horiz * d
        side = np.array([-horiz[1], horiz[0]]) * L
        hgt = rng.uniform(0.8, 2.0)
        wc = np.array([[*(base - side), 0.0], [*(base + side), 0.0], [*(base + side), hgt], [*(base - side), hgt]])
        wtile = rng.uniform(*cfg.table_tile)
        wuv = np.array([[0.0, 0.0], [2 * L, 0.0], [2 * L, hgt], [0.0, hgt]]) / wtile
        renderer.add_object(WALL_KEY, _quad("wall", wc, wuv, _texture(rng, photos, 0.5, cfg.texture_size)))
        env.append((WALL_KEY, scene.T_cam_world))
    return env


def kelvin_tint(kelvin: float) -> np.ndarray:
    """(3,) RGB gains of a light of colour temperature ``kelvin`` (approximate, mean 1)."""
    t = float(np.clip((kelvin - 2800.0) / (7500.0 - 2800.0), 0.0, 1.0))
    warm, cool = np.array([1.18, 0.98, 0.78]), np.array([0.9, 1.0, 1.12])
    g = (1 - t) * warm + t * cool
    return g / g.mean()


def shadow_factor(
    renderer: Renderer,
    scene: TabletopScene,
    objects: Sequence[tuple[str, np.ndarray]],
    depth: np.ndarray,
    rng: np.random.Generator,
    cfg: TabletopConfig,
    size: int = 384,
) -> np.ndarray:
    """(H, W) float32 in [0, 1]: how much of the light reaches each pixel (1 = lit), from a shadow map of the
    objects rendered along the light direction. ``depth`` (H, W) metres of the camera view (0 = nothing)."""
    H, W = depth.shape
    lit = np.ones((H, W), np.float32)
    if not objects:
        return lit
    T_world_cam = invert_T(scene.T_cam_world)
    centre = np.mean([(T_world_cam @ T)[:3, 3] for _, T in objects], axis=0)
    dist, half = 3.0, 0.9
    T_world_light = look_at(centre - dist * scene.light_dir_world, centre)
    T_light_cam = invert_T(T_world_light) @ T_world_cam
    f = (size / 2.0) * dist / half
    K_l = np.array([[f, 0.0, (size - 1) / 2.0], [0.0, f, (size - 1) / 2.0], [0.0, 0.0, 1.0]])
    T_light_world = invert_T(T_world_light)
    ents = [(key, T_light_world @ T_world_cam @ T) for key, T in objects]
    d_light = renderer.render(K_l, size, size, ents, znear=0.05, zfar=10.0).depth
    vs, us = np.nonzero(depth > 0)
    if not len(vs):
        return lit
    z = depth[vs, us].astype(np.float64)
    pc = np.stack([(us - scene.K[0, 2]) / scene.K[0, 0] * z, (vs - scene.K[1, 2]) / scene.K[1, 1] * z, z], axis=1)
    pl = pc @ T_light_cam[:3, :3].T + T_light_cam[:3, 3]
    ul = np.rint(pl[:, 0] / pl[:, 2] * f + K_l[0, 2]).astype(np.int64)
    vl = np.rint(pl[:, 1] / pl[:, 2] * f + K_l[1, 2]).astype(np.int64)
    ok = (ul >= 0) & (ul < size) & (vl >= 0) & (vl < size) & (pl[:, 2] > 0)
    occ = np.zeros(len(z), bool)
    dl = d_light[vl[ok], ul[ok]]
    occ[ok] = (dl > 0) & (dl < pl[ok, 2] - 0.006 - 0.004 * pl[ok, 2])
    strength = rng.uniform(*cfg.shadow_strength)
    lit[vs[occ], us[occ]] = 1.0 - strength
    sigma = rng.uniform(*cfg.shadow_blur_px)
    return cv2.GaussianBlur(lit, (0, 0), sigma) if sigma > 0.3 else lit


def vignette(img: np.ndarray, strength: float) -> np.ndarray:
    """Radial fall-off (1 - strength * r^2, r = 1 at the corners) of (H, W, 3) uint8."""
    H, W = img.shape[:2]
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    r2 = ((xs - (W - 1) / 2) ** 2 + (ys - (H - 1) / 2) ** 2) / (((W - 1) / 2) ** 2 + ((H - 1) / 2) ** 2)
    return np.clip(img.astype(np.float32) * (1.0 - strength * r2)[..., None], 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- rendering


@dataclass
class TabletopImage:
    """Rendered tabletop image: rgb (H, W, 3) uint8 (before photometric degradation), depth (H, W) float32 m
    (table, wall and objects; sensor noise applied when ``noisy_depth``), inst (H, W) uint8 (object index + 1 in
    ``scene.obj_ids``, 0 = table/wall/background), xyz (H, W, 3) float32 model coordinates (0 off objects)."""

    scene: TabletopScene
    rgb: np.ndarray
    depth: np.ndarray
    inst: np.ndarray
    xyz: np.ndarray
    render: RenderOutput


def render_tabletop(
    renderer: Renderer,
    scene: TabletopScene,
    rng: np.random.Generator,
    width: int,
    height: int,
    photos: Sequence[Path],
    cfg: TabletopConfig,
    ambient: float,
    diffuse: float,
    specular: float,
    albedo: Sequence[np.ndarray | None],
    background: np.ndarray,
) -> TabletopImage:
    """Render table, wall and objects (already added to ``renderer`` under ``str(obj_id)``) with shadows,
    light colour, vignetting and white balance over ``background`` (H, W, 3) uint8."""
    env = add_environment(renderer, scene, rng, photos, cfg)
    objs = [(str(o), T) for o, T in zip(scene.obj_ids, scene.poses, strict=True)]
    out = renderer.render(scene.K, width, height, env + objs, light_dir_cam=scene.light_dir_cam, ambient=ambient,
                          diffuse=diffuse, specular=specular, albedo=[None] * len(env) + list(albedo))
    n_env = len(env)
    inst = np.where(out.inst > n_env, out.inst - n_env, 0).astype(np.uint8)
    on_obj = inst > 0
    depth = out.depth.astype(np.float32)
    rgb = out.rgb.astype(np.float32)
    if rng.random() < cfg.p_shadow:
        rgb *= shadow_factor(renderer, scene, objs, depth, rng, cfg)[..., None]
    rgb *= kelvin_tint(rng.uniform(*cfg.light_kelvin))[None, None, :]
    img = np.where(out.mask[..., None], np.clip(rgb, 0, 255), background.astype(np.float32))
    img *= np.clip(rng.normal(1.0, cfg.white_balance_std, 3), 0.8, 1.2)[None, None, :]
    img8 = np.clip(img, 0, 255).astype(np.uint8)
    if rng.random() < cfg.p_vignette:
        img8 = vignette(img8, rng.uniform(*cfg.vignette_strength))
    xyz = np.where(on_obj[..., None], out.xyz, 0.0).astype(np.float32)
    if rng.random() < cfg.p_depth_noise:
        depth = augment.depth_noise(depth, rng)
    return TabletopImage(scene, img8, depth, inst, xyz, out)
