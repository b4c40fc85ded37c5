"""Draw estimated poses on an image: model contour, object axes and a label with the score."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from osop_ros.core.geometry import project_points, transform_points

_PALETTE = [(0, 255, 0), (255, 160, 0), (0, 200, 255), (255, 0, 255), (255, 255, 0), (120, 120, 255)]


def model_silhouette(K: np.ndarray, T_cam_obj: np.ndarray, pts_obj: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool approximate silhouette from projected surface samples (closed morphologically)."""
    H, W = shape
    m = np.zeros((H, W), np.uint8)
    z = transform_points(T_cam_obj, pts_obj)[:, 2]
    uv = np.round(project_points(K, T_cam_obj, pts_obj[z > 1e-6])).astype(int)
    ok = (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
    m[uv[ok, 1], uv[ok, 0]] = 1
    if m.any():
        m = cv2.morphologyEx(cv2.dilate(m, np.ones((3, 3), np.uint8)), cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    return m.astype(bool)


def draw_pose(
    img: np.ndarray,
    K: np.ndarray,
    T_cam_obj: np.ndarray,
    pts_obj: np.ndarray,
    label: str = "",
    color: tuple[int, int, int] = (0, 255, 0),
    axis_length: float = 0.05,
) -> np.ndarray:
    """Draw on an RGB uint8 image in place (and return it): contour, RGB = xyz axes, label."""
    H, W = img.shape[:2]
    sil = model_silhouette(K, T_cam_obj, pts_obj, (H, W)).astype(np.uint8)
    contours, _ = cv2.findContours(sil, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(img, contours, -1, color, 2, cv2.LINE_AA)
    if T_cam_obj[2, 3] > 1e-6:
        axes = np.array([[0, 0, 0], [axis_length, 0, 0], [0, axis_length, 0], [0, 0, axis_length]], float)
        uv = project_points(K, T_cam_obj, axes)
        if np.all(np.isfinite(uv)) and np.abs(uv).max() < 1e5:
            o = tuple(int(v) for v in np.round(uv[0]))
            for i, c in enumerate(((255, 0, 0), (0, 255, 0), (0, 0, 255))):
                cv2.line(img, o, tuple(int(v) for v in np.round(uv[i + 1])), c, 2, cv2.LINE_AA)
    if label:
        ys, xs = np.nonzero(sil)
        x, y = (int(xs.min()), max(12, int(ys.min()) - 6)) if len(xs) else (5, 15)
        cv2.putText(img, label, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 3, cv2.LINE_AA)
        cv2.putText(img, label, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.5, color, 1, cv2.LINE_AA)
    return img


def draw_estimates(
    rgb: np.ndarray, K: np.ndarray, estimates: Sequence, samples: dict[str, np.ndarray], diameters: dict[str, float]
) -> np.ndarray:
    """Copy of ``rgb`` with every :class:`PoseEstimate` drawn (``samples[name]`` (N, 3) model points)."""
    out = np.ascontiguousarray(rgb.copy())
    names = sorted(samples)
    for est in estimates:
        color = _PALETTE[names.index(est.object_name) % len(_PALETTE)] if est.object_name in names else _PALETTE[0]
        draw_pose(
            out,
            K,
            est.T_cam_obj,
            samples[est.object_name],
            f"{est.object_name} {est.score:.2f}",
            color,
            0.5 * diameters.get(est.object_name, 0.1),
        )
    return out
