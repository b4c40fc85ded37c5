"""The viewpoint grid of the template bank: elevations x azimuths x in-plane rotations.

A view (ie, ia, ii) puts the camera on the unit sphere around the object centre at
``d = (cos el cos az, cos el sin az, sin el)`` (model frame), looking at the centre with model +z up
in the image (:func:`osop_ros.core.geometry.look_at`), then rotates the camera about its optical
axis by the in-plane angle: ``R_cam_obj = Rz(inplane) @ R_lookat``. With image y pointing down this
turns the image content clockwise by ``inplane`` on screen.

At the poles (el = +-90) model +z is the viewing direction, so "up" is taken as the continuous
limit of the look-at frame for that azimuth (the horizontal direction away from the camera); the
views of different azimuths then differ by an in-plane rotation instead of being duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from osop_ros.core.geometry import look_at
from osop_ros.core.types import InvalidInputError


@dataclass(frozen=True)
class ViewGridConfig:
    """Grid sizes and angular ranges (degrees).

    Elevations are spaced evenly over ``elevation_range_deg`` including both ends; azimuths over
    [0, 360) (end excluded); in-plane angles over ``inplane_range_deg``, end excluded when the range
    spans a full turn (default 0, 72, 144, 216, 288), included otherwise.
    """

    n_elevations: int = 16
    n_azimuths: int = 36
    n_inplane: int = 5
    elevation_range_deg: tuple[float, float] = (-15.0, 90.0)
    inplane_range_deg: tuple[float, float] = (0.0, 360.0)

    def __post_init__(self) -> None:
        for name in ("n_elevations", "n_azimuths", "n_inplane"):
            if int(getattr(self, name)) < 1:
                raise InvalidInputError(f"ViewGridConfig.{name} must be >= 1, got {getattr(self, name)}")
        lo, hi = self.elevation_range_deg
        if not (-90.0 <= lo <= hi <= 90.0):
            raise InvalidInputError(f"elevation range must satisfy -90 <= lo <= hi <= 90, got {(lo, hi)}")

    @property
    def n_views(self) -> int:
        return self.n_elevations * self.n_azimuths * self.n_inplane

    def to_dict(self) -> dict:
        """JSON-friendly dict (cache keys, metadata)."""
        return {
            "n_elevations": int(self.n_elevations),
            "n_azimuths": int(self.n_azimuths),
            "n_inplane": int(self.n_inplane),
            "elevation_range_deg": [float(v) for v in self.elevation_range_deg],
            "inplane_range_deg": [float(v) for v in self.inplane_range_deg],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ViewGridConfig:
        return cls(
            int(d["n_elevations"]),
            int(d["n_azimuths"]),
            int(d["n_inplane"]),
            tuple(float(v) for v in d["elevation_range_deg"]),  # type: ignore[arg-type]
            tuple(float(v) for v in d["inplane_range_deg"]),  # type: ignore[arg-type]
        )


def _inplane_angles(n: int, lo: float, hi: float) -> np.ndarray:
    if abs((hi - lo) - 360.0) < 1e-9:
        return lo + (hi - lo) * np.arange(n) / n
    return np.linspace(lo, hi, n) if n > 1 else np.array([lo], dtype=np.float64)


def _rz(angle_deg: float) -> np.ndarray:
    c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


class ViewGrid:
    """All template viewpoints, flattened in C order of (elevation, azimuth, in-plane).

    elevation_deg, azimuth_deg, inplane_deg: (T,) float64.
    index: (T, 3) int64 (ie, ia, ii).
    R_cam_obj: (T, 3, 3) float64 rotations model -> camera.
    directions: (T, 3) float64 unit vectors from the object centre to the camera (model frame).
    """

    def __init__(self, config: ViewGridConfig | None = None):
        self.config = config or ViewGridConfig()
        c = self.config
        self.elevations = np.linspace(*c.elevation_range_deg, c.n_elevations) if c.n_elevations > 1 else np.array(
            [float(c.elevation_range_deg[0])]
        )
        self.azimuths = 360.0 * np.arange(c.n_azimuths) / c.n_azimuths
        self.inplanes = _inplane_angles(c.n_inplane, *c.inplane_range_deg)
        ie, ia, ii = np.meshgrid(
            np.arange(c.n_elevations), np.arange(c.n_azimuths), np.arange(c.n_inplane), indexing="ij"
        )
        self.index = np.stack([ie.ravel(), ia.ravel(), ii.ravel()], axis=1).astype(np.int64)
        self.elevation_deg = self.elevations[self.index[:, 0]]
        self.azimuth_deg = self.azimuths[self.index[:, 1]]
        self.inplane_deg = self.inplanes[self.index[:, 2]]
        el, az = np.radians(self.elevation_deg), np.radians(self.azimuth_deg)
        self.directions = np.stack([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)], axis=1)
        R_base = {}
        for e in range(c.n_elevations):
            for a in range(c.n_azimuths):
                el_r, az_r = np.radians(self.elevations[e]), np.radians(self.azimuths[a])
                d = np.array([np.cos(el_r) * np.cos(az_r), np.cos(el_r) * np.sin(az_r), np.sin(el_r)])
                up = np.array([0.0, 0.0, 1.0])
                if abs(np.cos(el_r)) < 1e-9:  # pole: limit of the look-at frame for this azimuth
                    up = -np.sign(np.sin(el_r)) * np.array([np.cos(az_r), np.sin(az_r), 0.0])
                R_base[e, a] = look_at(d, np.zeros(3), up)[:3, :3]
        Rz = [_rz(float(a)) for a in self.inplanes]
        self.R_cam_obj = np.stack([Rz[i] @ R_base[e, a] for e, a, i in self.index])

    def __len__(self) -> int:
        return len(self.index)

    def flat_index(self, ie: int, ia: int, ii: int) -> int:
        """Flat view index of grid cell (ie, ia, ii)."""
        c = self.config
        return (int(ie) * c.n_azimuths + int(ia) % c.n_azimuths) * c.n_inplane + int(ii) % c.n_inplane

    def T_cam_obj(self, i: int, distance: float, center_obj: np.ndarray | None = None) -> np.ndarray:
        """(4, 4) pose of view ``i`` for a camera ``distance`` metres from ``center_obj`` (model frame)."""
        center = np.zeros(3) if center_obj is None else np.asarray(center_obj, dtype=np.float64)
        R = self.R_cam_obj[i]
        T = np.eye(4)
        T[:3, :3] = R
        T[:3, 3] = -R @ (center + distance * self.directions[i])
        return T

    def coarse_indices(self, stride_el: int = 2, stride_az: int = 2) -> np.ndarray:
        """(T',) int64 views of a sub-grid: every ``stride_el``-th elevation and ``stride_az``-th azimuth."""
        keep = (self.index[:, 0] % max(1, stride_el) == 0) & (self.index[:, 1] % max(1, stride_az) == 0)
        return np.nonzero(keep)[0]

    def neighbour_indices(self, i: int, radius_el: int = 1, radius_az: int = 1, radius_inplane: int = 0) -> np.ndarray:
        """(K,) int64 views within the given grid radii of view ``i`` (azimuth and full-turn in-plane wrap).

        Used to refine a coarse match; includes ``i`` itself.
        """
        c = self.config
        ie, ia, ii = self.index[i]
        out = []
        wrap_ip = abs((c.inplane_range_deg[1] - c.inplane_range_deg[0]) - 360.0) < 1e-9
        for de in range(-radius_el, radius_el + 1):
            e = ie + de
            if not 0 <= e < c.n_elevations:
                continue
            for da in sorted({d % c.n_azimuths for d in range(-radius_az, radius_az + 1)}):
                a = (ia + da) % c.n_azimuths
                for di in range(-radius_inplane, radius_inplane + 1):
                    p = ii + di
                    if wrap_ip:
                        p %= c.n_inplane
                    elif not 0 <= p < c.n_inplane:
                        continue
                    out.append(self.flat_index(e, a, p))
        return np.unique(np.asarray(out, dtype=np.int64))

    def rotation_errors_deg(self, R_cam_obj: np.ndarray, sym_Ts: list[np.ndarray] | None = None) -> np.ndarray:
        """(T,) float64 symmetry-aware geodesic angle (deg) between ``R_cam_obj`` and every view.

        Same semantics as :func:`osop_ros.core.geometry.rotation_error_sym_deg` with the view as
        ground truth: ``min_s angle(R_cam_obj, R_view @ R_s)``.
        """
        R = np.asarray(R_cam_obj, dtype=np.float64)[:3, :3]
        Rs = [np.eye(3)] if not sym_Ts else [np.asarray(T, dtype=np.float64)[:3, :3] for T in sym_Ts]
        Q = np.einsum("ij,skj->sik", R, np.stack(Rs))  # (S, 3, 3) = R @ R_s^T
        # trace(R^T R_view R_s) = sum((R R_s^T) * R_view)
        cos = np.empty(len(self))
        chunk = max(1, 2_000_000 // (9 * len(Rs)))
        for lo in range(0, len(self), chunk):
            tr = np.einsum("sij,tij->ts", Q, self.R_cam_obj[lo : lo + chunk])
            cos[lo : lo + chunk] = tr.max(axis=1)
        return np.degrees(np.arccos(np.clip((cos - 1.0) / 2.0, -1.0, 1.0)))

    def nearest(self, R_cam_obj: np.ndarray, sym_Ts: list[np.ndarray] | None = None) -> int:
        """Index of the view with the smallest symmetry-aware rotation error to ``R_cam_obj`` ((3,3) or (4,4))."""
        return int(np.argmin(self.rotation_errors_deg(R_cam_obj, sym_Ts)))
