"""Procedural everyday-object meshes and printed-label textures for the training mesh library.

``ProceduralShapeGenerator`` turns a seeded ``np.random.Generator`` into a closed (or nearly closed) triangle
mesh of one of these families (``KINDS``), each with random parameters:

* ``box``: cartons, rounded or chamfered edges, optional taper;
* ``cylinder``: tins with beaded rims, recessed ends, ribs or a lid step (surface of revolution);
* ``bottle`` / ``jar`` / ``lathe``: closed surfaces of revolution from random smooth profiles;
* ``open_vessel``: glasses/vases with wall thickness; ``handled_vessel``: the same plus a swept handle;
* ``dish``: plates/saucers/shallow trays with a foot ring;
* ``tool``: hammer-, spatula-, screwdriver- and wrench-like (turned grip + head, concatenated);
* ``extrusion``: extruded 2D outlines (blobs, glyphs, rectilinear outlines, gears with holes);
* ``union``: 2-3 overlapping primitives (concatenated, no boolean engine);
* ``tube``: hollow straight tubes or solid rods swept along a smooth 3D curve;
* ``cone``: solid cones on a base or funnels with a spout.

Meshes are in arbitrary units (the library builder normalises size), the axis of revolved shapes is +z.
``LabelColorizer`` prints text, stripes, bands and logo-like marks on a photo crop or a solid colour and
projects the image cylindrically (revolved kinds) or per box face onto vertex colours.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

# kind -> (weight, projection used by the label texture, coarse group used in source paths)
KINDS: dict[str, tuple[float, str, str]] = {
    "box": (1.4, "box", "box"),
    "cylinder": (1.0, "cylindrical", "lathe"),
    "bottle": (1.2, "cylindrical", "lathe"),
    "jar": (0.8, "cylindrical", "lathe"),
    "lathe": (0.8, "cylindrical", "lathe"),
    "open_vessel": (0.7, "cylindrical", "lathe"),
    "handled_vessel": (0.8, "cylindrical", "sweep"),
    "dish": (0.6, "cylindrical", "lathe"),
    "tool": (1.0, "box", "tool"),
    "extrusion": (1.0, "box", "extrude"),
    "union": (0.8, "box", "union"),
    "tube": (0.6, "cylindrical", "sweep"),
    "cone": (0.6, "cylindrical", "lathe"),
}

LABEL_WORDS: tuple[str, ...] = (
    "FRESH", "NATURAL", "CLASSIC", "PREMIUM", "ORIGINAL", "EXTRA", "LIGHT", "PURE", "GOLD", "SPECIAL", "SUPER",
    "NOVA", "ALPHA", "DELTA", "OMEGA", "TERRA", "AQUA", "SOL", "LUNA", "BIO", "ECO", "PLUS", "MINI", "ULTRA",
    "SOFT", "CRISP", "ZEST", "MINT", "LEMON", "HERBAL", "OCEAN", "FOREST", "ARCTIC", "SUMMER", "NORD", "VITA",
    "Daily", "Home", "Kitchen", "Garden", "Studio", "Basic", "Select", "Family", "Pro", "Max", "Care", "Clean",
    "500 ml", "250 g", "1 L", "No. 7", "100%", "NEW", "2x", "XL", "since 1921", "made with care",
)
_FONTS: tuple[int, ...] = (
    cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_COMPLEX_SMALL, cv2.FONT_HERSHEY_SCRIPT_SIMPLEX,
    cv2.FONT_HERSHEY_SCRIPT_COMPLEX,
)


@dataclass(frozen=True)
class ProceduralConfig:
    """Knobs of procedural objects. ``kind_weights`` overrides the default family weights of ``KINDS``."""

    kind_weights: tuple[tuple[str, float], ...] | None = None
    sections: int = 112  # angular segments of revolved shapes
    profile_points: int = 60  # samples along a revolution profile
    p_label: float = 0.65  # label texture (else the library's photo/uniform/patches colours)
    p_label_photo: float = 0.45  # label printed on a photo crop (else on a solid colour)
    p_glossy: float = 0.4  # recorded finish (the renderer's specular is per image)
    label_height_px: int = 384


@dataclass
class ProceduralShape:
    """A generated mesh (``trimesh.Trimesh``, arbitrary units, revolution axis +z) and its metadata."""

    mesh: Any
    kind: str
    variant: str
    projection: str  # 'cylindrical' | 'box'

    @property
    def group(self) -> str:
        return KINDS[self.kind][2]


# ----------------------------------------------------------------------------------------------- helpers


def _chaikin(pts: np.ndarray, iters: int, closed: bool = False) -> np.ndarray:
    """Corner cutting of a (K, 2) polyline (endpoints kept when open)."""
    p = np.asarray(pts, dtype=np.float64)
    for _ in range(iters):
        a = p if closed else p[:-1]
        b = np.roll(p, -1, axis=0) if closed else p[1:]
        q = np.empty((2 * len(a), 2))
        q[0::2] = 0.75 * a + 0.25 * b
        q[1::2] = 0.25 * a + 0.75 * b
        p = q if closed else np.vstack([p[:1], q, p[-1:]])
    return p


def _resample(pts: np.ndarray, n: int, closed: bool = False) -> np.ndarray:
    """(K, 2) polyline -> (n, 2) points equally spaced by arc length (closed: no repeated end point)."""
    p = np.asarray(pts, dtype=np.float64)
    if closed:
        p = np.vstack([p, p[:1]])
    seg = np.linalg.norm(np.diff(p, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    t = np.linspace(0.0, s[-1], n + 1 if closed else n)
    if closed:
        t = t[:-1]
    return np.stack([np.interp(t, s, p[:, 0]), np.interp(t, s, p[:, 1])], axis=1)


def _smooth_profile(ctrl: Sequence[tuple[float, float]], n: int, iters: int = 3, closed: bool = False) -> np.ndarray:
    return _resample(_chaikin(np.asarray(ctrl, dtype=np.float64), iters, closed), n, closed)


def _oriented(mesh: Any) -> Any:
    """Flip the winding when the signed volume is negative (outward normals)."""
    if float(mesh.volume) < 0:
        mesh.invert()
    return mesh


def _lathe(profile: np.ndarray, sections: int, closed: bool = False) -> Any:
    """Surface of revolution about +z of a (K, 2) (r, z) profile; r == 0 endpoints become poles.

    ``closed``: the profile is a loop that does not touch the axis (tubes, funnels)."""
    import trimesh

    prof = np.asarray(profile, dtype=np.float64)
    prof[:, 0] = np.maximum(prof[:, 0], 0.0)
    ang = np.linspace(0.0, 2 * np.pi, sections, endpoint=False)
    ca, sa = np.cos(ang), np.sin(ang)
    verts: list[np.ndarray] = []
    ring_idx: list[np.ndarray | int] = []
    n = 0
    for r, z in prof:
        if r < 1e-9 and not closed:
            verts.append(np.array([[0.0, 0.0, z]]))
            ring_idx.append(n)
            n += 1
        else:
            verts.append(np.stack([r * ca, r * sa, np.full(sections, z)], axis=1))
            ring_idx.append(np.arange(n, n + sections))
            n += sections
    faces: list[np.ndarray] = []
    pairs = list(zip(ring_idx[:-1], ring_idx[1:], strict=True))
    if closed:
        pairs.append((ring_idx[-1], ring_idx[0]))
    for a, b in pairs:
        if isinstance(a, int) and isinstance(b, int):
            continue
        if isinstance(a, int):
            b1 = np.roll(b, -1)
            faces.append(np.stack([np.full(sections, a), b1, b], axis=1))
        elif isinstance(b, int):
            a1 = np.roll(a, -1)
            faces.append(np.stack([a, a1, np.full(sections, b)], axis=1))
        else:
            a1, b1 = np.roll(a, -1), np.roll(b, -1)
            faces.append(np.stack([a, a1, b1], axis=1))
            faces.append(np.stack([a, b1, b], axis=1))
    mesh = trimesh.Trimesh(np.vstack(verts), np.vstack(faces), process=True)
    return _oriented(mesh)


def _thick(outer: np.ndarray, t: float, to_axis: bool) -> np.ndarray:
    """Closed (r, z) profile of a wall of thickness ``t`` inside the ``outer`` (K, 2) curve.

    ``outer`` runs from the bottom (on the axis when ``to_axis``) to the rim. Returns outer + round lip +
    inner curve (offset along the 2D normal) back to the axis (or to the start)."""
    o = np.asarray(outer, dtype=np.float64)
    d = np.gradient(o, axis=0)
    d /= np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    nrm = np.stack([d[:, 1], -d[:, 0]], axis=1)  # outward for a curve running outwards/upwards
    inner = o - t * nrm
    if to_axis:
        inner[0] = (0.0, o[0, 1] + t)
    inner[:, 0] = np.maximum(inner[:, 0], 0.0)
    mid = 0.5 * (o[-1] + inner[-1])
    a0 = math.atan2(o[-1, 1] - mid[1], o[-1, 0] - mid[0])
    lip = np.array([mid + 0.5 * t * np.array([math.cos(a0 + s), math.sin(a0 + s)])
                    for s in np.linspace(0, np.pi, 7)[1:-1]])
    return np.vstack([o, lip, inner[::-1]])


def _sweep(path: np.ndarray, radius: float | np.ndarray, n_around: int = 24, aspect: float = 1.0,
           caps: bool = True) -> Any:
    """Tube of (elliptic) cross-section swept along a (K, 3) path with parallel-transport frames."""
    import trimesh

    p = np.asarray(path, dtype=np.float64)
    k = len(p)
    rad = np.broadcast_to(np.asarray(radius, dtype=np.float64), (k,))
    tan = np.gradient(p, axis=0)
    tan /= np.linalg.norm(tan, axis=1, keepdims=True)
    ref = np.array([0.0, 0.0, 1.0]) if abs(tan[0, 2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    nrm = np.cross(tan[0], ref)
    nrm /= np.linalg.norm(nrm)
    frames = []
    for i in range(k):
        nrm = nrm - tan[i] * float(nrm @ tan[i])
        nrm /= np.linalg.norm(nrm)
        frames.append((nrm.copy(), np.cross(tan[i], nrm)))
    ang = np.linspace(0, 2 * np.pi, n_around, endpoint=False)
    rings = np.stack([p[i] + rad[i] * (np.cos(ang)[:, None] * frames[i][0] + aspect * np.sin(ang)[:, None]
                                       * frames[i][1]) for i in range(k)])
    verts = rings.reshape(-1, 3)
    idx = np.arange(k * n_around).reshape(k, n_around)
    a, b = idx[:-1], idx[1:]
    a1, b1 = np.roll(a, -1, axis=1), np.roll(b, -1, axis=1)
    faces = [np.stack([a, a1, b1], -1).reshape(-1, 3), np.stack([a, b1, b], -1).reshape(-1, 3)]
    if caps:
        c0, c1 = len(verts), len(verts) + 1
        verts = np.vstack([verts, p[:1], p[-1:]])
        faces.append(np.stack([np.full(n_around, c0), np.roll(idx[0], -1), idx[0]], 1))
        faces.append(np.stack([np.full(n_around, c1), idx[-1], np.roll(idx[-1], -1)], 1))
    return _oriented(trimesh.Trimesh(verts, np.vstack(faces), process=True))


def _band_axis(h: float, r: float, n_core: int, n_band: int) -> np.ndarray:
    """Grid coordinates on [-h, h], denser in the rounding bands of width ``r`` at both ends."""
    band = np.linspace(-h, -h + r, n_band + 1)
    core = np.linspace(-h + r, h - r, n_core + 1)[1:-1]
    return np.concatenate([band, core, -band[::-1]])


def _rounded_box(half: np.ndarray, radius: float, chamfer: bool = False, cells: int = 20, band: int = 4) -> Any:
    """Closed box of half extents (3,) with edges rounded (or chamfered) by ``radius``."""
    import trimesh

    half = np.asarray(half, dtype=np.float64)
    r = float(min(radius, 0.95 * half.min()))
    unit = float(half.max()) / cells
    axes = [_band_axis(h, r, max(2, int(round(2 * (h - r) / unit))), band) for h in half]
    verts, faces, n = [], [], 0
    for k in range(3):
        a, b = [i for i in range(3) if i != k]
        ua, ub = np.meshgrid(axes[a], axes[b], indexing="ij")
        na, nb = ua.shape
        for sgn in (-1.0, 1.0):
            v = np.zeros((na * nb, 3))
            v[:, a], v[:, b], v[:, k] = ua.ravel(), ub.ravel(), sgn * half[k]
            idx = np.arange(na * nb).reshape(na, nb) + n
            q0, q1, q2, q3 = idx[:-1, :-1], idx[1:, :-1], idx[1:, 1:], idx[:-1, 1:]
            f = np.concatenate([np.stack([q0, q1, q2], -1).reshape(-1, 3), np.stack([q0, q2, q3], -1).reshape(-1, 3)])
            e1, e2 = np.zeros(3), np.zeros(3)
            e1[a], e2[b] = 1.0, 1.0
            if float(np.cross(e1, e2)[k]) * sgn < 0:
                f = f[:, ::-1]
            verts.append(v)
            faces.append(f)
            n += len(v)
    v = np.vstack(verts)
    inner = half - r
    q = np.clip(v, -inner, inner)
    d = v - q
    norm = np.abs(d).sum(1, keepdims=True) if chamfer else np.linalg.norm(d, axis=1, keepdims=True)
    v = q + r * d / np.maximum(norm, 1e-12)
    mesh = trimesh.Trimesh(v, np.vstack(faces), process=True)
    mesh.merge_vertices(digits_vertex=8)
    return _oriented(mesh)


def _mask_contours(mask: np.ndarray) -> list[np.ndarray]:
    cnts, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    return [c[:, 0, :].astype(np.float64) for c in cnts if len(c) >= 12]


def _inside_loops(pts: np.ndarray, loops: Sequence[np.ndarray]) -> np.ndarray:
    """Even-odd point-in-polygon test of (P, 2) points against closed (m, 2) loops (holes included) -> (P,) bool."""
    a = np.vstack(loops)
    b = np.vstack([np.roll(lp, -1, axis=0) for lp in loops])
    inside = np.zeros(len(pts), dtype=bool)
    for i in range(0, len(pts), 2048):
        x, y = pts[i : i + 2048, 0:1], pts[i : i + 2048, 1:2]
        straddle = (a[None, :, 1] > y) != (b[None, :, 1] > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = a[None, :, 0] + (y - a[None, :, 1]) * (b[None, :, 0] - a[None, :, 0]) / (b[None, :, 1] - a[None, :, 1])
        inside[i : i + 2048] = (straddle & (x < xc)).sum(1) % 2 == 1
    return inside


def extrude_mask(mask: np.ndarray, depth: float, spacing: float = 6.0) -> Any:
    """Closed prism of a binary (H, W) uint8 mask (pixel units, holes kept), ``depth`` px along +z.

    Caps: Delaunay triangulation of resampled outline points plus an interior grid, triangles outside
    the mask dropped; walls: quads between consecutive outline points."""
    import trimesh
    from scipy.spatial import Delaunay

    sb = spacing * 0.6
    loops = []
    for c in _mask_contours(mask):
        length = float(np.linalg.norm(np.diff(np.vstack([c, c[:1]]), axis=0), axis=1).sum())
        m = max(8, int(round(length / sb)))
        loop = _resample(_chaikin(c, 1, closed=True), m, closed=True)
        t = np.roll(loop, -1, axis=0) - loop
        nrm = np.stack([t[:, 1], -t[:, 0]], 1) / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)
        probe = np.rint(loop + 0.5 * t + 2.0 * nrm).astype(int)
        probe[:, 0] = np.clip(probe[:, 0], 0, mask.shape[1] - 1)
        probe[:, 1] = np.clip(probe[:, 1], 0, mask.shape[0] - 1)
        if (mask[probe[:, 1], probe[:, 0]] > 0).mean() > 0.5:  # wall normal must point out of the material
            loop = loop[::-1]
        loops.append(loop)
    if not loops:
        raise ValueError("empty mask")
    dist = cv2.distanceTransform((mask > 0).astype(np.uint8), cv2.DIST_L2, 5)
    gy, gx = np.mgrid[0 : mask.shape[0] : spacing, 0 : mask.shape[1] : spacing]
    gx, gy = gx.ravel().astype(np.float64), gy.ravel().astype(np.float64)
    keep = dist[np.clip(gy.astype(int), 0, mask.shape[0] - 1), np.clip(gx.astype(int), 0, mask.shape[1] - 1)] \
        > 0.7 * spacing
    pts2 = np.vstack([*loops, np.stack([gx[keep], gy[keep]], 1)])
    tri = Delaunay(pts2).simplices
    tri = tri[_inside_loops(pts2[tri].mean(1), loops)]
    p = pts2[tri]
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    cross = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    tri = np.where(cross[:, None] < 0, tri[:, ::-1], tri)
    n2 = len(pts2)
    verts = [np.column_stack([pts2, np.zeros(n2)]), np.column_stack([pts2, np.full(n2, depth)])]
    faces = [tri[:, ::-1], tri + n2]
    n = 2 * n2
    layers = max(1, int(round(depth / sb)))
    zs = np.linspace(0.0, depth, layers + 1)
    for loop in loops:
        m = len(loop)
        ring = np.concatenate([np.column_stack([loop, np.full(m, z)]) for z in zs])
        idx = np.arange(len(ring)).reshape(layers + 1, m) + n
        a, b = idx[:-1], idx[1:]
        a1, b1 = np.roll(a, -1, axis=1), np.roll(b, -1, axis=1)
        faces += [np.stack([a, a1, b1], -1).reshape(-1, 3), np.stack([a, b1, b], -1).reshape(-1, 3)]
        verts.append(ring)
        n += len(ring)
    mesh = trimesh.Trimesh(np.vstack(verts), np.vstack(faces), process=True)
    mesh.merge_vertices(digits_vertex=6)
    return _oriented(mesh)


def _transform(mesh: Any, R: np.ndarray | None = None, t: Sequence[float] = (0, 0, 0)) -> Any:
    T = np.eye(4)
    if R is not None:
        T[:3, :3] = R
    T[:3, 3] = t
    m = mesh.copy()
    m.apply_transform(T)
    return m


_TO_X = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])  # maps +z to +x
_TO_Y = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])  # maps +z to -y


def _concat(parts: Sequence[Any]) -> Any:
    import trimesh

    return trimesh.util.concatenate(list(parts))


# ----------------------------------------------------------------------------------------------- shapes


class ProceduralShapeGenerator:
    """Random everyday-object meshes (see module docstring). Call with a Generator -> ``ProceduralShape``."""

    def __init__(self, config: ProceduralConfig | None = None) -> None:
        self.config = config or ProceduralConfig()
        weights = dict(self.config.kind_weights) if self.config.kind_weights else {k: w for k, (w, _, _) in
                                                                                   KINDS.items()}
        unknown = sorted(set(weights) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown procedural kinds {unknown}")
        self.kinds = [k for k in KINDS if weights.get(k, 0.0) > 0]
        w = np.array([weights[k] for k in self.kinds], dtype=np.float64)
        self.p = w / w.sum()

    def __call__(self, rng: np.random.Generator, kind: str | None = None) -> ProceduralShape:
        kind = kind or self.kinds[int(rng.choice(len(self.kinds), p=self.p))]
        if kind not in KINDS:
            raise ValueError(f"unknown procedural kind {kind!r}")
        mesh, variant = getattr(self, f"_{kind}")(rng)
        return ProceduralShape(mesh, kind, variant, KINDS[kind][1])

    # -- revolved
    def _lathe_mesh(self, prof: np.ndarray, closed: bool = False) -> Any:
        return _lathe(prof, self.config.sections, closed=closed)

    def _n(self, scale: float = 1.0) -> int:
        return max(12, int(self.config.profile_points * scale))

    def _box(self, rng: np.random.Generator) -> tuple[Any, str]:
        half = np.array([1.0, rng.uniform(0.25, 1.0), rng.uniform(0.4, 2.2)])
        rng.shuffle(half[:2])
        chamfer = bool(rng.random() < 0.3)
        radius = float(half.min() * rng.uniform(0.03, 0.35))
        mesh = _rounded_box(half, radius, chamfer=chamfer)
        variant = "chamfered" if chamfer else "rounded"
        if rng.random() < 0.25:  # tapered carton
            v = mesh.vertices.copy()
            s = 1.0 - rng.uniform(0.1, 0.35) * (v[:, 2] - v[:, 2].min()) / np.ptp(v[:, 2])
            v[:, :2] *= s[:, None]
            mesh.vertices = v
            variant += "_tapered"
        return mesh, variant

    def _cylinder(self, rng: np.random.Generator) -> tuple[Any, str]:
        R, H = 1.0, rng.uniform(0.4, 3.0)
        rim, rec = rng.uniform(0.03, 0.08), rng.uniform(0.0, 0.06) * min(H, 1.0)
        bead = rng.uniform(0.01, 0.03)
        prof = [(0.0, rec), (R - rim, rec), (R - 0.4 * rim, 0.0), (R, 0.5 * rim)]
        variant = "tin"
        if rng.random() < 0.4:  # ribs
            zz = np.linspace(0.15 * H, 0.85 * H, 40)
            nr = int(rng.integers(2, 9))
            rr = R - bead * 2 * np.sin(np.pi * nr * (zz - zz[0]) / (zz[-1] - zz[0])) ** 2
            prof += [(R, 0.1 * H), *zip(rr, zz, strict=True), (R, 0.9 * H)]
            variant += "_ribbed"
        top = [(R, H - 0.5 * rim), (R - 0.4 * rim, H), (R - rim, H - rec), (0.0, H - rec)]
        if rng.random() < 0.35:  # lid step
            lh = rng.uniform(0.08, 0.25) * H
            e = rng.uniform(0.02, 0.05)
            top = [(R, H - lh), (R + e, H - lh), (R + e, H - 0.3 * rim), (R + e - 0.3 * rim, H), (0.0, H)]
            variant += "_lid"
        prof += top
        return self._lathe_mesh(_smooth_profile(prof, self._n(1.2), iters=2)), variant

    def _bottle(self, rng: np.random.Generator) -> tuple[Any, str]:
        R, H = 1.0, rng.uniform(2.2, 5.0)
        zs = rng.uniform(0.4, 0.7) * H
        zn = zs + rng.uniform(0.1, 0.25) * H
        rn = rng.uniform(0.18, 0.45)
        zc = min(zn + rng.uniform(0.05, 0.2) * H, 0.93 * H)
        rc = rn * rng.uniform(1.0, 1.3)
        c = rng.uniform(0.05, 0.2)
        prof = [(0.0, 0.0), (R - c, 0.0), (R, c), (R, zs)]
        if rng.random() < 0.35:  # waist
            prof.insert(3, (R * rng.uniform(0.75, 0.92), zs * rng.uniform(0.4, 0.6)))
        prof += [(rn, zn), (rn, zc), (rc, zc), (rc, H), (0.0, H)]
        return self._lathe_mesh(_smooth_profile(prof, self._n(1.3), iters=3)), "bottle"

    def _jar(self, rng: np.random.Generator) -> tuple[Any, str]:
        R, H = 1.0, rng.uniform(0.7, 2.0)
        rl = rng.uniform(0.7, 0.98) * R
        zl = H * rng.uniform(0.72, 0.88)
        rs = rng.uniform(0.85, 1.0) * rl
        prof = [(0.0, 0.0), (0.9 * R, 0.0), (R, 0.08 * H), (R, 0.75 * zl), (rs, zl - 0.03 * H),
                (rl * 1.04, zl), (rl * 1.04, H - 0.02), (rl * 0.98, H), (0.0, H)]
        return self._lathe_mesh(_smooth_profile(prof, self._n(1.1), iters=2)), "jar"

    def _random_outer(self, rng: np.random.Generator, H: float, k: int) -> list[tuple[float, float]]:
        from scipy.interpolate import PchipInterpolator

        zc = np.linspace(0.0, H, k)
        rc = rng.uniform(0.35, 1.0, size=k)
        zz = np.linspace(0.0, H, 40)
        rr = PchipInterpolator(zc, rc)(zz)
        return list(zip(rr, zz, strict=True))

    def _lathe(self, rng: np.random.Generator) -> tuple[Any, str]:
        H = rng.uniform(1.0, 4.0)
        body = self._random_outer(rng, H, int(rng.integers(4, 8)))
        prof = [(0.0, 0.0), *body, (0.0, H)]
        return self._lathe_mesh(_smooth_profile(prof, self._n(1.3), iters=2)), "vase_closed"

    def _open_outer(self, rng: np.random.Generator) -> tuple[np.ndarray, float, str]:
        H = rng.uniform(1.0, 3.5)
        if rng.random() < 0.5:  # glass / beaker: straight or flared
            rt = rng.uniform(0.8, 1.4)
            side = [(1.0 + (rt - 1.0) * z / H, z) for z in np.linspace(0.05 * H, H, 12)]
            variant = "glass"
        else:
            side = self._random_outer(rng, H, int(rng.integers(3, 6)))[2:]
            variant = "vase_open"
        r0 = side[0][0]
        ctrl = [(0.0, 0.0), (0.85 * r0, 0.0), *side]
        outer = _smooth_profile(ctrl, self._n(0.6), iters=2)
        return outer, H, variant

    def _open_vessel(self, rng: np.random.Generator) -> tuple[Any, str]:
        outer, H, variant = self._open_outer(rng)
        t = rng.uniform(0.03, 0.08)
        return self._lathe_mesh(_thick(outer, t, to_axis=True)), variant

    def _handled_vessel(self, rng: np.random.Generator) -> tuple[Any, str]:
        H = rng.uniform(0.8, 1.6)
        rt = rng.uniform(0.9, 1.15)
        outer = _smooth_profile([(0.0, 0.0), (0.9, 0.0), (1.0, 0.08)] + [(1.0 + (rt - 1.0) * z / H, z)
                                                                         for z in np.linspace(0.1, H, 8)],
                                self._n(0.55), iters=2)
        t = rng.uniform(0.04, 0.08)
        body = self._lathe_mesh(_thick(outer, t, to_axis=True))
        z0, z1 = H * rng.uniform(0.12, 0.3), H * rng.uniform(0.7, 0.88)
        reach = rng.uniform(0.35, 0.7)
        r0, r1 = 1.0 + (rt - 1.0) * z0 / H - 0.5 * t, 1.0 + (rt - 1.0) * z1 / H - 0.5 * t
        ctrl = np.array([[r1, 0, z1], [r1 + reach * 1.2, 0, z1 + 0.1 * H], [r0 + reach * 1.2, 0, z0 - 0.05 * H],
                         [r0, 0, z0]])
        s = np.linspace(0, 1, 48)[:, None]
        bez = ((1 - s) ** 3 * ctrl[0] + 3 * (1 - s) ** 2 * s * ctrl[1] + 3 * (1 - s) * s**2 * ctrl[2]
               + s**3 * ctrl[3])
        rad = rng.uniform(0.06, 0.12)
        handle = _sweep(bez, rad, n_around=20, aspect=rng.uniform(0.6, 1.4))
        return _concat([body, handle]), "handled"

    def _dish(self, rng: np.random.Generator) -> tuple[Any, str]:
        R = 1.0
        t = rng.uniform(0.025, 0.05)
        h = rng.uniform(0.08, 0.3)
        rw = rng.uniform(0.35, 0.7)
        foot = rng.uniform(0.02, 0.05)
        rr = np.linspace(0.0, R, 50)
        x = np.clip((rr - rw) / (R - rw), 0.0, 1.0)
        ztop = foot + t + (h - foot - t) * x ** rng.uniform(1.2, 2.5)
        rf = rw * rng.uniform(0.6, 0.95)
        zbot = ztop - t
        zbot[rr < rf] = foot
        ring = (rr >= rf) & (rr <= rf + 0.04)
        zbot[ring] = 0.0
        outer = [(0.0, foot), *zip(rr[1:], zbot[1:], strict=True)]
        inner = list(zip(rr[::-1][1:-1], ztop[::-1][1:-1], strict=True))
        prof = [*outer, (R + 0.3 * t, h - 0.5 * t), *inner, (0.0, foot + t)]
        return self._lathe_mesh(_smooth_profile(prof, self._n(1.3), iters=1)), "plate"

    def _cone(self, rng: np.random.Generator) -> tuple[Any, str]:
        if rng.random() < 0.5:
            R, H = 1.0, rng.uniform(1.0, 3.0)
            b = rng.uniform(0.04, 0.12)
            rb = R * rng.uniform(1.0, 1.3)
            tip = rng.uniform(0.05, 0.2)
            prof = [(0.0, 0.0), (rb, 0.0), (rb, b), (R, b), (tip, H), (0.0, H)]
            return self._lathe_mesh(_smooth_profile(prof, self._n(1.2), iters=2)), "cone"
        rs, R = rng.uniform(0.08, 0.2), 1.0
        hs, H = rng.uniform(0.4, 1.2), rng.uniform(1.2, 2.2)
        t = rng.uniform(0.03, 0.06)
        outer = _smooth_profile([(rs, 0.0), (rs, hs), (R, H)], self._n(0.6), iters=2)
        prof = _thick(outer, t, to_axis=False)
        return self._lathe_mesh(prof, closed=True), "funnel"

    def _tube(self, rng: np.random.Generator) -> tuple[Any, str]:
        if rng.random() < 0.5:
            ro, H = 1.0, rng.uniform(0.5, 4.0)
            ri = ro * rng.uniform(0.6, 0.92)
            c = 0.3 * (ro - ri)
            loop = [(ri, c), (ri + c, 0.0), (ro - c, 0.0), (ro, c), (ro, H - c), (ro - c, H), (ri + c, H), (ri, H - c)]
            prof = _smooth_profile(loop, self._n(1.2), iters=2, closed=True)
            return self._lathe_mesh(prof, closed=True), "hollow"
        ctrl = rng.uniform(-1, 1, size=(4, 3)) * np.array([1.0, 1.0, 0.6])
        ctrl[0], ctrl[3] = (-1.0, 0.0, 0.0), (1.0, 0.0, 0.0)
        s = np.linspace(0, 1, 120)[:, None]
        bez = ((1 - s) ** 3 * ctrl[0] + 3 * (1 - s) ** 2 * s * ctrl[1] + 3 * (1 - s) * s**2 * ctrl[2]
               + s**3 * ctrl[3])
        return _sweep(bez, rng.uniform(0.06, 0.15), n_around=40), "bent_rod"

    # -- composed
    def _grip(self, rng: np.random.Generator, length: float, radius: float) -> Any:
        """Turned grip along +x from 0 to ``length``."""
        bulge = rng.uniform(0.9, 1.25)
        prof = [(0.0, 0.0), (0.8 * radius, 0.0), (radius, 0.05 * length), (radius * bulge, 0.5 * length),
                (radius * rng.uniform(0.8, 1.0), 0.95 * length), (0.7 * radius, length), (0.0, length)]
        return _transform(_lathe(_smooth_profile(prof, 40, iters=2), 48), _TO_X)

    def _tool(self, rng: np.random.Generator) -> tuple[Any, str]:
        variant = str(rng.choice(["hammer", "spatula", "screwdriver", "wrench"]))
        L, r = 1.0, rng.uniform(0.035, 0.07)
        if variant == "wrench":
            mask = np.zeros((160, 512), np.uint8)
            w = int(rng.integers(14, 26))
            cv2.rectangle(mask, (60, 80 - w // 2), (452, 80 + w // 2), 255, -1)
            for cx in (60, 452):
                rad = int(rng.integers(34, 56))
                cv2.circle(mask, (cx, 80), rad, 255, -1)
                if rng.random() < 0.6:
                    cv2.circle(mask, (cx, 80), int(rad * rng.uniform(0.45, 0.65)), 0, -1)
                else:
                    cv2.rectangle(mask, (cx - rad, 80 - rad // 3), (cx - rad // 3 if cx < 256 else cx + rad,
                                                                     80 + rad // 3), 0, -1)
            m = extrude_mask(mask, depth=float(rng.uniform(8, 16)), spacing=5.0)
            return m, variant
        grip_len = L * rng.uniform(0.35, 0.6)
        parts = [self._grip(rng, grip_len, r)]
        if variant == "hammer":
            ls = L - grip_len
            shaft = _transform(_lathe(_smooth_profile([(0, 0), (0.7 * r, 0), (0.7 * r, ls), (0, ls)], 30, 1), 40),
                               _TO_X, (grip_len * 0.95, 0, 0))
            head = _rounded_box(np.array([rng.uniform(0.05, 0.1), rng.uniform(0.05, 0.09), rng.uniform(0.15, 0.3)]),
                                0.015, chamfer=bool(rng.random() < 0.5), cells=10)
            parts += [shaft, _transform(head, None, (L, 0, rng.uniform(-0.08, 0.0)))]
        elif variant == "spatula":
            mask = np.zeros((256, 384), np.uint8)
            cv2.ellipse(mask, (240, 128), (130, int(rng.integers(60, 110))), 0, 0, 360, 255, -1)
            cv2.rectangle(mask, (0, 118), (200, 138), 255, -1)
            if rng.random() < 0.6:  # slots
                for k in range(int(rng.integers(2, 5))):
                    y = 128 + (k - 1.5) * 22
                    cv2.rectangle(mask, (200, int(y - 5)), (320, int(y + 5)), 0, -1)
            blade = extrude_mask(mask, depth=float(rng.uniform(5, 10)), spacing=6.0)
            blade.apply_scale(0.55 * L / 384)
            bv = blade.vertices
            blade.apply_translation((grip_len * 0.9 - bv[:, 0].min(), -0.5 * (bv[:, 1].min() + bv[:, 1].max()),
                                     -0.5 * (bv[:, 2].min() + bv[:, 2].max())))
            parts.append(blade)
        else:  # screwdriver
            rs = r * rng.uniform(0.2, 0.35)
            ls = L * rng.uniform(0.4, 0.7)
            prof = [(0, 0), (rs, 0), (rs, 0.85 * ls), (0.6 * rs, ls), (0, ls)]
            shaft = _lathe(_smooth_profile(prof, 30, 1), 32)
            shaft.vertices[:, 0] *= np.where(shaft.vertices[:, 2] > 0.8 * ls, 1.6, 1.0)
            shaft.vertices[:, 1] *= np.where(shaft.vertices[:, 2] > 0.8 * ls, 0.35, 1.0)
            parts.append(_transform(shaft, _TO_X, (grip_len * 0.97, 0, 0)))
        return _concat(parts), variant

    def _extrusion(self, rng: np.random.Generator) -> tuple[Any, str]:
        size = 256
        mask = np.zeros((size, size), np.uint8)
        variant = str(rng.choice(["blob", "glyph", "rectilinear", "gear"], p=[0.3, 0.3, 0.2, 0.2]))
        c = size / 2
        if variant == "blob":
            ang = np.linspace(0, 2 * np.pi, 180, endpoint=False)
            rad = np.ones_like(ang)
            for k in range(1, 6):
                rad += rng.normal(0, 0.25 / k) * np.cos(k * ang + rng.uniform(0, 2 * np.pi))
            rad = 0.4 * size * rad / rad.max()
            pts = np.stack([c + rad * np.cos(ang), c + rad * np.sin(ang)], 1)
            cv2.fillPoly(mask, [np.rint(pts).astype(np.int32)], 255)
        elif variant == "glyph":
            ch = str(rng.choice(list("ABDEFGHKMNPRSTUWXYZ023456789&%#@?")))
            font = _FONTS[int(rng.integers(0, 6))]
            thick = int(rng.integers(18, 34))
            (tw, th), _ = cv2.getTextSize(ch, font, 1.0, thick)
            scale = 0.7 * size / max(tw, th)
            (tw, th), _ = cv2.getTextSize(ch, font, scale, thick)
            cv2.putText(mask, ch, (int(c - tw / 2), int(c + th / 2)), font, scale, 255, thick, cv2.LINE_AA)
            mask = (mask > 127).astype(np.uint8) * 255
            mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
        elif variant == "rectilinear":
            for _ in range(int(rng.integers(2, 4))):
                x0, y0 = rng.integers(30, 150, size=2)
                w, h = rng.integers(35, 100, size=2)
                cv2.rectangle(mask, (int(x0), int(y0)), (int(min(x0 + w, 226)), int(min(y0 + h, 226))), 255, -1)
            nlab, lab = cv2.connectedComponents(mask)
            if nlab > 2:  # keep the largest piece
                big = 1 + int(np.argmax(np.bincount(lab.ravel())[1:]))
                mask = ((lab == big) * 255).astype(np.uint8)
        else:
            teeth = int(rng.integers(6, 16))
            ang = np.linspace(0, 2 * np.pi, teeth * 12, endpoint=False)
            rad = 0.4 * size * (1 - 0.12 * (np.sin(teeth * ang) > 0))
            pts = np.stack([c + rad * np.cos(ang), c + rad * np.sin(ang)], 1)
            cv2.fillPoly(mask, [np.rint(pts).astype(np.int32)], 255)
            cv2.circle(mask, (int(c), int(c)), int(rng.uniform(0.08, 0.2) * size), 0, -1)
        depth = float(rng.uniform(0.08, 0.6) * size)
        spacing = 5.0 if depth < 60 else 6.0
        mesh = extrude_mask(mask, depth, spacing=spacing)
        while len(mesh.faces) > 19000:  # keep within the library's face budget
            spacing *= 1.25
            mesh = extrude_mask(mask, depth, spacing=spacing)
        return mesh, variant

    def _union(self, rng: np.random.Generator) -> tuple[Any, str]:
        import trimesh

        from osop_ros.core.geometry import random_rotation

        names: list[str] = []
        parts: list[Any] = []
        for i in range(int(rng.integers(2, 4))):
            which = str(rng.choice(["box", "cyl", "sphere", "capsule"]))
            s = rng.uniform(0.3, 1.0) if i else 1.0
            if which == "box":
                m = _rounded_box(s * rng.uniform(0.3, 1.0, size=3), 0.04 * s, cells=14)
            elif which == "cyl":
                h = s * rng.uniform(0.4, 2.0)
                m = _lathe(_smooth_profile([(0, 0), (s * 0.5, 0), (s * 0.5, h), (0, h)], 36, 1), 64)
                m.apply_translation((0, 0, -h / 2))
            elif which == "sphere":
                m = trimesh.creation.icosphere(subdivisions=3, radius=0.5 * s)
            else:
                h = s * rng.uniform(0.5, 1.5)
                prof = [(0.3 * s * math.sin(a), -h / 2 - 0.3 * s * math.cos(a)) for a in np.linspace(0, np.pi / 2, 8)]
                prof += [(0.3 * s * math.cos(a), h / 2 + 0.3 * s * math.sin(a)) for a in np.linspace(0, np.pi / 2, 8)]
                m = _lathe(np.array([(0.0, -h / 2 - 0.3 * s), *prof[1:], (0.0, h / 2 + 0.3 * s)]), 48)
            if i:
                R = random_rotation(rng) if rng.random() < 0.4 else None
                d = rng.normal(size=3)
                d /= np.linalg.norm(d)
                ext = parts[0].extents
                m = _transform(m, R, d * 0.5 * ext * rng.uniform(0.6, 1.0))
            parts.append(m)
            names.append(which)
        return _concat(parts), "+".join(names)


# ----------------------------------------------------------------------------------------------- labels


def _hsv_rgb(h: float, s: float, v: float) -> np.ndarray:
    """HSV (h in [0, 180), s, v in [0, 1]) -> (3,) uint8 RGB."""
    hsv = np.array([[[h, s * 255, v * 255]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return _hsv_rgb(rng.uniform(0, 180), float(rng.choice([rng.uniform(0, 0.2), rng.uniform(0.3, 1.0)])),
                    rng.uniform(0.15, 1.0))


def _contrast(base: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A colour readable on ``base`` (3,) uint8."""
    lum = float(np.asarray(base, np.float64) @ (0.3, 0.59, 0.11))
    for _ in range(8):
        c = _random_colour(rng)
        if abs(float(c.astype(np.float64) @ (0.3, 0.59, 0.11)) - lum) > 80:
            return tuple(int(x) for x in c)  # type: ignore[return-value]
    return (255, 255, 255) if lum < 128 else (10, 10, 10)


class LabelColorizer:
    """Printed-label vertex colours: text/stripes/bands/logos on a photo crop or solid colour.

    The image is projected cylindrically about +z (revolved kinds; caps get a planar top view) or
    onto the six faces of the bounding box (dominant normal), then blurred to the vertex spacing and
    sampled at the vertices."""

    def __init__(self, texture_images: Sequence[Path] = (), p_photo: float = 0.45, height_px: int = 384) -> None:
        self.texture_images = list(texture_images)
        self.p_photo = float(p_photo)
        self.height_px = int(height_px)

    def base(self, w: int, h: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """(h, w, 3) uint8 background: photo crop or solid colour with mild shading noise."""
        if self.texture_images and rng.random() < self.p_photo:
            img = cv2.imread(str(self.texture_images[int(rng.integers(len(self.texture_images)))]), cv2.IMREAD_COLOR)
            if img is not None:
                img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
                ih, iw = img.shape[:2]
                f = rng.uniform(0.4, 1.0)
                cw, ch = int(iw * f), int(min(ih, iw * f * h / max(w, 1)))
                x0, y0 = int(rng.integers(0, iw - cw + 1)), int(rng.integers(0, ih - ch + 1))
                return cv2.resize(img[y0 : y0 + ch, x0 : x0 + cw], (w, h), interpolation=cv2.INTER_AREA), "photo"
        col = _random_colour(rng).astype(np.float32)
        img = np.broadcast_to(col, (h, w, 3)).astype(np.float32)
        img = img * (1.0 + rng.normal(0, 0.015, size=(h, w, 1)).astype(np.float32))
        return np.ascontiguousarray(np.clip(img, 0, 255), dtype=np.uint8), "solid"

    def decorate(self, img: np.ndarray, rng: np.random.Generator, band: bool = True) -> np.ndarray:
        """Draw a label band, stripes, text lines and logo marks on ``img`` (h, w, 3) uint8 (in place)."""
        h, w = img.shape[:2]
        bg = img[h // 2, w // 2].copy()
        y0, y1 = 0, h
        if band and rng.random() < 0.7:  # label band around the object
            y0 = int(h * rng.uniform(0.1, 0.45))
            y1 = int(min(h, y0 + h * rng.uniform(0.25, 0.6)))
            bg = np.asarray(_random_colour(rng))
            cv2.rectangle(img, (0, y0), (w, y1), tuple(int(x) for x in bg), -1)
        for _ in range(int(rng.integers(0, 4))):  # stripes
            y = int(rng.uniform(0, h))
            t = int(max(1, h * rng.uniform(0.005, 0.04)))
            cv2.rectangle(img, (0, y), (w, y + t), _contrast(bg, rng), -1)
        reps = 1 if w <= 1.6 * h else int(rng.integers(1, 3))
        for rep in range(reps):
            x_lo, x_hi = rep * w // reps, (rep + 1) * w // reps
            ink = _contrast(bg, rng)
            n_lines = int(rng.integers(1, 4))
            yy = y0 + (y1 - y0) * (np.arange(n_lines) + 1) / (n_lines + 1)
            for li, y in enumerate(yy):
                word = str(rng.choice(LABEL_WORDS))
                font = _FONTS[int(rng.integers(len(_FONTS)))] | (cv2.FONT_ITALIC if rng.random() < 0.2 else 0)
                thick = int(rng.integers(1, 5)) * max(1, h // 200)
                (tw, th), _ = cv2.getTextSize(word, font, 1.0, thick)
                frac = rng.uniform(0.4, 0.85) if li == 0 else rng.uniform(0.2, 0.5)
                scale = min(frac * (x_hi - x_lo) / max(tw, 1), 0.8 * (y1 - y0) / n_lines / max(th, 1))
                (tw, th), _ = cv2.getTextSize(word, font, scale, thick)
                x = int(x_lo + (x_hi - x_lo - tw) * rng.uniform(0.2, 0.8))
                cv2.putText(img, word, (x, int(y + th / 2)), font, max(scale, 0.2), ink, thick, cv2.LINE_AA)
            if rng.random() < 0.6:  # logo mark
                cx = int(rng.uniform(x_lo + 0.1 * (x_hi - x_lo), x_hi - 0.1 * (x_hi - x_lo)))
                cy = int(rng.uniform(0.1, 0.9) * h)
                rr = int(h * rng.uniform(0.04, 0.15))
                col = _contrast(bg, rng)
                shape = int(rng.integers(3))
                if shape == 0:
                    cv2.circle(img, (cx, cy), rr, col, -1 if rng.random() < 0.6 else max(2, rr // 5), cv2.LINE_AA)
                elif shape == 1:
                    cv2.rectangle(img, (cx - rr, cy - rr // 2), (cx + rr, cy + rr // 2), col, -1)
                else:
                    k = int(rng.integers(3, 7))
                    a = np.linspace(0, 2 * np.pi, 2 * k, endpoint=False) + rng.uniform(0, np.pi)
                    rad = np.where(np.arange(2 * k) % 2 == 0, rr, rr * 0.45)
                    pts = np.stack([cx + rad * np.cos(a), cy + rad * np.sin(a)], 1)
                    cv2.fillPoly(img, [np.rint(pts).astype(np.int32)], col, cv2.LINE_AA)
        return img

    def __call__(self, vertices: np.ndarray, normals: np.ndarray, projection: str,
                 rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """vertices (N, 3) metres (revolution axis +z through the origin), normals (N, 3) ->
        (colours (N, 3) uint8, label base 'photo'|'solid')."""
        v = np.asarray(vertices, dtype=np.float64)
        n = np.asarray(normals, dtype=np.float64)
        lo, hi = v.min(0), v.max(0)
        ext = np.maximum(hi - lo, 1e-9)
        spacing = math.sqrt(_surface_area_estimate(ext) / max(len(v), 1))  # metres between vertices
        H = self.height_px
        out = np.zeros((len(v), 3), dtype=np.float64)
        if projection == "cylindrical":
            rad = np.linalg.norm(v[:, :2], axis=1)
            circ = 2 * np.pi * float(np.percentile(rad, 75))
            W = int(np.clip(H * circ / ext[2], 64, 4 * H))
            img, base_kind = self.base(W, H, rng)
            img = self.decorate(img, rng, band=True)
            u = (np.arctan2(v[:, 1], v[:, 0]) / (2 * np.pi) + 0.5) * (W - 1)
            vv = (1.0 - (v[:, 2] - lo[2]) / ext[2]) * (H - 1)
            side = _sample(_blur(img, spacing * H / ext[2]), u, vv, wrap=True)
            cap_img, _ = self.base(H, H, rng) if base_kind == "photo" else (np.broadcast_to(
                img[2, 2], (H, H, 3)).copy(), "solid")
            if rng.random() < 0.5:
                self.decorate(cap_img, rng, band=False)
            r_max = max(float(rad.max()), 1e-9)
            cu = (v[:, 0] / r_max * 0.5 + 0.5) * (H - 1)
            cv_ = (0.5 - v[:, 1] / r_max * 0.5) * (H - 1)
            cap = _sample(_blur(cap_img, spacing * H / (2 * r_max)), cu, cv_)
            w_cap = np.clip((np.abs(n[:, 2]) - 0.6) / 0.25, 0.0, 1.0)[:, None]
            out = (1 - w_cap) * side + w_cap * cap
            return np.clip(np.rint(out), 0, 255).astype(np.uint8), base_kind
        # box: one image per face of the bounding box, chosen by the dominant normal direction
        axis = np.argmax(np.abs(n), axis=1)
        sign = np.sign(n[np.arange(len(n)), axis])
        base_img, base_kind = self.base(H, H, rng)
        for k in range(3):
            a, b = ((1, 2), (0, 2), (0, 1))[k]  # right/up axes of the face
            for sgn in (-1.0, 1.0):
                sel = (axis == k) & (sign == sgn)
                if not sel.any():
                    continue
                fw = int(np.clip(H * ext[a] / ext[b], 32, 3 * H))
                img = cv2.resize(base_img, (fw, H), interpolation=cv2.INTER_AREA)
                if k != 2 or rng.random() < 0.4:
                    self.decorate(img, rng, band=k != 2 and rng.random() < 0.5)
                ua = (v[sel, a] - lo[a]) / ext[a]
                if (k == 0 and sgn < 0) or (k == 1 and sgn > 0) or (k == 2 and sgn < 0):
                    ua = 1.0 - ua  # read the print from outside the face
                ub = 1.0 - (v[sel, b] - lo[b]) / ext[b]
                out[sel] = _sample(_blur(img, spacing * H / ext[b]), ua * (fw - 1), ub * (H - 1))
        return np.clip(np.rint(out), 0, 255).astype(np.uint8), base_kind


def _surface_area_estimate(ext: np.ndarray) -> float:
    return 2.0 * float(ext[0] * ext[1] + ext[1] * ext[2] + ext[0] * ext[2])


def _blur(img: np.ndarray, px_per_vertex: float) -> np.ndarray:
    """Low-pass ``img`` to the vertex spacing (``px_per_vertex`` texels between vertices)."""
    sigma = 0.4 * float(px_per_vertex)
    if sigma < 0.6:
        return img.astype(np.float32)
    return cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigmaX=min(sigma, 40.0))


def _sample(img: np.ndarray, u: np.ndarray, v: np.ndarray, wrap: bool = False) -> np.ndarray:
    """Bilinear sample (h, w, 3) at pixel coordinates u (x), v (y) -> (N, 3) float."""
    border = cv2.BORDER_WRAP if wrap else cv2.BORDER_REFLECT
    s = cv2.remap(img.astype(np.float32), u.astype(np.float32).reshape(1, -1), v.astype(np.float32).reshape(1, -1),
                  cv2.INTER_LINEAR, borderMode=border)
    return s.reshape(-1, 3).astype(np.float64)
