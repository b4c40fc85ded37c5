"""Held-out RGB-D test set in a style independent of the training generator (:mod:`osop_ros.data.synth`).

Evaluation only: it measures how much a network learned "the renderer" instead of objects. Every part of
the image formation differs from ``synth.py``:

* **Objects** -- not the pybullet_data meshes of the training library: procedural everyday objects built
  here with trimesh (chamfered and rounded boxes, rimmed cans, lathe-profile bottles, mugs with a torus
  handle, cones/funnels, extruded L-brackets and star/polygon prisms, torus rings, capsules), 50-250 mm,
  subdivided and split at creases (sharp shading), written as ``models/obj_XXXXXX.ply`` in millimetres with
  vertex colours.
* **Colours** -- per-vertex procedural schemes instead of photo-crop textures or uniform/patch HSV colours:
  z-bands, "labels" (an azimuth sector with stripes), oriented stripes, 3D checkers, two-tone plane splits,
  polka dots, from pastel / saturated / duotone palettes. Only rotation-invariant z-bands on solids of
  revolution get a BOP ``symmetries_continuous`` entry (axis z through the origin); every other scheme
  is asymmetric by construction (random directions, first band != last band, plus a directional tint).
* **Shading** -- the project renderer is used for geometry only (unlit albedo pass, a pass with normals
  encoded as vertex colours, solo silhouettes and a shadow map); the light transport is computed here in
  numpy: one coloured point light with inverse-square falloff, Blinn-Phong specular with per-object
  gloss, hemisphere ambient (sky / ground bounce) and hard shadows from a light-view depth map, exposure,
  a soft tone curve and gamma -- unlike synth's in-shader Lambert + directional/head light clamped LDR.
* **Scenes** -- static BOP-style scenes: 3-6 objects resting on a textured ground plane in stable
  orientations, pushed together until they touch or nearly touch (footprint rasters), seen by a camera
  orbiting at 30-70 deg elevation from 0.4-1.2 m with roll, fx 500-650 px, principal point off-centre by
  up to 20 px; the ground is a 12 m quad with a procedural tile / wood-plank / value-noise / gingham
  texture (never the ImageNet photos), the far background a dim wall gradient.
* **Sensor** -- RGB: white-balance colour cast, vignetting, optical blur, signal-dependent (Poisson-like)
  plus read noise in linear space, JPEG q 70-90. Depth: sigma = 1.5 mm (z / 0.5 m)^2 noise, dropout at
  depth discontinuities and grazing angles, random invalid blobs, 3.5 m range, quantised to 1 mm
  (``depth_scale`` 1.0). Masks and GT come from the clean render.

Layout (BOP)::

    models/{models_info.json, obj_XXXXXX.ply}   camera.json   test_targets_bop19.json   heldout_info.json
    test/{scene:06d}/rgb/{im:06d}.jpg, depth/{im:06d}.png (uint16 mm), mask/ and mask_visib/
        {im:06d}_{gt:06d}.png, scene_gt.json, scene_camera.json (+ cam_R_w2c, cam_t_w2c), scene_gt_info.json

Every object of a scene is listed in each of its images (BOP convention); ``visib_fract`` is the visible
(occlusion-aware, instance-map) pixel count over the solo silhouette on a canvas 3x the image, and the
targets are the instances with ``visib_fract >= 0.1``. Resumable and atomic per image: an image is done
when ``.partial/{im:06d}.json`` exists (written last), a scene when its ``scene_gt.json`` exists.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from osop_ros.core.geometry import invert_T, look_at, make_T, rotation_about_axis
from osop_ros.core.types import InvalidInputError
from osop_ros.data.meshes import atomic_write_bytes, atomic_write_json
from osop_ros.data.synth import encode_png, instance_annotation

if TYPE_CHECKING:
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer

log = logging.getLogger(__name__)

DEPTH_SCALE = 1.0  # BOP depth_scale: depth png value * 1.0 = mm (1 mm quantisation)
MIN_VISIB_TARGET = 0.1
MAX_FACES = 24000
SPLIT = "test"
KINDS = ("chamfer_box", "can", "bottle", "mug", "cone", "bracket", "prism", "torus", "capsule", "rounded_box")
REVOLVED = ("can", "bottle", "cone", "torus", "capsule")  # solids of revolution about model z
GROUND_STYLES = ("tiles", "planks", "noise", "gingham")

STYLE = [
    "objects: procedural trimesh everyday shapes (boxes, cans, bottles, mugs, cones, brackets, prisms, tori, "
    "capsules), not pybullet_data",
    "colours: per-vertex bands/labels/stripes/checkers/two-tone/dots from pastel, saturated or duotone palettes, "
    "no photo textures",
    "shading: numpy point light + Blinn-Phong + hemisphere ambient + hard shadow map on renderer geometry passes",
    "scenes: objects resting and touching on a procedural textured ground plane, camera 30-70 deg elevation, "
    "0.4-1.2 m, fx 500-650 px, principal point +-20 px",
    "sensor: colour cast, vignetting, blur, Poisson-like noise, JPEG 70-90; depth 1.5 mm (z/0.5 m)^2 noise, "
    "edge/grazing dropout, invalid blobs, 1 mm quantisation",
]


@dataclass(frozen=True)
class HeldoutConfig:
    """Sampling and sensor parameters (lengths in metres unless named _mm, angles in degrees, sizes in pixels;
    pixel quantities are given at 640 px width and scaled with ``width``)."""

    width: int = 640
    height: int = 480
    images_per_scene: int = 10
    objects_per_scene: tuple[int, int] = (3, 6)
    object_size_mm: tuple[float, float] = (50.0, 250.0)  # diameter (largest vertex distance)
    fx_range: tuple[float, float] = (500.0, 650.0)
    principal_offset: float = 20.0
    elevation_deg: tuple[float, float] = (30.0, 70.0)
    distance: tuple[float, float] = (0.4, 1.2)
    roll_deg: float = 10.0
    p_touch: float = 0.45  # probability that an object is pushed until it touches its neighbours
    ground_half_extent: float = 6.0
    shadow_map_size: int = 512
    depth_sigma_mm: float = 1.5  # at 0.5 m, grows with z^2
    depth_max: float = 3.5
    edge_dropout: float = 0.6
    invalid_blobs: tuple[int, int] = (3, 12)
    jpeg_quality: tuple[int, int] = (70, 90)

    def __post_init__(self) -> None:
        if self.width < 32 or self.height < 32:
            raise InvalidInputError(f"image size must be >= 32x32, got {self.width}x{self.height}")
        if self.images_per_scene < 1:
            raise InvalidInputError("images_per_scene must be >= 1")
        lo, hi = self.objects_per_scene
        if lo < 1 or hi < lo or hi > 250:
            raise InvalidInputError(f"objects_per_scene must be 1 <= lo <= hi <= 250, got {self.objects_per_scene}")

    @property
    def px(self) -> float:
        """Pixel scale relative to 640 px width."""
        return self.width / 640.0


@dataclass
class HeldoutObject:
    """One procedural object: geometry/colour recipe and material (for heldout_info.json)."""

    obj_id: int
    kind: str
    colouring: str
    palette: str
    size_mm: float
    symmetric: bool
    specular: float
    shininess: float
    faces: int = 0
    diameter_mm: float = 0.0


@dataclass
class SceneLayout:
    """A static scene: objects resting on the ground plane (world frame: z up, ground z = 0, metres)."""

    obj_ids: list[int]
    T_world_obj: list[np.ndarray]  # (4, 4)
    ground_style: str
    ground_texture: np.ndarray  # (S, S, 3) uint8
    tile_m: float  # ground texture repeat period in metres
    ground_specular: float
    centre: np.ndarray  # (3,) look-at centre of the cluster
    radius: float  # cluster bounding radius


# =============================================================================================== objects


def _rot(axis: tuple[float, float, float], deg: float) -> np.ndarray:
    return rotation_about_axis(np.asarray(axis, dtype=np.float64), math.radians(deg))


def _revolve(profile: list[tuple[float, float]], sections: int = 64) -> Any:
    """Solid of revolution about z of a (radius, z) profile from the axis to the axis (mm)."""
    import trimesh

    prof = np.asarray(profile, dtype=np.float64)
    step = 2 * np.pi * prof[:, 0].max() / sections  # profile segments ~ as long as the arc between sections
    dense = [prof[:1]]
    for a, b in zip(prof[:-1], prof[1:], strict=True):
        n = max(1, int(math.ceil(np.linalg.norm(b - a) / step)))
        dense.append(a + (b - a) * np.linspace(0, 1, n + 1)[1:, None])
    mesh = trimesh.creation.revolve(np.vstack(dense), sections=sections)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def _extrude(poly: np.ndarray, depth: float, kernel: np.ndarray) -> Any:
    """Prism of a CCW simple polygon (n, 2) mm along z, caps fan-triangulated from ``kernel`` (a point that
    sees every vertex: star-shaped polygons)."""
    import trimesh

    n = len(poly)
    bot = np.c_[poly, np.zeros(n)]
    top = np.c_[poly, np.full(n, depth)]
    verts = np.vstack([bot, top, [[kernel[0], kernel[1], 0.0], [kernel[0], kernel[1], depth]]])
    i = np.arange(n)
    j = (i + 1) % n
    cb, ct = 2 * n, 2 * n + 1
    faces = np.vstack(
        [
            np.c_[i, j, n + j],
            np.c_[i, n + j, n + i],  # sides (outward for CCW)
            np.c_[np.full(n, ct), n + i, n + j],  # top, +z
            np.c_[np.full(n, cb), j, i],  # bottom, -z
        ]
    )
    return trimesh.Trimesh(verts, faces, process=True)


def _box_points(dims: np.ndarray, inset: np.ndarray) -> np.ndarray:
    s = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
    return s * (dims / 2.0 - inset)


def build_geometry(kind: str, size: float, rng: np.random.Generator) -> tuple[Any, list[np.ndarray]]:
    """Mesh (mm, largest bbox side ~ ``size``; rescaled later) of ``kind`` and its resting rotations (model -> world,
    before the random yaw)."""
    import trimesh

    I3 = np.eye(3)
    flip = _rot((1, 0, 0), 180)
    side = _rot((1, 0, 0), 90)
    if kind in ("chamfer_box", "rounded_box"):
        dims = size * np.array([1.0, rng.uniform(0.4, 0.9), rng.uniform(0.2, 0.75)])
        if kind == "chamfer_box":
            ch = rng.uniform(0.06, 0.16) * dims.min()
            pts = np.vstack([_box_points(dims, ch * (1 - np.eye(3)[k])) for k in range(3)])
        else:
            rr = rng.uniform(0.08, 0.22) * dims.min()
            ball = trimesh.creation.icosphere(subdivisions=2, radius=rr).vertices
            pts = (_box_points(dims, np.full(3, rr))[:, None, :] + ball[None]).reshape(-1, 3)
        mesh = trimesh.convex.convex_hull(pts)
        rests = [I3, flip, side, _rot((1, 0, 0), -90), _rot((0, 1, 0), 90), _rot((0, 1, 0), -90)]
    elif kind == "can":
        R = size / 2.0 * rng.uniform(0.5, 1.0)
        H = min(size, 2 * R * rng.uniform(0.8, 2.2))
        R = min(R, size / 2.0)
        e = 0.04 * H
        mesh = _revolve(
            [(0, 0), (0.93 * R, 0), (R, e), (R, H - e), (0.95 * R, H), (0.85 * R, H), (0.85 * R, H - e), (0, H - e)]
        )
        rests = [I3, I3, flip, side]
    elif kind == "bottle":
        H = size
        R = H / 2.0 / rng.uniform(1.8, 3.2)
        rn = R * rng.uniform(0.25, 0.45)
        hb, hs = H * rng.uniform(0.45, 0.6), H * rng.uniform(0.12, 0.22)
        hc = H * rng.uniform(0.06, 0.1)
        prof = [(0.0, 0.0), (0.9 * R, 0.0), (R, 0.03 * H), (R, hb)]
        for t in np.linspace(0, 1, 8)[1:]:
            prof.append((rn + (R - rn) * 0.5 * (1 + math.cos(math.pi * t)), hb + hs * t))
        prof += [(rn, H - hc), (1.2 * rn, H - hc), (1.2 * rn, H), (0.0, H)]
        mesh = _revolve(prof)
        rests = [I3, I3, side]
    elif kind == "mug":
        R = size / 2.0 * rng.uniform(0.55, 0.75)
        H = min(size, 2 * R * rng.uniform(0.8, 1.3))
        t, b = R * rng.uniform(0.06, 0.1), H * rng.uniform(0.06, 0.1)
        cup = _revolve([(0, 0), (R, 0), (R, H), (R - t, H), (R - t, b), (0, b)])
        rm, rh = H * rng.uniform(0.05, 0.08), H * rng.uniform(0.22, 0.3)  # handle tube and ring radii
        handle = trimesh.creation.torus(rh, rm, major_sections=48, minor_sections=16)
        handle.apply_transform(make_T(_rot((1, 0, 0), 90), np.array([R - 0.8 * t + rh + rm, 0.0, H / 2.0])))
        if handle.volume < 0:
            handle.invert()
        mesh = trimesh.util.concatenate([cup, handle])
        rests = [I3, I3, flip]
    elif kind == "cone":
        H = size * rng.uniform(0.7, 1.0)
        R = min(size / 2.0, H * rng.uniform(0.35, 0.6))
        if rng.random() < 0.5:  # traffic cone: base disc + truncated cone
            rt = R * rng.uniform(0.1, 0.3)
            hb = 0.06 * H
            mesh = _revolve([(0, 0), (R, 0), (R, hb), (0.8 * R, hb), (rt, H), (0, H)])
            rests = [I3]
        else:  # funnel: spout + frustum, resting on its wide end
            rs, hs = R * rng.uniform(0.15, 0.3), H * rng.uniform(0.25, 0.4)
            mesh = _revolve([(0, 0), (rs, 0), (rs, hs), (R, H), (0, H)])
            rests = [flip]
    elif kind == "bracket":
        A = size
        B = A * rng.uniform(0.4, 0.9)
        t = B * rng.uniform(0.12, 0.25)
        D = A * rng.uniform(0.2, 0.6)
        poly = np.array([(0, 0), (A, 0), (A, t), (t, t), (t, B), (0, B)], dtype=np.float64)
        mesh = _extrude(poly, D, np.array([t / 2, t / 2]))
        rests = [I3, flip, side, _rot((0, 1, 0), -90)]
    elif kind == "prism":
        n = int(rng.choice([3, 5, 6, 8, 10]))
        ang = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, np.pi)
        rad = np.ones(n)
        if n == 10:  # five-pointed star
            rad[1::2] = rng.uniform(0.45, 0.6)
        poly = np.c_[np.cos(ang) * rad, np.sin(ang) * rad] * size / 2.0
        mesh = _extrude(poly, size * rng.uniform(0.15, 0.8), np.zeros(2))
        rests = [I3, flip]
    elif kind == "torus":
        r_ratio = rng.uniform(0.18, 0.35)
        R = size / 2.0 / (1 + r_ratio)
        mesh = trimesh.creation.torus(R, R * r_ratio, major_sections=64, minor_sections=24)
        rests = [I3, flip]
    elif kind == "capsule":
        r = size * rng.uniform(0.12, 0.3)
        mesh = trimesh.creation.capsule(height=size - 2 * r, radius=r, count=[48, 24])
        rests = [side]
    else:
        raise InvalidInputError(f"unknown object kind {kind!r}; known: {KINDS}")
    return mesh, rests


def _palette(rng: np.random.Generator, n: int) -> tuple[np.ndarray, str]:
    """(n, 3) float RGB in [0, 1] of distinct colours and the palette name."""
    name = str(rng.choice(["pastel", "saturated", "duotone"]))
    h0 = rng.uniform(0, 1)
    hues = (h0 + 0.618034 * np.arange(n)) % 1.0
    if name == "pastel":
        s, v = rng.uniform(0.2, 0.42, n), rng.uniform(0.85, 1.0, n)
    elif name == "saturated":
        s, v = rng.uniform(0.75, 1.0, n), rng.uniform(0.55, 0.95, n)
    else:  # two complementary hues, near-white, near-black, then lighter / darker variants of the hues
        sat, val = rng.uniform(0.6, 0.9), rng.uniform(0.55, 0.8)
        base = [
            (h0, sat, val),
            ((h0 + 0.5) % 1.0, sat, val),
            (h0, 0.05, 0.95),
            (h0, 0.1, 0.12),
            (h0, 0.35 * sat, 1.0),
            ((h0 + 0.5) % 1.0, sat, 0.45 * val),
        ]
        hues, s, v = (np.array([base[k % 6][j] for k in range(n)]) for j in range(3))
    hsv = np.stack([hues * 180.0, s * 255.0, v * 255.0], axis=1).astype(np.uint8)[None]
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0].astype(np.float64) / 255.0
    return rgb, name


def colour_vertices(kind: str, verts: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str, str, bool]:
    """Per-vertex colours (N, 3) uint8 for vertices (N, 3) mm; returns (colours, scheme, palette, symmetric).

    ``symmetric`` is True only for z-bands on solids of revolution: the colour then depends on z alone, so
    every rotation about the model z axis maps the coloured object onto itself.
    """
    pal, pal_name = _palette(rng, 6)
    lo, hi = verts.min(0), verts.max(0)
    size = float((hi - lo).max())
    p = verts - (lo + hi) / 2.0
    z = verts[:, 2]

    def bands() -> np.ndarray:
        k = int(rng.integers(2, 6))
        cuts = np.sort(rng.uniform(lo[2], hi[2], k - 1))
        idx = np.searchsorted(cuts, z)
        order = rng.permutation(len(pal))[:k] if k <= len(pal) else np.arange(k) % len(pal)
        if order[0] == order[-1]:
            order[-1] = (order[0] + 1) % len(pal)
        return pal[order[idx]]

    revolved = kind in REVOLVED
    schemes = (
        ["bands_z", "label", "stripes", "checker", "dots"] if revolved else ["stripes", "checker", "two_tone", "dots"]
    )
    probs = np.array([0.5, 0.2, 0.1, 0.1, 0.1]) if revolved else None
    scheme = str(rng.choice(schemes, p=probs))
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    if scheme == "bands_z":
        c = bands()
    elif scheme == "label":
        c = bands()
        az = np.arctan2(p[:, 1], p[:, 0])
        a0, width = rng.uniform(-np.pi, np.pi), rng.uniform(0.6, 2.6)
        z0 = rng.uniform(lo[2] + 0.1 * (hi[2] - lo[2]), lo[2] + 0.45 * (hi[2] - lo[2]))
        z1 = z0 + rng.uniform(0.2, 0.45) * (hi[2] - lo[2])
        inside = (((az - a0) % (2 * np.pi)) < width) & (z > z0) & (z < z1)
        stripe = (np.floor((z - z0) / max((z1 - z0) / rng.integers(2, 6), 1e-6)) % 2).astype(int)
        c[inside] = np.where(stripe[inside, None] == 0, pal[4], pal[5])
    elif scheme == "stripes":
        w = rng.uniform(0.06, 0.2) * size
        idx = np.floor((p @ d + rng.uniform(0, w)) / w).astype(int) % int(rng.integers(2, 4))
        c = pal[idx]
    elif scheme == "checker":
        R = rotation_about_axis(rng.normal(size=3), rng.uniform(0, np.pi))
        w = rng.uniform(0.1, 0.25) * size
        q = np.floor((p @ R.T + rng.uniform(0, w, 3)) / w).astype(int)
        c = pal[q.sum(1) % 2]
    elif scheme == "two_tone":
        off = rng.uniform(-0.3, 0.3) * size
        c = np.where((p @ d > off)[:, None], pal[0], pal[1])
        band = np.abs(p @ d - off) < rng.uniform(0.02, 0.05) * size
        c[band] = pal[2]
    else:  # dots
        c = np.repeat(pal[:1], len(verts), axis=0)
        r = rng.uniform(0.05, 0.12) * size
        for k, ci in enumerate(rng.choice(len(verts), size=int(rng.integers(6, 20)), replace=False)):
            c[np.linalg.norm(verts - verts[ci], axis=1) < r] = pal[1 + k % 3]
    symmetric = revolved and scheme == "bands_z"
    if not symmetric:  # directional tint: breaks any residual symmetry of geometry and pattern
        c = c * (1.0 + rng.uniform(0.15, 0.3) * (p @ d) / size)[:, None]
    return np.clip(np.round(c * 255.0), 0, 255).astype(np.uint8), scheme, pal_name, symmetric


def make_object(
    obj_id: int, kind: str, rng: np.random.Generator, size_range: tuple[float, float]
) -> tuple[Any, HeldoutObject, list[np.ndarray]]:
    """Coloured trimesh (mm, bbox-centred; solids of revolution keep their axis on z), its record and rests."""
    import trimesh

    size = float(rng.uniform(*size_range))
    mesh, rests = build_geometry(kind, size, rng)
    lo, hi = mesh.bounds
    centre = (lo + hi) / 2.0
    if kind in REVOLVED:
        centre[:2] = 0.0  # keep the symmetry axis through the origin
    mesh.apply_translation(-centre)
    hull = np.asarray(mesh.convex_hull.vertices)
    diam = float(np.sqrt(((hull[:, None] - hull[None]) ** 2).sum(-1).max()))
    mesh.apply_scale(size / diam)  # BOP diameter = the sampled size
    max_edge = size / 35.0  # fine enough for vertex-colour patterns; at most MAX_FACES faces
    while True:
        v, f = trimesh.remesh.subdivide_to_size(mesh.vertices, mesh.faces, max_edge=max_edge)
        if len(f) <= MAX_FACES:
            break
        max_edge *= 1.3
    mesh = trimesh.Trimesh(v, f, process=False)
    mesh.merge_vertices()
    mesh = trimesh.graph.smooth_shade(mesh, angle=math.radians(35.0), facet_minarea=None)
    verts = np.asarray(mesh.vertices, dtype=np.float64)
    colours, scheme, pal_name, symmetric = colour_vertices(kind, verts, rng)
    glossy = rng.random() < 0.5
    rec = HeldoutObject(
        obj_id=obj_id,
        kind=kind,
        colouring=scheme,
        palette=pal_name,
        size_mm=round(size, 2),
        symmetric=symmetric,
        specular=round(float(rng.uniform(0.15, 0.6) if glossy else rng.uniform(0.01, 0.08)), 3),
        shininess=round(float(np.exp(rng.uniform(np.log(24), np.log(120))) if glossy else rng.uniform(3, 10)), 2),
        faces=len(mesh.faces),
    )
    out = trimesh.Trimesh(
        verts, np.asarray(mesh.faces), vertex_colors=np.c_[colours, np.full(len(colours), 255)], process=False
    )
    return out, rec, rests


def models_info_entry(model: ObjectModel, symmetric: bool) -> dict[str, Any]:
    """BOP models_info entry (mm) from the loaded model (metres)."""
    lo, hi = model.bbox_min * 1000.0, model.bbox_max * 1000.0
    info: dict[str, Any] = {
        "diameter": round(model.diameter * 1000.0, 5),
        "min_x": round(float(lo[0]), 5),
        "min_y": round(float(lo[1]), 5),
        "min_z": round(float(lo[2]), 5),
        "size_x": round(float(hi[0] - lo[0]), 5),
        "size_y": round(float(hi[1] - lo[1]), 5),
        "size_z": round(float(hi[2] - lo[2]), 5),
    }
    if symmetric:
        info["symmetries_continuous"] = [{"axis": [0, 0, 1], "offset": [0, 0, 0]}]
    return info


# =============================================================================================== ground


def _periodic_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(size, size) float32 smooth value noise in [0, 1] that tiles seamlessly."""
    g = rng.random((cells, cells)).astype(np.float32)
    g = np.pad(g, 2, mode="wrap")
    up = cv2.resize(g, ((cells + 4) * size // cells,) * 2, interpolation=cv2.INTER_CUBIC)
    o = 2 * size // cells
    return np.clip(up[o : o + size, o : o + size], 0, 1)


def ground_texture(rng: np.random.Generator, size: int = 512) -> tuple[np.ndarray, str, float]:
    """Procedural, seamlessly tiling ground texture (size, size, 3) uint8, its style and repeat period (m)."""
    style = str(rng.choice(GROUND_STYLES))
    pal, _ = _palette(rng, 4)
    fine = _periodic_noise(rng, size, 64)[..., None]
    mid = _periodic_noise(rng, size, 8)[..., None]
    if style == "tiles":
        n = int(rng.choice([2, 3, 4]))
        yy, xx = np.mgrid[0:size, 0:size]
        tile_id = (yy * n // size) * n + (xx * n // size)
        jitter = rng.uniform(0.85, 1.1, n * n)[tile_id][..., None]
        base = pal[0] * 0.6 + 0.4 * rng.uniform(0.3, 0.9)
        img = base * jitter * (0.9 + 0.2 * fine)
        gw = max(2, size // (40 * n)) * n
        grout = ((xx * n) % size < gw) | ((yy * n) % size < gw)
        img[grout] = rng.uniform(0.15, 0.85)
        period = rng.uniform(0.2, 0.6) * n / 2
    elif style == "planks":
        n = int(rng.choice([4, 6, 8]))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        plank = (yy // (size / n)).astype(int)
        shift = rng.uniform(0, 1, n)[plank]
        grain = 0.5 + 0.5 * np.sin(2 * np.pi * (6 * yy / size * n + 3 * mid[..., 0] + shift * 5))
        wood_a = np.array([0.55, 0.36, 0.2]) * rng.uniform(0.7, 1.3)
        wood_b = wood_a * rng.uniform(0.55, 0.8)
        img = wood_a + (wood_b - wood_a) * grain[..., None]
        img = img * (0.85 + 0.3 * rng.uniform(0, 1, n)[plank][..., None]) * (0.92 + 0.16 * fine)
        img[(yy % (size / n)) < max(1.5, size / 300)] *= 0.35
        period = rng.uniform(0.6, 1.4)
    elif style == "noise":
        t = _periodic_noise(rng, size, int(rng.choice([4, 8, 16])))
        t = 0.6 * t + 0.3 * mid[..., 0] + 0.1 * fine[..., 0]
        img = pal[0] + (pal[1] * 0.5 - pal[0]) * t[..., None]
        img = img * (0.8 + 0.4 * fine)
        period = rng.uniform(0.3, 1.0)
    else:  # gingham tablecloth
        n = int(rng.choice([4, 8]))
        yy, xx = np.mgrid[0:size, 0:size]
        a = (xx // (size // n)) % 2
        b = (yy // (size // n)) % 2
        white = np.array([0.93, 0.93, 0.9])
        img = white + (pal[0] - white)[None, None] * (0.5 * (a + b))[..., None]
        img = img * (0.93 + 0.14 * fine)
        period = rng.uniform(0.1, 0.3)
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8), style, float(period)


def ground_model(texture: np.ndarray, period: float, half_extent: float, angle: float) -> ObjectModel:
    """Textured quad z = 0 of +-``half_extent`` m (uv = rotated xy / period: the texture repeats)."""
    from osop_ros.core.mesh import ObjectModel

    e = half_extent
    v = np.array([[-e, -e, 0], [e, -e, 0], [e, e, 0], [-e, e, 0]], dtype=np.float32)
    c, s = math.cos(angle), math.sin(angle)
    uv = (v[:, :2] @ np.array([[c, -s], [s, c]], dtype=np.float32)) / period
    return ObjectModel(
        name="heldout_ground",
        path=None,
        vertices=v,
        faces=np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int32),
        normals=np.tile(np.array([0, 0, 1], np.float32), (4, 1)),
        vertex_colors=None,
        uv=uv.astype(np.float32),
        texture=texture,
        diameter=float(2 * math.sqrt(2) * e),
        bbox_min=v.min(0).astype(np.float64),
        bbox_max=v.max(0).astype(np.float64),
    )


# =============================================================================================== layout


def _footprint(pts_xy: np.ndarray, res: float) -> tuple[np.ndarray, np.ndarray]:
    """Raster of the convex hull of (N, 2) points (m) at ``res`` m per cell: (mask (h, w) bool, origin (2,) cells
    of the mask's corner relative to the object position)."""
    q = pts_xy / res
    o = np.floor(q.min(0)).astype(int) - 1
    qs = np.round(q - o).astype(np.int32)
    hull = cv2.convexHull(qs.reshape(-1, 1, 2))
    size = qs.max(0) + 3
    m = np.zeros((int(size[1]), int(size[0])), np.uint8)
    cv2.fillConvexPoly(m, hull, 1)
    return m.astype(bool), o


def sample_layout(
    rng: np.random.Generator,
    obj_ids: list[int],
    hulls: dict[int, np.ndarray],
    rests: dict[int, list[np.ndarray]],
    cfg: HeldoutConfig,
) -> SceneLayout:
    """Objects in stable rests with random yaw, pushed from random directions towards the cluster until they
    touch (or stop a few mm short); ground texture of the scene."""
    res, start = 0.002, 1.0  # 2 mm cells; objects slide in from 1 m
    n_cells = int(3.2 / res)
    occ = np.zeros((n_cells, n_cells), bool)
    mid = n_cells // 2
    Ts: list[np.ndarray] = []
    for k, oid in enumerate(obj_ids):
        choices = rests[oid]
        R = _rot((0, 0, 1), rng.uniform(0, 360)) @ choices[int(rng.integers(len(choices)))]
        pts = hulls[oid] @ R.T
        z0 = -pts[:, 2].min()
        fp, o = _footprint(pts[:, :2], res)
        gap = 0 if rng.random() < cfg.p_touch else int(rng.integers(3, 20))
        grown = cv2.dilate(occ.astype(np.uint8), np.ones((2 * gap + 1,) * 2, np.uint8)) > 0 if gap else occ

        def free(c: np.ndarray, fp: np.ndarray = fp, o: np.ndarray = o, grown: np.ndarray = grown) -> bool:
            x0, y0 = int(c[0] + o[0]), int(c[1] + o[1])
            if x0 < 0 or y0 < 0 or x0 + fp.shape[1] > n_cells or y0 + fp.shape[0] > n_cells:
                return False
            return not (grown[y0 : y0 + fp.shape[0], x0 : x0 + fp.shape[1]] & fp).any()

        if k == 0:
            pos = np.array([mid, mid], dtype=float)
        else:
            th = rng.uniform(0, 2 * np.pi)
            d = np.array([math.cos(th), math.sin(th)])
            pos = np.array([mid, mid], dtype=float) + d * (start / res)
            for step in np.arange(start / res, -1, -2.0):
                c = np.array([mid, mid]) + d * step
                if not free(np.round(c)):
                    break
                pos = c
        c = np.round(pos).astype(int)
        x0, y0 = c[0] + o[0], c[1] + o[1]
        occ[y0 : y0 + fp.shape[0], x0 : x0 + fp.shape[1]] |= fp
        t = np.array([(c[0] - mid) * res, (c[1] - mid) * res, z0])
        Ts.append(make_T(R, t))
    world_pts = np.vstack([hulls[oid] @ T[:3, :3].T + T[:3, 3] for oid, T in zip(obj_ids, Ts, strict=True)])
    centre = np.r_[(world_pts[:, :2].min(0) + world_pts[:, :2].max(0)) / 2.0, 0.0]
    for T in Ts:
        T[:2, 3] -= centre[:2]
    world_pts[:, :2] -= centre[:2]
    radius = float(np.linalg.norm(world_pts, axis=1).max())
    tex, style, period = ground_texture(rng)
    return SceneLayout(
        obj_ids=list(obj_ids),
        T_world_obj=Ts,
        ground_style=style,
        ground_texture=tex,
        tile_m=period,
        ground_specular=float(rng.uniform(0.02, 0.25)),
        centre=np.zeros(3),
        radius=radius,
    )


def sample_camera(
    rng: np.random.Generator, cfg: HeldoutConfig, layout: SceneLayout, world_pts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(K (3, 3), T_cam_world (4, 4)): orbit camera looking down at the cluster, >= 0.12 m from every object."""
    W, H, s = cfg.width, cfg.height, cfg.px
    fx = rng.uniform(*cfg.fx_range) * s
    K = np.array(
        [
            [fx, 0.0, (W - 1) / 2.0 + rng.uniform(-1, 1) * cfg.principal_offset * s],
            [0.0, fx * rng.uniform(0.997, 1.003), (H - 1) / 2.0 + rng.uniform(-1, 1) * cfg.principal_offset * s],
            [0.0, 0.0, 1.0],
        ]
    )
    for _ in range(50):
        el = math.radians(rng.uniform(*cfg.elevation_deg))
        az = rng.uniform(0, 2 * np.pi)
        dist = rng.uniform(*cfg.distance)
        target = layout.centre + np.r_[rng.normal(0, 0.25 * layout.radius, 2), rng.uniform(0.0, 0.05)]
        pos = target + dist * np.array([math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)])
        if np.linalg.norm(world_pts - pos, axis=1).min() >= 0.12:
            break
    T = look_at(pos, target, np.array([0.0, 0.0, 1.0]))
    roll = make_T(_rot((0, 0, 1), rng.uniform(-cfg.roll_deg, cfg.roll_deg)), np.zeros(3))
    return K, roll @ T


# =============================================================================================== imaging


def kelvin_rgb(kelvin: float) -> np.ndarray:
    """(3,) linear RGB of a black body (Tanner Helland's fit), normalised to unit luminance."""
    t = kelvin / 100.0
    r = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
    g = 99.4708025861 * math.log(t) - 161.1195681661 if t <= 66 else 288.1221695283 * (t - 60) ** -0.0755148492
    b = 255.0 if t >= 66 else (0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307)
    c = (np.clip([r, g, b], 1.0, 255.0) / 255.0) ** 2.2
    return c / float(c @ np.array([0.2126, 0.7152, 0.0722]))


def _backproject(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(H, W, 3) camera points (m) of a depth map (H, W) m."""
    H, W = depth.shape
    u, v = np.meshgrid(np.arange(W, dtype=np.float32), np.arange(H, dtype=np.float32))
    return np.stack([(u - K[0, 2]) / K[0, 0] * depth, (v - K[1, 2]) / K[1, 1] * depth, depth], axis=-1)


def shadow_visibility(
    P_cam: np.ndarray,
    normal_cam: np.ndarray,
    valid: np.ndarray,
    T_light_cam: np.ndarray,
    K_l: np.ndarray,
    shadow_depth: np.ndarray,
) -> np.ndarray:
    """(H, W) float32 1 = lit, 0 = in hard shadow: light-view depth test of camera points with slope bias."""
    S = shadow_depth.shape[0]
    p = P_cam[valid].astype(np.float64) @ T_light_cam[:3, :3].T + T_light_cam[:3, 3]
    n = normal_cam[valid].astype(np.float64) @ T_light_cam[:3, :3].T
    zl = np.maximum(p[:, 2], 1e-6)
    u = np.round(K_l[0, 0] * p[:, 0] / zl + K_l[0, 2]).astype(int)
    v = np.round(K_l[1, 1] * p[:, 1] / zl + K_l[1, 2]).astype(int)
    inside = (u >= 0) & (u < S) & (v >= 0) & (v < S)
    sm = np.zeros(len(p), np.float32)
    sm[inside] = shadow_depth[v[inside], u[inside]]
    cos_t = np.clip(np.abs((n * (-p / np.linalg.norm(p, axis=1, keepdims=True))).sum(1)), 0.05, 1.0)
    texel = zl / K_l[0, 0]
    bias = np.minimum(0.002 + 2.0 * texel * np.sqrt(1 - cos_t**2) / cos_t, 0.03)
    lit = ~((sm > 0) & (zl > sm + bias))
    out = np.ones(P_cam.shape[:2], np.float32)
    out[valid] = lit.astype(np.float32)
    return out


def sensor_rgb(lin: np.ndarray, rng: np.random.Generator, cfg: HeldoutConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Linear radiance (H, W, 3) -> uint8 sRGB after exposure, colour cast, vignetting, blur, shot/read noise."""
    H, W = lin.shape[:2]
    lum = lin @ np.array([0.2126, 0.7152, 0.0722], np.float32)
    expo = 0.45 / max(float(np.percentile(lum, 95)), 1e-3) * rng.uniform(0.75, 1.25)
    wb = float(rng.uniform(4200, 8500))
    cast = (kelvin_rgb(wb) / kelvin_rgb(6500.0)).astype(np.float32)
    img = lin * np.float32(expo) * cast
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    r2 = ((xx - W / 2) ** 2 + (yy - H / 2) ** 2) / ((W / 2) ** 2 + (H / 2) ** 2)
    img *= (1.0 - rng.uniform(0.1, 0.3) * r2)[..., None]
    sigma_blur = float(rng.uniform(0.4, 1.0) * max(cfg.px, 0.5))
    img = cv2.GaussianBlur(img, (0, 0), sigma_blur)
    a, b = rng.uniform(0.001, 0.006), rng.uniform(1e-5, 1e-4)
    img = img + rng.standard_normal(img.shape).astype(np.float32) * np.sqrt(a * np.maximum(img, 0) + b).astype(
        np.float32
    )
    img = np.clip(img, 0, None)
    img = img * 1.15 / (img + 0.15)  # soft shoulder, 1 -> 1
    out = np.clip(np.round(255.0 * np.clip(img, 0, 1) ** (1 / 2.2)), 0, 255).astype(np.uint8)
    return out, {
        "exposure": round(expo, 4),
        "wb_kelvin": round(wb),
        "blur_sigma": round(sigma_blur, 3),
        "shot_noise": round(float(a), 5),
        "read_noise_var": round(float(b), 6),
    }


def sensor_depth(
    z: np.ndarray, normal_cam: np.ndarray, P_cam: np.ndarray, rng: np.random.Generator, cfg: HeldoutConfig
) -> np.ndarray:
    """Clean depth (H, W) m -> uint16 mm: z^2 noise, edge / grazing dropout, invalid blobs, range limit."""
    H, W = z.shape
    valid = z > 0
    sigma = cfg.depth_sigma_mm * 1e-3 * (z / 0.5) ** 2
    d = z + rng.standard_normal(z.shape).astype(np.float32) * sigma
    zb = np.where(valid, z, 100.0).astype(np.float32)
    k3 = np.ones((3, 3), np.uint8)
    rng_local = cv2.dilate(np.where(valid, z, 0).astype(np.float32), k3) - cv2.erode(zb, k3)
    edge = valid & (rng_local > 0.01 * np.maximum(z, 0.5) / 0.5)
    near_edge = cv2.dilate(edge.astype(np.uint8), k3) > 0
    drop = (edge & (rng.random(z.shape) < cfg.edge_dropout + 0.2)) | (
        near_edge & (rng.random(z.shape) < cfg.edge_dropout * 0.5)
    )
    view = -P_cam / np.maximum(np.linalg.norm(P_cam, axis=-1, keepdims=True), 1e-9)
    grazing = valid & (np.abs((normal_cam * view).sum(-1)) < 0.12)
    drop |= grazing & (rng.random(z.shape) < 0.7)
    blobs = np.zeros((H, W), np.uint8)
    for _ in range(int(rng.integers(cfg.invalid_blobs[0], cfg.invalid_blobs[1] + 1))):
        c = (int(rng.integers(0, W)), int(rng.integers(0, H)))
        ax = (max(1, int(rng.uniform(1.5, 7) * cfg.px)), max(1, int(rng.uniform(1.5, 7) * cfg.px)))
        cv2.ellipse(blobs, c, ax, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    drop |= blobs > 0
    keep = valid & ~drop & (z <= cfg.depth_max)
    return np.where(keep, np.clip(np.round(d * 1000.0 / DEPTH_SCALE), 0, 65535), 0).astype(np.uint16)


# =============================================================================================== generator


def _scene_sizes(n_images: int, per_scene: int) -> list[int]:
    n = math.ceil(n_images / per_scene)
    return [min(per_scene, n_images - s * per_scene) for s in range(n)]


class HeldoutGenerator:
    """Writes the held-out BOP dataset with a :class:`~osop_ros.core.render.Renderer` (geometry passes only)."""

    def __init__(self, renderer: Renderer, config: HeldoutConfig | None = None) -> None:
        self.renderer = renderer
        self.cfg = config or HeldoutConfig()
        self.models: dict[int, ObjectModel] = {}
        self.records: dict[int, HeldoutObject] = {}
        self.rests: dict[int, list[np.ndarray]] = {}
        self.hulls: dict[int, np.ndarray] = {}
        self._ground_key: str | None = None

    # ------------------------------------------------------------------ objects
    def build_models(self, out_dir: Path, n_objects: int, seed: int) -> None:
        """Write (or reuse) models/obj_XXXXXX.ply + models_info.json; load and upload every model."""
        from trimesh.exchange.ply import export_ply

        from osop_ros.core.mesh import ObjectModel

        models_dir = out_dir / "models"
        info: dict[str, Any] = {}
        for oid in range(1, n_objects + 1):
            rng = np.random.default_rng([seed, 0, oid])
            kind = KINDS[(oid - 1) % len(KINDS)]
            mesh, rec, rests = make_object(oid, kind, rng, self.cfg.object_size_mm)
            path = models_dir / f"obj_{oid:06d}.ply"
            if not path.is_file():
                atomic_write_bytes(path, export_ply(mesh, encoding="binary", vertex_normal=False))
            model = ObjectModel.load(path, units="mm", name=f"obj_{oid:06d}")
            rec.diameter_mm = round(model.diameter * 1000.0, 3)
            info[str(oid)] = models_info_entry(model, rec.symmetric)
            self.models[oid], self.records[oid], self.rests[oid] = model, rec, rests
            self.hulls[oid] = model.hull_points()
            self.renderer.add_object(f"hb_{oid}", model)
            enc = np.clip(np.round((model.normals.astype(np.float64) + 1.0) * 127.5), 0, 255).astype(np.uint8)
            self.renderer.add_object(f"hbn_{oid}", dataclasses.replace(model, vertex_colors=enc, uv=None, texture=None))
        atomic_write_json(models_dir / "models_info.json", info)

    # ------------------------------------------------------------------ scenes
    def scene_layout(self, seed: int, scene_id: int, n_objects: int) -> SceneLayout:
        """Deterministic layout of a scene: objects drawn from a seeded cyclic permutation (all get used)."""
        cfg = self.cfg
        perm = np.random.default_rng([seed, 1]).permutation(np.arange(1, n_objects + 1))
        sizes_rng = np.random.default_rng([seed, 2])
        lo, hi = min(cfg.objects_per_scene[0], n_objects), min(cfg.objects_per_scene[1], n_objects)
        start = 0
        for _ in range(scene_id + 1):
            n = int(sizes_rng.integers(lo, hi + 1))
            ids = [int(perm[(start + k) % n_objects]) for k in range(n)]
            start += n
        rng = np.random.default_rng([seed, 3, scene_id])
        return sample_layout(rng, ids, self.hulls, self.rests, cfg)

    def _set_ground(self, layout: SceneLayout, rng_angle: float) -> None:
        model = ground_model(layout.ground_texture, layout.tile_m, self.cfg.ground_half_extent, rng_angle)
        self.renderer.add_object("hb_ground", model)
        n = dataclasses.replace(
            model, uv=None, texture=None, vertex_colors=np.tile(np.array([128, 128, 255], np.uint8), (4, 1))
        )
        self.renderer.add_object("hbn_ground", n)

    def _solo(self, oid: int, T: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, int, int]:
        """Unoccluded silhouette over the projected bbox within a canvas 3x the image; (mask, x0, y0)."""
        W, H = self.cfg.width, self.cfg.height
        pc = self.hulls[oid] @ T[:3, :3].T + T[:3, 3]
        if (pc[:, 2] <= 0.011).any():
            pc = pc[pc[:, 2] > 0.011]
            if not len(pc):
                return np.zeros((0, 0), bool), 0, 0
        uv = pc[:, :2] / pc[:, 2:3] * np.array([K[0, 0], K[1, 1]]) + K[:2, 2]
        x0, y0 = max(int(math.floor(uv[:, 0].min())) - 2, -W), max(int(math.floor(uv[:, 1].min())) - 2, -H)
        x1, y1 = min(int(math.ceil(uv[:, 0].max())) + 3, 2 * W), min(int(math.ceil(uv[:, 1].max())) + 3, 2 * H)
        if x1 <= x0 or y1 <= y0:
            return np.zeros((0, 0), bool), 0, 0
        w, h = int(64 * math.ceil((x1 - x0) / 64)), int(64 * math.ceil((y1 - y0) / 64))
        Kw = K.copy()
        Kw[0, 2] -= x0
        Kw[1, 2] -= y0
        return self.renderer.render(Kw, w, h, [(f"hb_{oid}", T)]).mask, x0, y0

    def render_image(self, layout: SceneLayout, rng: np.random.Generator) -> dict[str, Any]:
        """One view of a scene: rgb (H, W, 3) u8, depth (H, W) u16 mm, masks, BOP entries and sampled settings."""
        cfg = self.cfg
        W, H = cfg.width, cfg.height
        ren = self.renderer
        world_pts = np.vstack(
            [self.hulls[o] @ T[:3, :3].T + T[:3, 3] for o, T in zip(layout.obj_ids, layout.T_world_obj, strict=True)]
        )
        K, T_cw = sample_camera(rng, cfg, layout, world_pts)
        T_co = [T_cw @ T for T in layout.T_world_obj]
        # geometry passes: albedo (unlit) and model-frame normals, ground plane = instance 1
        objs = [("hb_ground", T_cw)] + [(f"hb_{o}", T) for o, T in zip(layout.obj_ids, T_co, strict=True)]
        unlit = dict(ambient=1.0, diffuse=0.0, specular=0.0, light_dir_cam=np.array([0.0, 0.0, 1.0]))
        geo = ren.render(K, W, H, objs, **unlit)
        nrm = ren.render(K, W, H, [("hbn" + k[2:], T) for k, T in objs], **unlit)
        inst = geo.inst
        valid = geo.depth > 0
        idx = np.where(valid, inst - 1, len(objs))  # per pixel: 0 ground, 1.. objects, len(objs) background
        Rs = np.stack([T_cw[:3, :3]] + [T[:3, :3] for T in T_co] + [np.eye(3)]).astype(np.float32)
        n_model = nrm.rgb.astype(np.float32) / 127.5 - 1.0
        n_cam = np.einsum("hwij,hwj->hwi", Rs[idx], n_model)
        n_cam /= np.maximum(np.linalg.norm(n_cam, axis=-1, keepdims=True), 1e-6)
        P = _backproject(geo.depth, K)
        view = -P / np.maximum(np.linalg.norm(P, axis=-1, keepdims=True), 1e-9)
        flip = (n_cam * view).sum(-1) < 0
        n_cam[flip] *= -1.0  # two-sided
        # lighting (world), shadow map from the light
        centre_w = layout.centre + np.array([0.0, 0.0, 0.05])
        light_w = centre_w + np.r_[rng.normal(0, 0.6, 2), rng.uniform(0.5, 1.3)]
        T_lw = look_at(light_w, centre_w, np.array([0.0, 0.0, 1.0]))
        pl = world_pts @ T_lw[:3, :3].T + T_lw[:3, 3]
        half = float(np.max(np.abs(pl[:, :2]) / pl[:, 2:3])) * 1.1 + 1e-3
        S = cfg.shadow_map_size
        K_l = np.array([[S / 2 / half, 0, (S - 1) / 2], [0, S / 2 / half, (S - 1) / 2], [0, 0, 1.0]])
        sm = ren.render(
            K_l, S, S, [(f"hb_{o}", T_lw @ T) for o, T in zip(layout.obj_ids, layout.T_world_obj, strict=True)], **unlit
        ).depth
        T_lc = T_lw @ invert_T(T_cw)
        vis = shadow_visibility(P, n_cam, valid, T_lc, K_l, sm)
        light_c = T_cw[:3, :3] @ light_w + T_cw[:3, 3]
        Lv = light_c[None, None] - P
        dist = np.maximum(np.linalg.norm(Lv, axis=-1, keepdims=True), 1e-6)
        Lv = Lv / dist
        d0 = float(np.linalg.norm(light_w - centre_w))
        light_k = float(rng.uniform(2700, 7000))
        light_rgb = (kelvin_rgb(light_k) * rng.uniform(0.8, 1.6)).astype(np.float32)
        E = light_rgb[None, None] * (d0 / dist) ** 2 * vis[..., None]
        albedo = (geo.rgb.astype(np.float32) / 255.0) ** 2.2
        ks = np.array([layout.ground_specular] + [self.records[o].specular for o in layout.obj_ids] + [0.0], np.float32)
        shin = np.array([16.0] + [self.records[o].shininess for o in layout.obj_ids] + [1.0], np.float32)
        ndl = np.clip((n_cam * Lv).sum(-1), 0, None)
        Hv = Lv + view
        Hv /= np.maximum(np.linalg.norm(Hv, axis=-1, keepdims=True), 1e-6)
        spec = ks[idx] * np.clip((n_cam * Hv).sum(-1), 0, None) ** shin[idx] * (ndl > 0)
        up_c = T_cw[:3, :3] @ np.array([0.0, 0.0, 1.0])
        hemi = 0.5 + 0.5 * (n_cam @ up_c.astype(np.float32))
        sky = (kelvin_rgb(float(rng.uniform(6000, 12000))) * rng.uniform(0.08, 0.3)).astype(np.float32)
        bounce = (albedo[inst == 1].mean(0) if (inst == 1).any() else np.full(3, 0.3, np.float32)) * 0.35 * sky
        amb = sky[None, None] * hemi[..., None] + bounce[None, None] * (1 - hemi[..., None])
        lin = albedo * (amb + E * ndl[..., None]) + E * spec[..., None]
        yy = np.linspace(1.0, 0.6, H, dtype=np.float32)[:, None, None]
        wall = (np.array(rng.uniform(0.05, 0.2, 3), np.float32) * yy).astype(np.float32)
        lin = np.where(valid[..., None], lin, wall).astype(np.float32)
        rgb, sensor = sensor_rgb(lin, rng, cfg)
        depth_mm = sensor_depth(geo.depth, n_cam, P, rng, cfg)
        # ground truth from the clean render
        gt, gt_info, masks, masks_visib = [], [], [], []
        for k, (oid, T) in enumerate(zip(layout.obj_ids, T_co, strict=True)):
            visib = inst == k + 2
            fm, x0, y0 = self._solo(oid, T, K)
            full, g, info = instance_annotation(int(oid), T, visib, fm, x0, y0, depth_mm > 0)
            gt.append(g)
            gt_info.append(info)
            masks.append(full)
            masks_visib.append(visib)
        camera = {
            "cam_K": [float(x) for x in K.reshape(-1)],
            "depth_scale": DEPTH_SCALE,
            "cam_R_w2c": [float(x) for x in T_cw[:3, :3].reshape(-1)],
            "cam_t_w2c": [float(x) * 1000.0 for x in T_cw[:3, 3]],
        }
        settings = {
            "light_kelvin": round(light_k),
            "light_height_m": round(float(light_w[2]), 3),
            "jpeg_quality": int(rng.integers(cfg.jpeg_quality[0], cfg.jpeg_quality[1] + 1)),
            **sensor,
        }
        return {
            "rgb": rgb,
            "depth": depth_mm,
            "masks": masks,
            "masks_visib": masks_visib,
            "gt": gt,
            "gt_info": gt_info,
            "camera": camera,
            "settings": settings,
        }

    @staticmethod
    def write_image(scene_dir: Path, im_id: int, data: dict[str, Any]) -> None:
        """Atomic per-file writes; ``.partial/{im:06d}.json`` last marks the image finished."""
        q = int(data["settings"]["jpeg_quality"])
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(data["rgb"], cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
        if not ok:  # pragma: no cover
            raise InvalidInputError("JPEG encoding failed")
        atomic_write_bytes(scene_dir / "rgb" / f"{im_id:06d}.jpg", buf.tobytes())
        atomic_write_bytes(scene_dir / "depth" / f"{im_id:06d}.png", encode_png(data["depth"]))
        for k, (m, mv) in enumerate(zip(data["masks"], data["masks_visib"], strict=True)):
            atomic_write_bytes(scene_dir / "mask" / f"{im_id:06d}_{k:06d}.png", encode_png(m.astype(np.uint8) * 255))
            atomic_write_bytes(
                scene_dir / "mask_visib" / f"{im_id:06d}_{k:06d}.png", encode_png(mv.astype(np.uint8) * 255)
            )
        atomic_write_json(
            scene_dir / ".partial" / f"{im_id:06d}.json",
            {k: data[k] for k in ("gt", "gt_info", "camera", "settings")},
            indent=None,
        )

    @staticmethod
    def finish_scene(scene_dir: Path, n_images: int) -> None:
        """Merge the per-image partial JSONs into scene_gt / scene_camera / scene_gt_info (scene_gt last)."""
        gt, cam, info = {}, {}, {}
        for im_id in range(n_images):
            p = json.loads((scene_dir / ".partial" / f"{im_id:06d}.json").read_text())
            gt[str(im_id)], cam[str(im_id)], info[str(im_id)] = p["gt"], p["camera"], p["gt_info"]
        atomic_write_json(scene_dir / "scene_gt_info.json", info)
        atomic_write_json(scene_dir / "scene_camera.json", cam)
        atomic_write_json(scene_dir / "scene_gt.json", gt)
        for p in sorted((scene_dir / ".partial").glob("*.json")):
            p.unlink()
        (scene_dir / ".partial").rmdir()

    # ------------------------------------------------------------------ dataset
    def __call__(
        self, out_dir: str | Path, n_images: int = 40, n_objects: int = 12, seed: int = 7, progress: bool = True
    ) -> dict[str, Any]:
        """Generate (or resume) the dataset in ``out_dir``; returns counts and throughput."""
        from tqdm import tqdm

        if n_images < 1 or n_objects < 1:
            raise InvalidInputError(f"need --images >= 1 and --objects >= 1, got {n_images}, {n_objects}")
        cfg = self.cfg
        out_dir = Path(out_dir).expanduser()
        out_dir.mkdir(parents=True, exist_ok=True)
        run = {"seed": seed, "images": n_images, "objects": n_objects, "config": json.loads(json.dumps(asdict(cfg)))}
        info_path = out_dir / "heldout_info.json"
        if info_path.is_file():
            try:
                prev = json.loads(info_path.read_text()).get("run")
            except ValueError:
                prev = None
            if prev is not None and prev != run:
                raise InvalidInputError(f"{out_dir} holds a held-out set with other settings {prev}; use another --out")
        atomic_write_json(
            info_path, {"format": "osop_ros held-out BOP v1", "style": STYLE, "run": run, "complete": False}
        )
        self.build_models(out_dir, n_objects, seed)
        sizes = _scene_sizes(n_images, cfg.images_per_scene)
        split_dir = out_dir / SPLIT
        todo = []
        for s, n in enumerate(sizes):
            sd = split_dir / f"{s:06d}"
            if not (sd / "scene_gt.json").is_file():
                todo += [(s, i) for i in range(n) if not (sd / ".partial" / f"{i:06d}.json").is_file()]
        bar = tqdm(total=n_images, initial=n_images - len(todo), desc="heldout", unit="img", disable=not progress)
        t0 = time.perf_counter()
        done = 0
        ground_styles = []
        for s, n in enumerate(sizes):
            sd = split_dir / f"{s:06d}"
            layout = self.scene_layout(seed, s, n_objects)
            ground_styles.append(layout.ground_style)
            if (sd / "scene_gt.json").is_file():
                continue
            self._set_ground(layout, float(np.random.default_rng([seed, 4, s]).uniform(0, np.pi)))
            for i in range(n):
                if (sd / ".partial" / f"{i:06d}.json").is_file():
                    continue
                self.write_image(sd, i, self.render_image(layout, np.random.default_rng([seed, 5, s, i])))
                done += 1
                bar.update(1)
            self.finish_scene(sd, n)
        bar.close()
        elapsed = time.perf_counter() - t0
        targets, n_inst, visib = write_targets(out_dir, len(sizes))
        fx = sum(cfg.fx_range) / 2 * cfg.px
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
        stats = {
            "scenes": len(sizes),
            "images": n_images,
            "rendered_now": done,
            "seconds": round(elapsed, 2),
            "images_per_s": round(done / elapsed, 3) if done and elapsed > 0 else None,
            "objects": n_objects,
            "symmetric_objects": sum(r.symmetric for r in self.records.values()),
            "instances": n_inst,
            "test_targets": len(targets),
            "mean_visib_fract": round(float(np.mean(visib)), 3) if visib else None,
        }
        atomic_write_json(
            info_path,
            {
                "format": "osop_ros held-out BOP v1",
                "style": STYLE,
                "run": run,
                "complete": True,
                "stats": stats,
                "ground_styles": ground_styles,
                "objects": [asdict(self.records[o]) for o in sorted(self.records)],
            },
        )
        return stats


def write_targets(
    out_dir: Path, n_scenes: int, min_visib: float = MIN_VISIB_TARGET
) -> tuple[list[dict[str, int]], int, list[float]]:
    """``test_targets_bop19.json`` (instances with visib_fract >= min_visib); returns (targets, instances, visibs)."""
    targets: list[dict[str, int]] = []
    visib: list[float] = []
    for s in range(n_scenes):
        sd = out_dir / SPLIT / f"{s:06d}"
        gt = json.loads((sd / "scene_gt.json").read_text())
        info = json.loads((sd / "scene_gt_info.json").read_text())
        for im in sorted(gt, key=int):
            counts: dict[int, int] = {}
            for g, inf in zip(gt[im], info[im], strict=True):
                visib.append(float(inf["visib_fract"]))
                if inf["visib_fract"] >= min_visib:
                    counts[int(g["obj_id"])] = counts.get(int(g["obj_id"]), 0) + 1
            targets += [
                {"im_id": int(im), "inst_count": c, "obj_id": o, "scene_id": s} for o, c in sorted(counts.items())
            ]
    atomic_write_json(out_dir / "test_targets_bop19.json", targets)
    return targets, len(visib), visib
