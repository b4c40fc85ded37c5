"""Colour search over the shape's own symmetries (after ICP): which of the poses that the geometry
cannot tell apart does the colouring support?

A can, a box or a torus printed with a label or a pattern is symmetric in shape but not in colour: the
depth, the silhouette and the contour edges of a pose ``T`` and of ``T @ S`` agree for every shape
symmetry ``S``, so ICP and the verification score land on any of them. The BOP metrics (MSSD, MSPD)
count only the object's declared symmetries, i.e. those of shape *and* colour.

:func:`shape_symmetries` finds, from the mesh alone, the rigid model-frame transforms that map the
surface onto itself: rotations about the three principal axes through the surface centroid (a grid of
``step_deg``; a solid of revolution passes every step) and those composed with 180-degree flips about
the other axes. A candidate passes when the sampled surface moved by it lies on the unmoved surface
(nearest-neighbour distances within the sampling noise + ``tol_frac`` x diameter). Cached per object.

:class:`ColourSymmetrySearch` renders ``T @ S`` for every found ``S`` in one crop and scores each by the
correlation of its rendered Lab colours with the image's over the visible surface
(:meth:`osop_ros.core.verify.Verifier.colour_scores`); it switches to the best one only when its score
beats the input pose's by ``min_gain``. An untextured model (uniform colour) has no evidence and keeps
its pose. Measured in docs/results.md (session 15).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from osop_ros.core.geometry import rotation_about_axis, rotation_angle_deg, transform_points

if TYPE_CHECKING:
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.stages import OnboardedObject
    from osop_ros.core.types import Observation, SegmentationResult
    from osop_ros.core.verify import Verifier


@dataclass
class SymmetrySearchConfig:
    """Parameters of :func:`shape_symmetries` and :class:`ColourSymmetrySearch`."""

    step_deg: float = 15.0  # rotation grid about each principal axis
    tol_frac: float = 0.01  # allowed extra surface distance (x diameter) of a shape symmetry
    quantile: float = 0.98  # of the moved samples' distances to the surface (small parts count)
    max_candidates: int = 48  # a sphere-like shape passes everything: keep this many, evenly spread
    min_gain: float = 0.05  # colour-correlation gain over the input pose needed to switch
    approx_tol_frac: float = 0.0  # also near-symmetries within this (x diameter; 0 = off), refined by ICP
    partial_quantile: float = 0.0  # also twins whose moved surface fits at this quantile only (0 = off)
    approx_min_gain: float = 0.1  # gain needed to switch to a near-symmetric twin
    approx_max_raw_drop: float = 0.02  # the refined twin's raw verification score may be this much lower
    n_target: int = 4000  # surface samples of the reference cloud
    n_query: int = 400  # surface samples moved by each candidate


def surface_axes(model: ObjectModel) -> tuple[np.ndarray, np.ndarray]:
    """Exact area-weighted surface centroid (3,) and principal axes (3, 3) (rows) of the mesh.

    Uses the closed-form second moment of each triangle, ``E[x x^T] = (a a^T + b b^T + c c^T + s s^T) / 12``
    with ``s = a + b + c``: sampled points tilt a solid of revolution's axis by degrees."""
    v = model.vertices.astype(np.float64)[model.faces]  # (M, 3, 3)
    area = 0.5 * np.linalg.norm(np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]), axis=1)
    w = area / max(float(area.sum()), 1e-30)
    s = v.sum(axis=1)  # (M, 3)
    centre = (w[:, None] * s).sum(axis=0) / 3.0
    second = np.einsum("m,mki,mkj->ij", w, v, v) + np.einsum("m,mi,mj->ij", w, s, s)
    cov = second / 12.0 - np.outer(centre, centre)
    _, vecs = np.linalg.eigh(cov)
    return centre, vecs.T[::-1].copy()


def shape_symmetries(
    obj: OnboardedObject,
    config: SymmetrySearchConfig | None = None,
    tol_frac: float | None = None,
    quantile: float | None = None,
) -> list[np.ndarray]:
    """(4, 4) model-frame transforms other than the identity that map ``obj``'s surface onto itself
    within ``tol_frac`` x diameter at the ``quantile`` of the moved samples (defaults from ``config``; see
    module doc), ordered by rotation angle; cached in ``obj.extra``."""
    from scipy.spatial import cKDTree

    c = config or SymmetrySearchConfig()
    tol_frac = c.tol_frac if tol_frac is None else float(tol_frac)
    quantile = c.quantile if quantile is None else float(quantile)
    key = ("shape_symmetries", c.step_deg, tol_frac, quantile, c.max_candidates, c.n_target, c.n_query)
    cache = obj.extra.setdefault("shape_symmetries", {})
    if key in cache:
        return cache[key]
    model = obj.model
    pts, _ = model.sample_surface(c.n_target, seed=0)
    q, _ = model.sample_surface(c.n_query, seed=1)
    centre, vt = surface_axes(model)
    tree = cKDTree(pts)
    d0 = tree.query(q)[0]  # sampling density: the distances of an exact symmetry
    tol = np.quantile(d0, quantile) + tol_frac * float(model.diameter)
    flips = [rotation_about_axis(vt[j], math.pi) for j in range(3)]
    n_steps = max(2, round(360.0 / c.step_deg))
    rots: list[np.ndarray] = []
    for i in range(3):
        for k in range(n_steps):
            R = rotation_about_axis(vt[i], 2.0 * math.pi * k / n_steps)
            rots.append(R)
            rots.extend(R @ flips[j] for j in range(3) if j != i)
    found: list[tuple[float, np.ndarray]] = []
    for R in rots:
        angle = rotation_angle_deg(R, np.eye(3))
        if angle < 1.0 or any(np.abs(R - S[:3, :3]).max() < 1e-3 for _, S in found):
            continue
        S = np.eye(4)
        S[:3, :3] = R
        S[:3, 3] = centre - R @ centre
        if float(np.quantile(tree.query(transform_points(S, q))[0], quantile)) <= tol:
            found.append((angle, S))
    found.sort(key=lambda x: x[0])
    out = [S for _, S in found]
    if len(out) > c.max_candidates:
        out = [out[i] for i in np.linspace(0, len(out) - 1, c.max_candidates).round().astype(int)]
    cache[key] = out
    return out


def approximate_symmetries(obj: OnboardedObject, config: SymmetrySearchConfig | None = None) -> list[np.ndarray]:
    """Transforms within ``config.approx_tol_frac`` but not ``tol_frac`` of a symmetry (a slightly tapered
    can upside down), then those that fit only at ``partial_quantile``: such twins need ICP before they fit.
    Empty when both are off; cached in ``obj.extra`` (the search asks for them on every frame)."""
    c = config or SymmetrySearchConfig()
    cache = obj.extra.setdefault("shape_symmetries", {})
    key = ("approximate", *dataclasses.astuple(c))
    if key in cache:
        return cache[key]
    exact = shape_symmetries(obj, c)
    out: list[np.ndarray] = []
    if c.approx_tol_frac > c.tol_frac:
        out = [S for S in shape_symmetries(obj, c, c.approx_tol_frac)
               if not any(np.abs(S - E).max() < 1e-6 for E in exact)]
    if 0.0 < c.partial_quantile < c.quantile:  # most of the surface maps onto itself (a mug's body, not its handle)
        seen = exact + out
        out += [S for S in shape_symmetries(obj, c, quantile=c.partial_quantile)
                if not any(np.abs(S - E).max() < 1e-6 for E in seen)]
    cache[key] = out
    return out


@dataclass
class SymmetryChoice:
    """Outcome of :class:`ColourSymmetrySearch` for one pose."""

    T_cam_obj: np.ndarray  # (4, 4) chosen pose (the input when not switched)
    switched: bool
    n_candidates: int  # shape symmetries tried (0: none found or no colour evidence)
    gain: float  # best candidate's colour score minus the input pose's (NaN without evidence)
    approximate: bool = False  # the chosen twin is a near-symmetry: refine it (ICP) and re-check it


class ColourSymmetrySearch:
    """Chooses among ``T @ S`` (``S`` in :func:`shape_symmetries`) by colour agreement (see module doc)."""

    def __init__(self, verifier: Verifier, config: SymmetrySearchConfig | None = None) -> None:
        self.verifier = verifier
        self.config = config or SymmetrySearchConfig()

    def prepare(self, obj: OnboardedObject) -> None:
        """Find (and cache) ``obj``'s symmetries now (onboarding) rather than on its first frame."""
        shape_symmetries(obj, self.config)
        approximate_symmetries(obj, self.config)

    def __call__(
        self,
        obs: Observation,
        seg: SegmentationResult | None,
        obj: OnboardedObject,
        T_cam_obj: np.ndarray,
        use_depth: bool = True,
    ) -> SymmetryChoice:
        """``T_cam_obj`` (4, 4) -> the symmetric twin whose rendered colours match ``obs`` best."""
        T = np.asarray(T_cam_obj, dtype=np.float64)
        exact = shape_symmetries(obj, self.config)
        syms = exact + approximate_symmetries(obj, self.config)
        if not syms:
            return SymmetryChoice(T, False, 0, float("nan"))
        Ts = [T] + [T @ S for S in syms]
        scores = self.verifier.colour_scores(obs, seg, obj, Ts, use_depth)
        if not np.isfinite(scores[0]) or not np.isfinite(scores[1:]).any():
            return SymmetryChoice(T, False, 0, float("nan"))
        b = int(np.nanargmax(scores[1:])) + 1
        gain = float(scores[b] - scores[0])
        approx = b > len(exact)
        if gain > (self.config.approx_min_gain if approx else self.config.min_gain):
            return SymmetryChoice(Ts[b], True, len(syms), gain, approx)
        return SymmetryChoice(T, False, len(syms), gain)
