"""Object models: load a CAD mesh (PLY/OBJ/STL/GLB/GLTF) into metres with colours, diameter and symmetries.

The model frame is kept exactly as in the file (only scaled to metres): BOP ground-truth poses refer to it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from osop_ros.core.types import InvalidInputError, MeshLoadError, Symmetries

log = logging.getLogger(__name__)

Units = Literal["mm", "m", "auto"]
SUPPORTED_EXTENSIONS = (".ply", ".obj", ".stl", ".glb", ".gltf")
UNIT_SCALES = {"mm": 0.001, "m": 1.0}
AUTO_MM_EXTENT = 2.0  # "auto": a bounding-box extent above this (file units) means millimetres


@dataclass
class ObjectModel:
    """A triangle mesh in metres.

    vertices: (N, 3) float32 metres, model frame as in the file (not re-centred).
    faces: (M, 3) int32 vertex indices.
    normals: (N, 3) float32 unit vertex normals.
    vertex_colors: (N, 3) uint8 RGB or None.
    uv: (N, 2) float32 texture coordinates or None. trimesh/OpenGL convention: ``v = 0`` is the BOTTOM
        row of ``texture`` (row ``H - 1``), ``v = 1`` the top row (row 0).
    texture: (H, W, 3) uint8 RGB image (row 0 = top of the image file) or None.
    diameter: metres, largest distance between two vertices (BOP definition).
    bbox_min, bbox_max: (3,) float64 metres.
    content_hash: sha256 hex of the file bytes and the unit scale (cache keys).
    """

    name: str
    path: Path | None
    vertices: np.ndarray
    faces: np.ndarray
    normals: np.ndarray
    vertex_colors: np.ndarray | None
    uv: np.ndarray | None
    texture: np.ndarray | None
    diameter: float
    bbox_min: np.ndarray
    bbox_max: np.ndarray
    symmetries: Symmetries = field(default_factory=Symmetries)
    content_hash: str = ""
    hull_indices: np.ndarray | None = field(default=None, repr=False)  # (H,) int64 convex-hull vertex ids

    @property
    def center(self) -> np.ndarray:
        """(3,) float64 bounding-box centre in metres."""
        return (np.asarray(self.bbox_min, np.float64) + np.asarray(self.bbox_max, np.float64)) / 2.0

    @property
    def extent(self) -> np.ndarray:
        """(3,) float64 bounding-box size in metres."""
        return np.asarray(self.bbox_max, np.float64) - np.asarray(self.bbox_min, np.float64)

    def hull_points(self) -> np.ndarray:
        """(H, 3) float64 convex-hull vertices: enough for diameters and projected extents."""
        if self.hull_indices is None:
            self.hull_indices = _hull_indices(self.vertices.astype(np.float64))
        return self.vertices[self.hull_indices].astype(np.float64)

    def face_areas(self) -> np.ndarray:
        """(M,) float64 triangle areas in m^2."""
        v = self.vertices.astype(np.float64)[self.faces]
        return 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)

    def sample_surface(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Area-weighted uniform surface samples.

        Returns ``pts`` (n, 3) float64 metres and ``normals`` (n, 3) float64 unit face normals.
        Deterministic for a given ``seed``.
        """
        if n <= 0:
            return np.zeros((0, 3)), np.zeros((0, 3))
        rng = np.random.default_rng(seed)
        v = self.vertices.astype(np.float64)[self.faces]  # (M, 3, 3)
        e1, e2 = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]
        cross = np.cross(e1, e2)
        area = np.linalg.norm(cross, axis=1)
        face = rng.choice(len(area), size=n, p=area / area.sum())
        s = np.sqrt(rng.random(n))
        r = rng.random(n)
        w = np.stack([1.0 - s, s * (1.0 - r), s * r], axis=1)  # (n, 3) barycentric weights, uniform on triangles
        pts = np.einsum("nk,nkd->nd", w, v[face])
        nrm = cross[face] / np.maximum(area[face], 1e-30)[:, None]
        return pts, nrm

    @classmethod
    def load(
        cls,
        path: str | Path,
        units: Units = "auto",
        name: str | None = None,
        symmetries: Symmetries | dict[str, Any] | None = None,
    ) -> ObjectModel:
        """Load a mesh file and convert it to metres.

        ``units``: "mm" (x 0.001), "m", or "auto" (millimetres when a bounding-box extent exceeds 2.0).
        ``symmetries``: a :class:`Symmetries` in metres, or a BOP ``models_info.json`` entry (in the file's
        units; its offsets are scaled like the mesh). Raises :class:`MeshLoadError` naming the file.
        """
        path = Path(path)
        if units not in ("mm", "m", "auto"):
            raise MeshLoadError(f"{path}: unknown units {units!r} (expected 'mm', 'm' or 'auto')")
        ext = path.suffix.lower()
        if ext not in SUPPORTED_EXTENSIONS:
            supported = ", ".join(SUPPORTED_EXTENSIONS)
            raise MeshLoadError(f"{path}: unsupported mesh format {ext or '(no extension)'!r}; supported: {supported}")
        if not path.is_file():
            raise MeshLoadError(f"{path}: mesh file not found")
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise MeshLoadError(f"{path}: cannot read mesh file ({exc})") from exc
        if not data.strip():
            raise MeshLoadError(f"{path}: mesh file is empty")
        mesh = _load_trimesh(path)
        verts = np.asarray(mesh.vertices, dtype=np.float64)
        _check_geometry(path, verts, np.asarray(mesh.faces))
        extent = float((verts.max(axis=0) - verts.min(axis=0)).max())
        if units == "auto":
            units = "mm" if extent > AUTO_MM_EXTENT else "m"
            log.info("%s: units=auto -> '%s' (largest bbox extent %.4g file units, threshold %.1f)",
                     path.name, units, extent, AUTO_MM_EXTENT)
        scale = UNIT_SCALES[units]
        if isinstance(symmetries, dict):
            symmetries = Symmetries.from_bop_info(symmetries, unit_scale=scale)
        digest = hashlib.sha256(data)
        digest.update(f"|scale={scale!r}".encode())
        return cls.from_trimesh(
            mesh,
            name=name or path.stem,
            units_scale=scale,
            symmetries=symmetries,
            path=path,
            content_hash=digest.hexdigest(),
        )

    @classmethod
    def from_trimesh(
        cls,
        mesh: Any,
        name: str,
        units_scale: float = 1.0,
        symmetries: Symmetries | None = None,
        path: Path | None = None,
        content_hash: str | None = None,
    ) -> ObjectModel:
        """Build from a ``trimesh.Trimesh`` (file units x ``units_scale`` = metres).

        ``content_hash`` defaults to a hash of the geometry, colours and texture arrays.
        """
        where = str(path) if path is not None else f"mesh {name!r}"
        verts = np.asarray(mesh.vertices, dtype=np.float64)
        faces = np.asarray(mesh.faces)
        _check_geometry(where, verts, faces)
        if faces.min() < 0 or faces.max() >= len(verts):
            raise MeshLoadError(f"{where}: face indices out of range [0, {len(verts)})")
        verts = verts * float(units_scale)
        faces = faces.astype(np.int32)
        vertex_colors, uv, texture = _extract_visual(mesh, len(verts))
        normals = _vertex_normals(verts, faces)
        v32 = verts.astype(np.float32)
        hull = _hull_indices(verts)
        diameter = _max_pairwise_distance(verts[hull])
        if content_hash is None:
            h = hashlib.sha256()
            for arr in (v32, faces, vertex_colors, uv, texture):
                h.update(b"|" if arr is None else np.ascontiguousarray(arr).tobytes())
            content_hash = h.hexdigest()
        return cls(
            name=name,
            path=path,
            vertices=v32,
            faces=faces,
            normals=normals,
            vertex_colors=vertex_colors,
            uv=uv,
            texture=texture,
            diameter=float(diameter),
            bbox_min=v32.min(axis=0).astype(np.float64),
            bbox_max=v32.max(axis=0).astype(np.float64),
            symmetries=symmetries if symmetries is not None else Symmetries(),
            content_hash=content_hash,
            hull_indices=hull,
        )


def load_bop_models_info(path: str | Path) -> dict[int, dict[str, Any]]:
    """Read a BOP ``models_info.json`` -> {obj_id: info} (values in millimetres, as in the file)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"{path}: cannot read BOP models_info ({exc})") from exc
    if not isinstance(raw, dict):
        raise InvalidInputError(f"{path}: models_info must be a JSON object keyed by object id")
    try:
        return {int(k): v for k, v in raw.items()}
    except ValueError as exc:
        raise InvalidInputError(f"{path}: non-integer object id in models_info ({exc})") from exc


# ----------------------------------------------------------------------------------------------- helpers


def _load_trimesh(path: Path) -> Any:
    """One ``trimesh.Trimesh`` from a file; scenes are flattened (transforms applied) and concatenated."""
    import trimesh

    try:
        loaded = trimesh.load(str(path), process=False)
    except Exception as exc:  # trimesh raises many types for malformed files
        raise MeshLoadError(f"{path}: unreadable mesh ({type(exc).__name__}: {exc})") from exc
    if isinstance(loaded, trimesh.Scene):
        try:
            geoms = [g for g in loaded.dump(concatenate=False) if isinstance(g, trimesh.Trimesh)]
        except Exception as exc:
            raise MeshLoadError(f"{path}: cannot flatten scene ({type(exc).__name__}: {exc})") from exc
        geoms = [g for g in geoms if len(g.faces) > 0]
        if not geoms:
            raise MeshLoadError(f"{path}: the file contains no triangle mesh")
        mesh = geoms[0] if len(geoms) == 1 else _concatenate(geoms)
    elif isinstance(loaded, trimesh.Trimesh):
        mesh = loaded
    else:
        raise MeshLoadError(f"{path}: the file contains no triangle mesh (got {type(loaded).__name__})")
    if path.suffix.lower() == ".stl" and len(mesh.faces) > 0:
        mesh.merge_vertices()  # STL is a triangle soup: share vertices for smooth normals and compactness
    return mesh


def _concatenate(geoms: list[Any]) -> Any:
    """Concatenate scene parts; keep a packed texture if trimesh can, else fall back to vertex colours."""
    import trimesh

    kinds = {getattr(g.visual, "kind", None) for g in geoms}
    if kinds == {"texture"}:
        try:
            merged = trimesh.util.concatenate(geoms)
            if getattr(merged.visual, "kind", None) == "texture" and merged.visual.uv is not None:
                return merged
        except Exception as exc:  # texture packing can fail; colours still work
            log.debug("texture packing failed (%s); using vertex colours", exc)
    if kinds - {None}:
        parts = []
        for g in geoms:
            g = g.copy()
            if getattr(g.visual, "kind", None) == "texture":
                g.visual = g.visual.to_color()
            elif getattr(g.visual, "kind", None) is None:
                grey = np.tile([178, 178, 178, 255], (len(g.vertices), 1)).astype(np.uint8)
                g.visual = trimesh.visual.ColorVisuals(g, vertex_colors=grey)
            parts.append(g)
        geoms = parts
    return trimesh.util.concatenate(geoms)


def _check_geometry(where: Any, verts: np.ndarray, faces: np.ndarray) -> None:
    if verts.ndim != 2 or verts.shape[1] != 3 or len(verts) == 0:
        raise MeshLoadError(f"{where}: mesh has no vertices")
    if faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise MeshLoadError(f"{where}: mesh has no triangle faces")
    if not np.isfinite(verts).all():
        n_bad = int((~np.isfinite(verts)).any(axis=1).sum())
        raise MeshLoadError(f"{where}: {n_bad} vertices have NaN/inf coordinates")
    if float((verts.max(axis=0) - verts.min(axis=0)).max()) <= 0.0:
        raise MeshLoadError(f"{where}: mesh has zero extent (all vertices coincide)")
    f = faces.astype(np.int64)
    if f.min() >= 0 and f.max() < len(verts):
        v = verts[f]
        if not np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1).any():
            raise MeshLoadError(f"{where}: every triangle is degenerate (zero surface area)")


def _extract_visual(mesh: Any, n_verts: int) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(vertex_colors (N,3) u8 | None, uv (N,2) f32 | None, texture (H,W,3) u8 | None)."""
    visual = getattr(mesh, "visual", None)
    kind = getattr(visual, "kind", None)
    if kind == "texture":
        material = getattr(visual, "material", None)
        image = None
        if material is not None:
            image = getattr(material, "image", None)
            if image is None:
                image = getattr(material, "baseColorTexture", None)
        uv = getattr(visual, "uv", None)
        if image is not None and uv is not None and len(uv) == n_verts:
            tex = np.asarray(image.convert("RGB"), dtype=np.uint8)
            if tex.ndim == 3 and tex.shape[0] > 0 and tex.shape[1] > 0:
                return None, np.asarray(uv, dtype=np.float32)[:, :2].copy(), np.ascontiguousarray(tex)
        if material is not None:  # no usable image: uniform material colour
            color = np.asarray(getattr(material, "main_color", [178, 178, 178, 255]), dtype=np.uint8).reshape(-1)[:3]
            return np.tile(color, (n_verts, 1)), None, None
        return None, None, None
    if kind in ("vertex", "face"):
        colors = np.asarray(visual.vertex_colors)
        if colors.ndim == 2 and len(colors) == n_verts and colors.shape[1] >= 3:
            return np.ascontiguousarray(colors[:, :3].astype(np.uint8)), None, None
    return None, None, None


def _vertex_normals(verts: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(N, 3) float32 area-weighted unit vertex normals; isolated vertices get +z."""
    v = verts[faces]
    fn = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])  # length = 2 * area
    n = np.zeros_like(verts)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    bad = norm[:, 0] < 1e-20
    n = n / np.where(bad[:, None], 1.0, norm)
    n[bad] = (0.0, 0.0, 1.0)
    return n.astype(np.float32)


def _hull_indices(verts: np.ndarray) -> np.ndarray:
    """Indices of convex-hull vertices (all vertices when qhull cannot build a hull)."""
    from scipy.spatial import ConvexHull, QhullError

    pts = np.unique(verts, axis=0, return_index=True)[1] if len(verts) > 4 else np.arange(len(verts))
    if len(pts) < 4:
        return np.sort(pts).astype(np.int64)
    for opts in (None, "QJ"):  # "QJ" joggles degenerate (planar/collinear) inputs
        try:
            hull = ConvexHull(verts[pts], qhull_options=opts)
            return np.sort(pts[hull.vertices]).astype(np.int64)
        except (QhullError, ValueError):
            continue
    return np.sort(pts).astype(np.int64)


def _max_pairwise_distance(pts: np.ndarray) -> float:
    """Largest distance between two of the (N, 3) points (exact, chunked O(N^2))."""
    best = 0.0
    chunk = max(1, 2_000_000 // max(len(pts), 1))
    for i in range(0, len(pts), chunk):
        d2 = ((pts[i : i + chunk, None, :] - pts[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))
