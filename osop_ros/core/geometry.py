"""Rigid transforms, pinhole projection, crops with consistent intrinsics, rotation errors.

All functions are pure numpy; metres and radians unless a name says ``_deg`` or ``_mm``.
Pixel convention: the centre of pixel column ``u`` is at ``u`` (OpenCV/BOP).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from osop_ros.core.types import InvalidInputError, Symmetries


def make_T(R: np.ndarray, t: np.ndarray) -> np.ndarray:
    """(3, 3) R and (3,) t -> (4, 4) float64 transform."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def invert_T(T: np.ndarray) -> np.ndarray:
    """Inverse of a rigid (4, 4) transform."""
    R = T[:3, :3]
    Ti = np.eye(4)
    Ti[:3, :3] = R.T
    Ti[:3, 3] = -R.T @ T[:3, 3]
    return Ti


def transform_points(T: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Apply (4, 4) ``T`` to (N, 3) points -> (N, 3)."""
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ T[:3, :3].T + T[:3, 3]


def project(K: np.ndarray, pts_cam: np.ndarray) -> np.ndarray:
    """Project (N, 3) camera-frame points -> (N, 2) pixels. Points need z > 0."""
    pts_cam = np.asarray(pts_cam, dtype=np.float64)
    z = pts_cam[:, 2:3]
    uv = (pts_cam[:, :2] / z) * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])
    return uv


def project_points(K: np.ndarray, T_cam_obj: np.ndarray, pts_obj: np.ndarray) -> np.ndarray:
    """Project (N, 3) model points with pose ``T_cam_obj`` -> (N, 2) pixels."""
    return project(K, transform_points(T_cam_obj, pts_obj))


def backproject(uv: np.ndarray, z: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixels (N, 2) with depths (N,) metres -> (N, 3) camera-frame points."""
    uv = np.asarray(uv, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64).reshape(-1)
    x = (uv[:, 0] - K[0, 2]) / K[0, 0] * z
    y = (uv[:, 1] - K[1, 2]) / K[1, 1] * z
    return np.stack([x, y, z], axis=1)


def depth_to_points(depth: np.ndarray, K: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Back-project valid depth pixels (optionally within ``mask``).

    Returns ``pts_cam`` (N, 3) float64 metres and ``uv`` (N, 2) float64 pixels.
    """
    valid = np.isfinite(depth) & (depth > 0)
    if mask is not None:
        valid &= mask.astype(bool)
    v, u = np.nonzero(valid)
    uv = np.stack([u, v], axis=1).astype(np.float64)
    return backproject(uv, depth[v, u], K), uv


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Tight box (x0, y0, x1, y1) of a bool mask, x1/y1 exclusive; None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True)
class CropBox:
    """A square crop: centre (cx, cy) in pixels and side length in pixels (continuous)."""

    cx: float
    cy: float
    side: float

    @classmethod
    def from_box(cls, box: tuple[float, float, float, float], pad: float = 1.2, min_side: float = 8.0) -> CropBox:
        """Square crop around an (x0, y0, x1, y1) box (x1/y1 exclusive), side = pad * max(w, h)."""
        x0, y0, x1, y1 = (float(b) for b in box)
        cx = (x0 + x1 - 1.0) / 2.0
        cy = (y0 + y1 - 1.0) / 2.0
        side = max(min_side, pad * max(x1 - x0, y1 - y0))
        return cls(cx, cy, side)

    @classmethod
    def from_points(cls, uv: np.ndarray, pad: float = 1.2, min_side: float = 8.0) -> CropBox:
        """Square crop around projected points (N, 2) (same framing as a mask of those points)."""
        x0, y0 = np.floor(uv.min(axis=0) + 0.5)
        x1, y1 = np.floor(uv.max(axis=0) + 0.5) + 1.0
        return cls.from_box((x0, y0, x1, y1), pad=pad, min_side=min_side)

    def affine(self, out_size: int) -> np.ndarray:
        """(2, 3) affine from full-image pixels to crop pixels (pixel-centre convention)."""
        a = out_size / self.side
        return np.array(
            [[a, 0.0, (self.side / 2.0 - self.cx) * a - 0.5], [0.0, a, (self.side / 2.0 - self.cy) * a - 0.5]]
        )

    def crop_K(self, K: np.ndarray, out_size: int) -> np.ndarray:
        """(3, 3) intrinsics of the crop resized to ``out_size`` x ``out_size``."""
        A = self.affine(out_size)
        Kc = np.array(K, dtype=np.float64).copy()
        Kc[0, 0] = K[0, 0] * A[0, 0]
        Kc[1, 1] = K[1, 1] * A[1, 1]
        Kc[0, 2] = K[0, 2] * A[0, 0] + A[0, 2]
        Kc[1, 2] = K[1, 2] * A[1, 1] + A[1, 2]
        return Kc

    def crop_to_image(self, uv_crop: np.ndarray, out_size: int) -> np.ndarray:
        """Map (N, 2) crop pixels back to full-image pixels."""
        A = self.affine(out_size)
        return (np.asarray(uv_crop, dtype=np.float64) - A[:, 2]) / A[0, 0]

    def apply(self, img: np.ndarray, out_size: int, interp: int = cv2.INTER_LINEAR) -> np.ndarray:
        """Crop+resize ``img`` (H, W[, C]) to (out_size, out_size[, C]); outside pixels are 0."""
        flags = interp
        return cv2.warpAffine(
            img, self.affine(out_size), (out_size, out_size), flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )


def rotation_about_axis(axis: np.ndarray, angle: float) -> np.ndarray:
    """(3, 3) rotation by ``angle`` rad about unit ``axis`` (Rodrigues)."""
    axis = np.asarray(axis, dtype=np.float64)
    axis = axis / max(np.linalg.norm(axis), 1e-12)
    R, _ = cv2.Rodrigues(axis * angle)
    return R


def rotation_angle_deg(R_a: np.ndarray, R_b: np.ndarray) -> float:
    """Geodesic angle between two rotations in degrees."""
    c = (np.trace(R_a.T @ R_b) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c, -1.0, 1.0))))


def symmetry_transforms(sym: Symmetries | None, max_step_rad: float = 0.01) -> list[np.ndarray]:
    """All (4, 4) model-frame symmetry transforms including identity.

    Continuous symmetries are discretised with ``ceil(pi / max_step_rad)`` steps per full turn
    and combined with the discrete ones, as the BOP toolkit does (identity kept).
    """
    disc = [np.eye(4)]
    if sym is not None:
        disc += [np.asarray(T, dtype=np.float64) for T in sym.discrete]
    if sym is None or not sym.continuous:
        return disc
    cont = []
    n = int(np.ceil(np.pi / max_step_rad))
    for axis, offset in sym.continuous:
        for i in range(n):
            R = rotation_about_axis(axis, i * 2.0 * np.pi / n)
            cont.append(make_T(R, -R @ offset + offset))
    return [Tc @ Td for Td in disc for Tc in cont]


def rotation_error_sym_deg(R_est: np.ndarray, R_gt: np.ndarray, sym_Ts: list[np.ndarray] | None = None) -> float:
    """Smallest rotation angle (deg) between ``R_est`` and ``R_gt`` composed with any symmetry."""
    if not sym_Ts:
        return rotation_angle_deg(R_est, R_gt)
    Rs = np.stack([R_gt @ T[:3, :3] for T in sym_Ts])  # (S, 3, 3)
    c = (np.einsum("ij,sij->s", R_est, Rs) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(c.max(), -1.0, 1.0))))


def rotation_to_optical_axis(direction_cam: np.ndarray) -> np.ndarray:
    """(3, 3) smallest rotation taking the unit vector along ``direction_cam`` to the camera +z axis."""
    a = np.asarray(direction_cam, dtype=np.float64)
    a = a / max(np.linalg.norm(a), 1e-12)
    b = np.array([0.0, 0.0, 1.0])
    v = np.cross(a, b)
    s, c = np.linalg.norm(v), float(a @ b)
    if s < 1e-12:
        return np.eye(3) if c > 0 else np.diag([1.0, -1.0, -1.0])
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    return np.eye(3) + vx + vx @ vx * ((1.0 - c) / s**2)


def centred_view_rotation(T_cam_obj: np.ndarray, center_obj: np.ndarray) -> np.ndarray:
    """(3, 3) rotation of a camera that sees the object like ``T_cam_obj`` but with its centre on the optical axis.

    Removes the perspective off-axis rotation, so the viewpoint of an off-centre instance compares with
    object-centred templates (which look at the object centre).
    """
    c = transform_points(T_cam_obj, np.asarray(center_obj, dtype=np.float64)[None])[0]
    return rotation_to_optical_axis(c) @ T_cam_obj[:3, :3]


def look_at(
    cam_pos_obj: np.ndarray, target_obj: np.ndarray | None = None, up_obj: np.ndarray | None = None
) -> np.ndarray:
    """``T_cam_obj`` of a camera at ``cam_pos_obj`` (model frame, metres) looking at ``target_obj``.

    Camera axes follow OpenCV: +z forward, +y down in the image. ``up_obj`` (default model +z)
    points up in the image; a fallback is used when looking along it.
    """
    target = np.zeros(3) if target_obj is None else np.asarray(target_obj, dtype=np.float64)
    up = np.array([0.0, 0.0, 1.0]) if up_obj is None else np.asarray(up_obj, dtype=np.float64)
    z = target - np.asarray(cam_pos_obj, dtype=np.float64)
    dist = np.linalg.norm(z)
    if dist < 1e-12:
        raise InvalidInputError("camera position coincides with the target")
    z /= dist
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-6:
        x = np.cross(z, np.array([0.0, 1.0, 0.0]))
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R_obj_cam = np.stack([x, y, z], axis=1)
    return invert_T(make_T(R_obj_cam, cam_pos_obj))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Uniformly distributed (3, 3) rotation."""
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    w, x, y, z = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )
