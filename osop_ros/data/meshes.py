"""Training mesh library: collect shapes from a mesh tree (pybullet_data), normalise, colour, write BOP models.

Pipeline per source mesh (``MeshLibraryBuilder``):

1. discovery (``discover_meshes``): OBJ/STL/PLY files; scene-scale meshes (planes, terrains, stadiums,
   monasteries, cloth), collision/VHACD/low-res duplicates and every name on the BOP test-object
   blocklist (LINEMOD/LM-O, YCB/YCB-V, T-LESS) are skipped with a reason;
2. geometry (``load_geometry``): vertices merged, degenerate faces dropped; flat/empty meshes rejected;
   near-duplicate shapes (mirrored parts, re-exports in other units) dropped by a scale/rotation-invariant
   ``shape_signature``;
3. normalisation: centred at the bounding-box centre, scaled to a random diameter (default 3-30 cm),
   orientation kept as in the file;
4. resolution (``adjust_resolution``): subdivided (midpoint, crack-free) or decimated towards 5-20k faces,
   vertices split at sharp edges so boxes shade flat;
5. colour (``SurfaceColorizer``): photo texture baked into vertex colours by triplanar projection, or a
   uniform colour with noise, or a few colour patches;
6. symmetries (``detect_symmetries``): discrete/continuous rotational symmetries of the geometry, written
   to ``models_info`` (BOP keys) only for uniformly coloured objects, whose appearance they keep;
7. output: ``DIR/models/obj_%06d.ply`` (millimetres, normals, vertex colours), ``DIR/models/models_info.json``
   and ``DIR/manifest.json`` (source, licence, scale, split train|val by object).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from osop_ros.core.types import InvalidInputError, MeshLoadError, OsopError
from osop_ros.data.procedural import LabelColorizer, ProceduralConfig, ProceduralShapeGenerator

log = logging.getLogger(__name__)

PYBULLET_LICENCE = "zlib (Bullet Physics / pybullet_data)"
MESH_EXTENSIONS = (".obj", ".stl", ".ply")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")

# Objects of the BOP test datasets we evaluate on (LINEMOD / LM-O, YCB / YCB-V, T-LESS) must never be
# training shapes. Names are matched as whole tokens of the relative path (split at non-letters).
BLOCKLIST_TOKENS: tuple[str, ...] = (
    # LINEMOD / LM-O
    "ape", "benchvise", "bowl", "cam", "camera", "can", "cat", "cup", "driller", "drill", "duck", "ducky",
    "eggbox", "egg", "glue", "holepuncher", "puncher", "iron", "lamp", "phone", "linemod", "lmo",
    # YCB / YCB-V
    "ycb", "ycbv", "chef", "cracker", "sugar", "soup", "tomato", "mustard", "tuna", "pudding", "gelatin",
    "jello", "meat", "spam", "banana", "pitcher", "bleach", "cleanser", "mug", "scissors", "marker",
    "clamp", "brick",
    # T-LESS
    "tless",
)
# Multi-word names and dataset prefixes, matched as substrings of the lower-cased path without separators.
BLOCKLIST_SUBSTRINGS: tuple[str, ...] = (
    "linemod", "ycb", "tless", "masterchef", "crackerbox", "sugarbox", "tomatosoup", "mustardbottle",
    "tunafish", "puddingbox", "gelatinbox", "pottedmeat", "pitcherbase", "bleachcleanser", "powerdrill",
    "woodblock", "largemarker", "largeclamp", "foambrick", "eggbox", "benchvise", "holepuncher",
)

# Scene-scale or non-object meshes (token match on the relative path).
SCENE_TOKENS: tuple[str, ...] = (
    "plane", "plane100", "terrain", "stadium", "monastry", "monastery", "samurai", "cloth", "heightmap",
    "heightmaps", "racecourse", "parking", "floor", "ground", "wall", "room",
)
# Collision proxies / low-res exports of a visual mesh: skipped when the visual sibling exists.
_DUPLICATE_SUFFIX_RE = re.compile(r"(_vhacd\d*(_mod)?(_zup)?(_chs)?|_col|_collision|_lores|_lowres)$", re.IGNORECASE)
_COLLISION_DIRS = ("collision", "collisions", "vhacd")


def _tokens(rel_path: str) -> list[str]:
    return [t for t in re.split(r"[^a-z]+", rel_path.lower()) if t]


def blocklist_reason(rel_path: str) -> str | None:
    """Why ``rel_path`` names a BOP test object (LINEMOD/LM-O, YCB/YCB-V, T-LESS), or None."""
    toks = set(_tokens(rel_path))
    hit = sorted(toks.intersection(BLOCKLIST_TOKENS))
    if hit:
        return f"blocklisted name {hit[0]!r} (BOP test object)"
    flat = re.sub(r"[^a-z]", "", rel_path.lower())
    for s in BLOCKLIST_SUBSTRINGS:
        if s in flat:
            return f"blocklisted name {s!r} (BOP test object)"
    return None


def skip_reason(rel_path: str, siblings: set[str]) -> str | None:
    """Why a mesh file should not become a training object (scene-scale, collision proxy, blocklisted).

    ``rel_path``: path relative to the tree root ('/' separators); ``siblings``: lower-cased stems of the
    mesh files in the same directory (to recognise ``x_vhacd.obj`` next to ``x.obj``).
    """
    reason = blocklist_reason(rel_path)
    if reason:
        return reason
    parts = rel_path.lower().split("/")
    toks = set(_tokens(rel_path))
    scene = sorted(toks.intersection(SCENE_TOKENS))
    if scene:
        return f"scene-scale/non-object mesh ({scene[0]!r})"
    if any(p in _COLLISION_DIRS for p in parts[:-1]):
        return "collision mesh directory"
    stem = Path(parts[-1]).stem
    base = _DUPLICATE_SUFFIX_RE.sub("", stem)
    if base != stem and base in siblings:
        return f"collision/low-res duplicate of {base!r}"
    if "collision" in toks:
        return "collision mesh"
    return None


@dataclass(frozen=True)
class MeshCandidate:
    """A mesh file in the source tree. ``rel``: '/'-separated path relative to the root."""

    path: Path
    rel: str

    @property
    def original_name(self) -> str:
        return Path(self.rel).stem


def discover_meshes(root: str | Path) -> tuple[list[MeshCandidate], list[dict[str, str]]]:
    """Mesh files under ``root`` (sorted) and the skipped ones as ``{"path", "reason"}`` dicts."""
    root = Path(root)
    if not root.is_dir():
        raise InvalidInputError(f"mesh source root {root} is not a directory")
    by_dir: dict[Path, list[Path]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            if fn.lower().endswith(MESH_EXTENSIONS):
                by_dir.setdefault(Path(dirpath), []).append(Path(dirpath) / fn)
    keep: list[MeshCandidate] = []
    skipped: list[dict[str, str]] = []
    for d in sorted(by_dir):
        files = by_dir[d]
        stems = {f.stem.lower() for f in files}
        for f in files:
            rel = f.relative_to(root).as_posix()
            reason = skip_reason(rel, stems)
            if reason:
                skipped.append({"path": rel, "reason": reason})
            else:
                keep.append(MeshCandidate(f, rel))
    return keep, skipped


# ----------------------------------------------------------------------------------------------- geometry


def load_geometry(path: str | Path, min_thickness: float = 0.01) -> Any:
    """Load a mesh file as one clean ``trimesh.Trimesh`` (file units): merged vertices, no degenerate faces.

    Raises :class:`MeshLoadError` for unreadable, empty, degenerate or flat (smallest bounding-box
    extent below ``min_thickness`` x largest) meshes.
    """
    import trimesh

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise MeshLoadError(f"{path}: missing or empty mesh file")
    try:
        loaded = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types on malformed files
        raise MeshLoadError(f"{path}: unreadable mesh ({type(exc).__name__}: {exc})") from exc
    verts = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64)
    faces = np.asarray(getattr(loaded, "faces", np.zeros((0, 3))), dtype=np.int64)
    if verts.ndim != 2 or len(verts) < 4 or faces.ndim != 2 or len(faces) < 4:
        raise MeshLoadError(f"{path}: mesh has fewer than 4 vertices/faces")
    if not np.isfinite(verts).all():
        raise MeshLoadError(f"{path}: non-finite vertex coordinates")
    mesh = trimesh.Trimesh(verts, faces, process=True)  # merges duplicate vertices
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.update_faces(mesh.unique_faces())
    mesh.remove_unreferenced_vertices()
    if len(mesh.faces) < 4:
        raise MeshLoadError(f"{path}: fewer than 4 non-degenerate faces")
    ext = np.asarray(mesh.extents, dtype=np.float64)
    if ext.max() <= 0 or ext.min() < min_thickness * ext.max():
        raise MeshLoadError(f"{path}: flat mesh (extents {np.round(ext, 4).tolist()})")
    if mesh.area <= 0:
        raise MeshLoadError(f"{path}: zero surface area")
    return mesh


def mesh_diameter(vertices: np.ndarray) -> float:
    """Largest distance between two vertices (BOP definition), via the convex hull. (N, 3) -> float."""
    from scipy.spatial import ConvexHull, QhullError

    v = np.asarray(vertices, dtype=np.float64)
    try:
        pts = v[ConvexHull(v).vertices]
    except (QhullError, ValueError):
        pts = v
    best = 0.0
    for i in range(0, len(pts), 512):
        d2 = ((pts[i : i + 512, None, :] - pts[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return math.sqrt(best)


def shape_signature(mesh: Any) -> np.ndarray:
    """Scale-, translation- and (axis-permutation/mirror-)invariant shape descriptor, (7,) float64.

    Sorted bounding-box extents and sorted principal standard deviations of the surface (area-weighted
    face centroids), both over the largest extent, plus surface area over the squared largest extent.
    """
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces)
    ext = v.max(0) - v.min(0)
    s = float(ext.max())
    tri = v[f]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    c = tri.mean(axis=1)
    w = area / max(area.sum(), 1e-30)
    mu = (c * w[:, None]).sum(0)
    cov = ((c - mu) * w[:, None]).T @ (c - mu)
    sd = np.sqrt(np.clip(np.linalg.eigvalsh(cov), 0.0, None))
    return np.concatenate([np.sort(ext) / s, np.sort(sd) / s, [area.sum() / s**2]])


def dedupe_by_signature(signatures: Sequence[np.ndarray], tol: float = 0.01) -> list[int]:
    """Indices to keep (in input order): an entry is a duplicate of an earlier kept one when its 6 extent/spread
    terms all differ by less than ``tol`` and its area term by less than ``3 tol`` relative."""
    kept: list[int] = []
    mat = np.zeros((0, 7))
    for i, s in enumerate(signatures):
        s = np.asarray(s, dtype=np.float64)
        if len(mat):
            d = np.abs(mat - s[None])
            dup = np.all(d[:, :6] < tol, axis=1) & (d[:, 6] < 3.0 * tol * np.maximum(np.abs(mat[:, 6]), 1e-9))
            if dup.any():
                continue
        kept.append(i)
        mat = np.vstack([mat, s[None]])
    return kept


def normalise(mesh: Any, diameter: float) -> tuple[Any, float]:
    """Centre ``mesh`` at its bounding-box centre and scale it to ``diameter`` (metres). Returns (mesh, scale).

    ``scale`` maps file units to metres. Orientation is unchanged.
    """
    mesh = mesh.copy()
    v = np.asarray(mesh.vertices, dtype=np.float64)
    centre = (v.min(0) + v.max(0)) / 2.0
    d = mesh_diameter(v)
    if d <= 0:
        raise MeshLoadError("mesh has zero diameter")
    scale = float(diameter) / d
    mesh.vertices = (v - centre) * scale
    return mesh, scale


def adjust_resolution(mesh: Any, min_faces: int = 5000, max_faces: int = 20000, sharp_angle_deg: float = 30.0) -> Any:
    """Subdivide (4-way midpoint, crack-free) up to ``min_faces``/decimate down to ``max_faces``, then split
    vertices along edges sharper than ``sharp_angle_deg`` (flat shading of boxes, smooth of curved parts)."""
    import trimesh

    n = len(mesh.faces)
    if n > max_faces:
        mesh = _decimate(mesh, int(0.75 * max_faces))
    while len(mesh.faces) < min_faces and 4 * len(mesh.faces) <= 1.2 * max_faces:
        mesh = mesh.subdivide()
    mesh = trimesh.Trimesh(mesh.vertices, mesh.faces, process=True)
    return trimesh.graph.smooth_shade(mesh, angle=math.radians(sharp_angle_deg), facet_minarea=None)


def _decimate(mesh: Any, target_faces: int) -> Any:
    """Quadric decimation with open3d; returns the input when open3d is unavailable or fails."""
    import trimesh

    try:
        import open3d as o3d
    except ImportError:  # pragma: no cover - open3d is a dependency
        log.warning("open3d unavailable: keeping %d faces", len(mesh.faces))
        return mesh
    m = o3d.geometry.TriangleMesh(
        o3d.utility.Vector3dVector(np.asarray(mesh.vertices, dtype=np.float64)),
        o3d.utility.Vector3iVector(np.asarray(mesh.faces, dtype=np.int32)),
    )
    d = m.simplify_quadric_decimation(target_number_of_triangles=int(target_faces))
    d.remove_degenerate_triangles()
    d.remove_unreferenced_vertices()
    if len(d.triangles) < 4:
        return mesh
    return trimesh.Trimesh(np.asarray(d.vertices), np.asarray(d.triangles), process=True)


def vertex_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(N, 3) float64 area-weighted unit vertex normals."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, f[:, k], fn)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    out = n / np.maximum(norm, 1e-30)
    out[norm[:, 0] < 1e-30] = (0.0, 0.0, 1.0)
    return out


# ----------------------------------------------------------------------------------------------- colour


def list_images(directory: str | Path | None) -> list[Path]:
    """Sorted image files (jpg/png/bmp) in ``directory``; [] for None."""
    if directory is None:
        return []
    d = Path(directory)
    if not d.is_dir():
        raise InvalidInputError(f"image directory {d} does not exist")
    return sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _random_hsv_color(rng: np.random.Generator) -> np.ndarray:
    """(3,) float RGB in [0, 1] with varied saturation/brightness."""
    h = rng.uniform(0, 180)
    s = rng.choice([rng.uniform(0.0, 0.25), rng.uniform(0.25, 1.0)])
    v = rng.uniform(0.15, 1.0)
    hsv = np.array([[[h, s * 255, v * 255]]], dtype=np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float64) / 255.0


class SurfaceColorizer:
    """Per-vertex colours that make a shape render like a real object.

    Modes (probabilities ``p_photo``, ``p_uniform``, rest = patches):
    * ``photo``: triplanar projection of a random photo crop, texel size tied to the object size;
    * ``uniform``: one colour with low-frequency and per-vertex noise;
    * ``patches``: 2-5 colours on Voronoi cells or bands of the surface.
    Without texture images, ``photo`` falls back to ``uniform``.
    """

    def __init__(self, texture_images: Sequence[Path] = (), p_photo: float = 0.55, p_uniform: float = 0.25,
                 texture_size: int = 512) -> None:
        self.texture_images = list(texture_images)
        self.p_photo = float(p_photo)
        self.p_uniform = float(p_uniform)
        self.texture_size = int(texture_size)

    def __call__(self, vertices: np.ndarray, normals: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """vertices (N, 3) metres, normals (N, 3) unit -> (colours (N, 3) uint8, mode name)."""
        r = rng.random()
        if r < self.p_photo and self.texture_images:
            cols, mode = self.photo(vertices, normals, rng), "photo"
        elif r < self.p_photo + self.p_uniform or (r < self.p_photo and not self.texture_images):
            cols, mode = self.uniform(vertices, rng), "uniform"
        else:
            cols, mode = self.patches(vertices, rng), "patches"
        return np.clip(np.rint(cols * 255.0), 0, 255).astype(np.uint8), mode

    def _texture(self, rng: np.random.Generator) -> np.ndarray:
        path = self.texture_images[int(rng.integers(len(self.texture_images)))]
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise InvalidInputError(f"cannot read texture image {path}")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.3, 1.0))
        y0 = int(rng.integers(0, h - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        crop = img[y0 : y0 + side, x0 : x0 + side]
        return cv2.resize(crop, (self.texture_size, self.texture_size), interpolation=cv2.INTER_AREA)

    def photo(self, vertices: np.ndarray, normals: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Triplanar photo texture -> (N, 3) float RGB in [0, 1]."""
        tex = self._texture(rng).astype(np.float32) / 255.0
        if rng.random() < 0.3:  # tint some textures towards a random colour
            g = tex.mean(axis=2, keepdims=True)
            a = rng.uniform(0.3, 1.0)
            tint = _random_hsv_color(rng).astype(np.float32)
            tex = np.clip(a * g * tint * 1.5 + (1 - a) * tex, 0.0, 1.0)
        v = np.asarray(vertices, dtype=np.float64)
        n = np.asarray(normals, dtype=np.float64)
        extent = float((v.max(0) - v.min(0)).max())
        world = extent * rng.uniform(0.4, 1.5)  # metres covered by one copy of the texture
        R = _random_rotation(rng) if rng.random() < 0.5 else np.eye(3)
        vr, nr = v @ R.T, n @ R.T
        w = np.abs(nr) ** 4
        w /= np.maximum(w.sum(1, keepdims=True), 1e-12)
        size = self.texture_size
        offset = rng.uniform(0, 1, size=2)
        out = np.zeros((len(v), 3), dtype=np.float64)
        for axis, (a, b) in enumerate(((1, 2), (0, 2), (0, 1))):
            uv = vr[:, [a, b]] / world + offset
            uv = np.abs(((uv + 1.0) % 2.0) - 1.0)  # mirrored repeat: no seams
            px = (uv * (size - 1)).astype(np.float32)
            samp = cv2.remap(tex, px[:, 0].reshape(1, -1), px[:, 1].reshape(1, -1), cv2.INTER_LINEAR,
                             borderMode=cv2.BORDER_REFLECT)[0]
            out += w[:, axis : axis + 1] * samp
        return out

    def uniform(self, vertices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One random colour with smooth low-frequency and small per-vertex noise -> (N, 3) float."""
        base = _random_hsv_color(rng)
        v = np.asarray(vertices, dtype=np.float64)
        extent = max(float((v.max(0) - v.min(0)).max()), 1e-9)
        amp = rng.uniform(0.0, 0.15)
        low = np.zeros(len(v))
        for _ in range(3):
            k = rng.normal(size=3) * rng.uniform(2, 12) / extent
            low += np.sin(v @ k + rng.uniform(0, 2 * np.pi))
        cols = base[None, :] * (1.0 + amp * low[:, None] / 3.0)
        cols += rng.normal(0, rng.uniform(0.0, 0.04), size=(len(v), 1))
        return np.clip(cols, 0, 1)

    def patches(self, vertices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """2-5 colours on Voronoi cells (random surface seeds) or on parallel bands -> (N, 3) float."""
        v = np.asarray(vertices, dtype=np.float64)
        k = int(rng.integers(2, 6))
        colors = np.stack([_random_hsv_color(rng) for _ in range(k)])
        if rng.random() < 0.6:
            seeds = v[rng.choice(len(v), size=k, replace=len(v) < k)]
            label = np.argmin(((v[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1)
        else:
            d = rng.normal(size=3)
            proj = v @ (d / np.linalg.norm(d))
            edges = np.sort(rng.uniform(proj.min(), proj.max(), size=k - 1))
            label = np.searchsorted(edges, proj) % k
        cols = colors[label]
        cols += rng.normal(0, 0.02, size=(len(v), 1))
        return np.clip(cols, 0, 1)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    from osop_ros.core.geometry import random_rotation

    return random_rotation(rng)


# ----------------------------------------------------------------------------------------------- symmetries


@dataclass
class SymmetryResult:
    """Rotational symmetries about the model origin. discrete: list of (3, 3); continuous: list of unit axes."""

    discrete: list[np.ndarray] = field(default_factory=list)
    continuous: list[np.ndarray] = field(default_factory=list)


def _surface_samples(vertices: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    idx = rng.choice(len(area), size=n, p=area / area.sum())
    s = np.sqrt(rng.random(n))
    r = rng.random(n)
    w = np.stack([1 - s, s * (1 - r), s * r], axis=1)
    return np.einsum("nk,nkd->nd", w, tri[idx])


def detect_symmetries(vertices: np.ndarray, faces: np.ndarray, tol: float = 0.006, seed: int = 0,
                      n_ref: int = 30000, n_test: int = 1500) -> SymmetryResult:
    """Rotational symmetries of a surface about the origin (put the origin at the bbox centre first).

    A rotation ``R`` is a symmetry when surface samples rotated by ``R`` lie on the surface: their mean
    nearest-neighbour distance to a dense reference sample exceeds that of unrotated samples by less than
    ``tol`` x diameter (and the 95th percentile by less than 3 ``tol`` x diameter). Candidate axes: principal
    axes of the surface and the model axes; angles 360/n for n in 2..8. Continuous: passes at 5 odd angles.
    The discrete set is closed under composition (identity excluded).
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    v = np.asarray(vertices, dtype=np.float64)
    diam = mesh_diameter(v)
    ref = _surface_samples(v, faces, n_ref, rng)
    test = _surface_samples(v, faces, n_test, rng)
    tree = cKDTree(ref)
    d0, _ = tree.query(test)
    base_mean, base_p95 = float(d0.mean()), float(np.percentile(d0, 95))

    def is_sym(R: np.ndarray) -> bool:
        d, _ = tree.query(test @ R.T)
        return bool(d.mean() < base_mean + tol * diam and np.percentile(d, 95) < base_p95 + 3 * tol * diam)

    cov = np.cov(ref.T)
    _, evec = np.linalg.eigh(cov)
    axes: list[np.ndarray] = []
    for a in [*evec.T, *np.eye(3)]:
        a = a / np.linalg.norm(a)
        if all(abs(float(a @ b)) < 0.999 for b in axes):
            axes.append(a)

    from osop_ros.core.geometry import rotation_about_axis

    result = SymmetryResult()
    for a in axes:
        new_axis = all(abs(float(a @ b)) < 0.999 for b in result.continuous)
        if new_axis and all(is_sym(rotation_about_axis(a, ang)) for ang in (0.41, 1.13, 1.9, 2.71, 4.4)):
            result.continuous.append(a)
    found: list[np.ndarray] = []
    if result.continuous:
        c = result.continuous[0]
        # with a continuous axis only flips (180 deg about a perpendicular axis) add new symmetries
        for a in axes:
            if abs(float(a @ c)) < 0.05:
                R = rotation_about_axis(a, np.pi)
                if is_sym(R):
                    found.append(R)
                    break
        result.discrete = found
        return result
    for a in axes:
        for n in range(2, 9):
            R = rotation_about_axis(a, 2 * np.pi / n)
            if is_sym(R):
                found.append(R)
    result.discrete = _close_group(found, is_sym)
    return result


def _close_group(gens: list[np.ndarray], is_sym: Any, max_size: int = 48) -> list[np.ndarray]:
    """All distinct non-identity products of ``gens`` (a finite rotation group), each re-checked with ``is_sym``."""

    def same(A: np.ndarray, B: np.ndarray) -> bool:
        return float(np.trace(A.T @ B)) > 3.0 - 1e-3

    group: list[np.ndarray] = [np.eye(3)]
    frontier = list(gens)
    while frontier and len(group) < max_size:
        R = frontier.pop()
        if any(same(R, G) for G in group):
            continue
        group.append(R)
        for G in list(group):
            frontier.append(G @ R)
            frontier.append(R @ G)
    out = [G for G in group[1:] if is_sym(G)]
    return out


# ----------------------------------------------------------------------------------------------- output


def write_ply(path: str | Path, vertices: np.ndarray, faces: np.ndarray, normals: np.ndarray | None = None,
              colors: np.ndarray | None = None) -> None:
    """Write a binary little-endian PLY atomically. vertices (N, 3) float (file units), faces (M, 3) int,
    normals (N, 3), colors (N, 3) uint8."""
    path = Path(path)
    v = np.asarray(vertices, dtype=np.float32)
    f = np.asarray(faces, dtype=np.int32)
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if normals is not None:
        fields += [("nx", "<f4"), ("ny", "<f4"), ("nz", "<f4")]
    if colors is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vert = np.empty(len(v), dtype=fields)
    vert["x"], vert["y"], vert["z"] = v[:, 0], v[:, 1], v[:, 2]
    if normals is not None:
        nrm = np.asarray(normals, dtype=np.float32)
        vert["nx"], vert["ny"], vert["nz"] = nrm[:, 0], nrm[:, 1], nrm[:, 2]
    if colors is not None:
        c = np.asarray(colors, dtype=np.uint8)
        vert["red"], vert["green"], vert["blue"] = c[:, 0], c[:, 1], c[:, 2]
    face = np.empty(len(f), dtype=[("n", "u1"), ("i", "<i4", (3,))])
    face["n"] = 3
    face["i"] = f
    props = "".join(
        f"property {'float' if t == '<f4' else 'uchar'} {name}\n" for name, t in fields
    )
    header = (
        "ply\nformat binary_little_endian 1.0\ncomment osop_ros training mesh (millimetres)\n"
        f"element vertex {len(v)}\n{props}element face {len(f)}\nproperty list uchar int vertex_indices\nend_header\n"
    )
    atomic_write_bytes(path, header.encode("ascii") + vert.tobytes() + face.tobytes())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """JSON-dump ``obj`` to ``path`` atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


# ----------------------------------------------------------------------------------------------- builder


@dataclass(frozen=True)
class MeshLibraryConfig:
    """Knobs of :class:`MeshLibraryBuilder` (lengths in metres)."""

    min_diameter: float = 0.03
    max_diameter: float = 0.30
    min_faces: int = 5000
    max_faces: int = 20000
    sharp_angle_deg: float = 30.0
    p_photo: float = 0.55
    p_uniform: float = 0.25
    dedupe_tol: float = 0.01
    detect_symmetry: bool = True


@dataclass
class BuiltObject:
    """One written training object (what goes into the manifest)."""

    obj_id: int
    name: str
    source_package: str
    source_path: str
    licence: str
    original_name: str
    scale: float  # file units -> metres
    diameter_m: float
    faces: int
    vertices: int
    colour_mode: str
    split: str
    symmetric: bool
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the manifest entry (procedural metadata)

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest dict of this object (``extra`` keys merged in)."""
        d = asdict(self)
        d.update(d.pop("extra"))
        return d


PROCEDURAL_PACKAGE = "osop_ros.procedural"
# the only colouring under which a geometric symmetry is also one of the appearance (also train.prepare's rule)
APPEARANCE_SYMMETRIC_MODE = "uniform"
PROCEDURAL_LICENCE = "generated (project code)"


def pybullet_data_root() -> Path:
    """Directory of the ``pybullet_data`` package; :class:`OsopError` when pybullet is not installed."""
    try:
        import pybullet_data
    except ImportError as exc:
        raise OsopError(
            "pybullet_data is not installed: `.venv/bin/python -m pip install pybullet==3.2.7` "
            "(requirements-train.txt), or pass --source DIR"
        ) from exc
    return Path(pybullet_data.getDataPath())


def _package_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


class MeshLibraryBuilder:
    """Build the BOP-style training mesh library from a source tree (see module docstring)."""

    def __init__(self, config: MeshLibraryConfig | None = None, texture_images: Sequence[Path] = (),
                 source_package: str = "pybullet_data", licence: str = PYBULLET_LICENCE) -> None:
        self.config = config or MeshLibraryConfig()
        self.colorizer = SurfaceColorizer(texture_images, p_photo=self.config.p_photo, p_uniform=self.config.p_uniform)
        self.source_package = source_package
        self.licence = licence

    def __call__(self, source_root: str | Path | None, out_dir: str | Path, max_objects: int | None = None,
                 val_fraction: float = 0.1, seed: int = 0, progress: bool = True, procedural: int = 0,
                 procedural_config: ProceduralConfig | None = None) -> dict[str, Any]:
        """Process every usable mesh under ``source_root`` (None: none) into ``out_dir``, then add ``procedural``
        generated objects (ids after the discovered ones, own train/val draw); returns the manifest dict."""
        from tqdm import tqdm

        if not 0.0 <= val_fraction < 1.0:
            raise InvalidInputError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if procedural < 0:
            raise InvalidInputError(f"procedural must be >= 0, got {procedural}")
        cfg = self.config
        t_start = time.perf_counter()
        out_dir = Path(out_dir)
        if source_root is None:
            cands, skipped = [], []
        else:
            source_root = Path(source_root)
            cands, skipped = discover_meshes(source_root)
        log.info("%d candidate meshes, %d skipped by name", len(cands), len(skipped))

        # 1) load + signature; prefer higher resolution among duplicates
        loaded: list[tuple[MeshCandidate, Any, np.ndarray]] = []
        for c in tqdm(cands, desc="load", disable=not progress, mininterval=2.0):
            try:
                m = load_geometry(c.path)
            except MeshLoadError as exc:
                skipped.append({"path": c.rel, "reason": f"degenerate/unreadable: {exc}"})
                continue
            loaded.append((c, m, shape_signature(m)))
        order = sorted(range(len(loaded)), key=lambda i: (-len(loaded[i][1].faces), loaded[i][0].rel))
        keep_pos = dedupe_by_signature([loaded[i][2] for i in order], tol=cfg.dedupe_tol)
        keep_set = {order[k] for k in keep_pos}
        for i, (c, _, _) in enumerate(loaded):
            if i not in keep_set:
                skipped.append({"path": c.rel, "reason": "near-duplicate shape of another mesh"})
        kept = [loaded[i] for i in sorted(keep_set)]  # path order

        rng = np.random.default_rng(seed)
        if max_objects is not None and len(kept) > max_objects:
            sel = np.sort(rng.permutation(len(kept))[:max_objects])
            kept = [kept[i] for i in sel]
        n = len(kept)
        if n == 0 and source_root is not None and procedural == 0:
            raise InvalidInputError(f"no usable meshes under {source_root}")
        if n + procedural == 0:
            raise InvalidInputError("no objects: give a mesh source or procedural > 0")
        val_ids = set((_val_draw(n, val_fraction, [seed, 1]) + 1).tolist())

        # 2) process and write
        models_dir = out_dir / "models"
        models_dir.mkdir(parents=True, exist_ok=True)
        models_info: dict[str, Any] = {}
        objects: list[BuiltObject] = []
        for k, (c, mesh, _) in enumerate(tqdm(kept, desc="meshes", disable=not progress, mininterval=2.0)):
            obj_id = k + 1
            orng = np.random.default_rng([seed, obj_id])
            bo, info = self._process(obj_id, c, mesh, orng, models_dir, "val" if obj_id in val_ids else "train")
            objects.append(bo)
            models_info[str(obj_id)] = info
        t_proc = time.perf_counter()
        if procedural:
            gen = ProceduralShapeGenerator(procedural_config)
            labels = LabelColorizer(self.colorizer.texture_images, p_photo=gen.config.p_label_photo,
                                    height_px=gen.config.label_height_px)
            pval = set(_val_draw(procedural, val_fraction, [seed, 2]).tolist())
            for i in tqdm(range(procedural), desc="procedural", disable=not progress, mininterval=2.0):
                obj_id = n + i + 1
                bo, info = self._process_procedural(obj_id, i, gen, labels, np.random.default_rng([seed, 7, i]),
                                                    models_dir, "val" if i in pval else "train")
                objects.append(bo)
                models_info[str(obj_id)] = info
        t_end = time.perf_counter()
        for bo in objects:  # the manifest asserts that no BOP test object slipped through
            for text in (bo.source_path, str(bo.extra.get("procedural_kind", ""))):
                reason = blocklist_reason(text)
                if reason:
                    raise OsopError(f"blocklist violated by {bo.source_path}: {reason}")
        atomic_write_json(models_dir / "models_info.json", models_info)
        modes = ("photo", "uniform", "patches", "label") if procedural else ("photo", "uniform", "patches")
        counts = {
            "objects": n + procedural,
            "train": sum(o.split == "train" for o in objects),
            "val": sum(o.split == "val" for o in objects),
            "skipped": len(skipped),
            "colour_modes": {m: sum(o.colour_mode == m for o in objects) for m in modes},
            "symmetric": sum(o.symmetric for o in objects),
        }
        if procedural:
            counts["procedural"] = procedural
            counts["procedural_kinds"] = {k: sum(o.extra.get("procedural_kind") == k for o in objects)
                                          for k in sorted({str(o.extra.get("procedural_kind")) for o in objects[n:]})}
            counts["procedural_objects_per_s"] = round(procedural / max(t_end - t_proc, 1e-9), 3)
        counts["objects_per_s"] = round((n + procedural) / max(t_end - t_start, 1e-9), 3)
        log.info("%d objects in %.1f s (%.2f objects/s)%s", n + procedural, t_end - t_start, counts["objects_per_s"],
                 f", procedural {counts['procedural_objects_per_s']:.2f} objects/s" if procedural else "")
        manifest = {
            "format": "osop_ros mesh library v1 (BOP models, millimetres)",
            "source_root": None if source_root is None else str(source_root),
            "source_package": self.source_package if source_root is not None else PROCEDURAL_PACKAGE,
            "source_package_version": (_package_version("pybullet")
                                       if source_root is not None and self.source_package == "pybullet_data" else None),
            "licence": self.licence if source_root is not None else PROCEDURAL_LICENCE,
            "seed": seed,
            "val_fraction": val_fraction,
            "config": asdict(cfg),
            **({"procedural_config": asdict(ProceduralConfig() if procedural_config is None else procedural_config)}
               if procedural else {}),
            "blocklist": {"tokens": list(BLOCKLIST_TOKENS), "substrings": list(BLOCKLIST_SUBSTRINGS),
                          "datasets": ["LINEMOD", "LM-O", "YCB", "YCB-V", "T-LESS"]},
            "blocklist_check": {"passed": True, "checked_objects": n + procedural},
            "counts": counts,
            "objects": [o.manifest_entry() for o in objects],
            "skipped": sorted(skipped, key=lambda s: s["path"]),
        }
        atomic_write_json(out_dir / "manifest.json", manifest)
        return manifest

    def _process(self, obj_id: int, cand: MeshCandidate, mesh: Any, rng: np.random.Generator, models_dir: Path,
                 split: str) -> tuple[BuiltObject, dict[str, Any]]:
        cfg = self.config
        diameter = float(rng.uniform(cfg.min_diameter, cfg.max_diameter))
        mesh, scale = normalise(mesh, diameter)
        mesh = adjust_resolution(mesh, cfg.min_faces, cfg.max_faces, cfg.sharp_angle_deg)
        v = np.asarray(mesh.vertices, dtype=np.float64)
        f = np.asarray(mesh.faces, dtype=np.int64)
        nrm = vertex_normals(v, f)
        colors, mode = self.colorizer(v, nrm, rng)
        info, symmetric, shape_symmetric, diam_mm = self._write(obj_id, v, f, nrm, colors, mode, models_dir)
        bo = BuiltObject(
            obj_id=obj_id, name=f"obj_{obj_id:06d}", source_package=self.source_package, source_path=cand.rel,
            licence=self.licence, original_name=cand.original_name, scale=scale, diameter_m=diam_mm / 1000.0,
            faces=len(f), vertices=len(v), colour_mode=mode, split=split, symmetric=symmetric,
            extra={"shape_symmetric": shape_symmetric},
        )
        return bo, info

    def _process_procedural(self, obj_id: int, index: int, gen: ProceduralShapeGenerator, labels: LabelColorizer,
                            rng: np.random.Generator, models_dir: Path,
                            split: str) -> tuple[BuiltObject, dict[str, Any]]:
        """Generate procedural object ``index`` (own rng), normalise, colour (label or library modes), write."""
        cfg, pcfg = self.config, gen.config
        shape = gen(rng)
        raw = shape.mesh
        centre_xy = (np.asarray(raw.vertices).min(0) + np.asarray(raw.vertices).max(0))[:2] / 2.0
        diameter = float(rng.uniform(cfg.min_diameter, cfg.max_diameter))
        mesh, scale = normalise(raw, diameter)
        mesh = adjust_resolution(mesh, cfg.min_faces, cfg.max_faces, cfg.sharp_angle_deg)
        v = np.asarray(mesh.vertices, dtype=np.float64)
        f = np.asarray(mesh.faces, dtype=np.int64)
        nrm = vertex_normals(v, f)
        extra: dict[str, Any] = {"procedural_kind": shape.kind, "procedural_variant": shape.variant}
        if rng.random() < pcfg.p_label:
            vc = v.copy()
            if shape.projection == "cylindrical":  # revolution axis (raw x = y = 0) through the origin
                vc[:, :2] += centre_xy * scale
            colors, base = labels(vc, nrm, shape.projection, rng)
            mode = "label"
            extra.update(label_base=base, label_projection=shape.projection)
        else:
            colors, mode = self.colorizer(v, nrm, rng)
        extra["finish"] = "glossy" if rng.random() < pcfg.p_glossy else "matte"
        info, symmetric, shape_symmetric, diam_mm = self._write(obj_id, v, f, nrm, colors, mode, models_dir)
        extra["shape_symmetric"] = shape_symmetric
        rel = f"procedural/{shape.group}_{index:06d}"
        bo = BuiltObject(
            obj_id=obj_id, name=f"obj_{obj_id:06d}", source_package=PROCEDURAL_PACKAGE, source_path=rel,
            licence=PROCEDURAL_LICENCE, original_name=Path(rel).name, scale=scale, diameter_m=diam_mm / 1000.0,
            faces=len(f), vertices=len(v), colour_mode=mode, split=split, symmetric=symmetric, extra=extra,
        )
        return bo, info

    def _write(self, obj_id: int, v: np.ndarray, f: np.ndarray, nrm: np.ndarray, colors: np.ndarray,
               colour_mode: str, models_dir: Path) -> tuple[dict[str, Any], bool, bool, float]:
        """Write the PLY (mm) and compute the models_info entry -> (info, symmetric, shape_symmetric,
        diameter in mm).

        ``models_info`` declares the symmetries of the object's *appearance* (BOP semantics: a pose
        turned by one looks the same): the geometric ones (``detect_symmetries``) for uniformly coloured
        objects only, none for photo, patch and label colourings, which break them. ``shape_symmetric``
        records the geometry alone (manifest only).
        """
        cfg = self.config
        write_ply(models_dir / f"obj_{obj_id:06d}.ply", v * 1000.0, f, nrm, colors)
        lo, hi = v.min(0) * 1000.0, v.max(0) * 1000.0
        diam_mm = mesh_diameter(v) * 1000.0
        info: dict[str, Any] = {
            "diameter": round(diam_mm, 4),
            "min_x": round(float(lo[0]), 4), "min_y": round(float(lo[1]), 4), "min_z": round(float(lo[2]), 4),
            "size_x": round(float(hi[0] - lo[0]), 4), "size_y": round(float(hi[1] - lo[1]), 4),
            "size_z": round(float(hi[2] - lo[2]), 4),
        }
        shape_symmetric = symmetric = False
        if cfg.detect_symmetry:
            sym = detect_symmetries(v, f, seed=obj_id)
            shape_symmetric = bool(sym.discrete or sym.continuous)
            symmetric = shape_symmetric and colour_mode == APPEARANCE_SYMMETRIC_MODE
            if symmetric and sym.discrete:
                info["symmetries_discrete"] = [_bop_sym(R) for R in sym.discrete]
            if symmetric and sym.continuous:
                info["symmetries_continuous"] = [
                    {"axis": [round(float(x), 6) for x in a], "offset": [0, 0, 0]} for a in sym.continuous[:1]
                ]
        return info, symmetric, shape_symmetric, diam_mm


def _val_draw(n: int, val_fraction: float, seed: list[int]) -> np.ndarray:
    """0-based indices of the val objects among ``n``: round(val_fraction n), at least 1 and at most n - 1."""
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(1, min(n - 1, n_val))
    return np.random.default_rng(seed).permutation(n)[:n_val]


def _bop_sym(R: np.ndarray) -> list[float]:
    """(3, 3) rotation about the origin -> BOP row-major 4x4 list (translation 0 mm)."""
    T = np.eye(4)
    T[:3, :3] = R
    return [round(float(x), 8) for x in T.reshape(-1)]


def load_manifest(mesh_dir: str | Path) -> dict[str, Any]:
    """Read ``mesh_dir/manifest.json`` written by :class:`MeshLibraryBuilder`."""
    path = Path(mesh_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: cannot read mesh manifest ({exc}); run `osop data meshes` first") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("objects"), list):
        raise InvalidInputError(f"{path}: not a mesh library manifest")
    return manifest


def split_object_ids(manifest: dict[str, Any], split: str) -> list[int]:
    """Object ids of ``split`` ('train' or 'val') in a manifest."""
    if split not in ("train", "val"):
        raise InvalidInputError(f"split must be 'train' or 'val', got {split!r}")
    return sorted(int(o["obj_id"]) for o in manifest["objects"] if o.get("split") == split)

