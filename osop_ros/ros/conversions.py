"""ROS message <-> numpy conversions (no cv_bridge) and lens undistortion.

Everything here is numpy/OpenCV on message fields, so it is testable without DDS. cv_bridge is not
used: the PyPI ``cv-bridge`` wheel decodes ``16UC1`` depth to 8 bits, and the decoding below is small.

Supported ``sensor_msgs/Image`` encodings
-----------------------------------------
* colour: ``rgb8``, ``bgr8``, ``rgba8``, ``bgra8`` -> (H, W, 3) uint8 RGB.
  ``mono8`` is accepted and replicated to grey RGB (a warning is logged once per process):
  OSOP was trained on colour but still works on grey images, and rejecting mono cameras would be
  less useful than a degraded result.
* depth: ``16UC1``/``mono16`` (millimetres, 0 = invalid) and ``32FC1`` (metres; NaN, inf and values <= 0
  become 0 = invalid) -> (H, W) float32 metres.

Rows may be padded (``step`` > ``width * bytes_per_pixel``); ``is_bigendian`` is honoured for
multi-byte encodings. Anything else (unknown encoding, inconsistent ``step``/``data`` size,
truncated buffers, empty images) raises :class:`ConversionError`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable

import cv2
import numpy as np
from builtin_interfaces.msg import Time as TimeMsg
from geometry_msgs.msg import Point, Pose, Quaternion, Transform, Vector3
from sensor_msgs.msg import CameraInfo, Image

from osop_ros.core.types import CameraIntrinsics, InvalidInputError

log = logging.getLogger(__name__)

# encoding -> (numpy dtype without byte order, channels)
_ENCODINGS: dict[str, tuple[str, int]] = {
    "rgb8": ("u1", 3),
    "bgr8": ("u1", 3),
    "rgba8": ("u1", 4),
    "bgra8": ("u1", 4),
    "mono8": ("u1", 1),
    "16UC1": ("u2", 1),
    "mono16": ("u2", 1),
    "32FC1": ("f4", 1),
}
COLOUR_ENCODINGS = ("rgb8", "bgr8", "rgba8", "bgra8", "mono8")
DEPTH_ENCODINGS = ("16UC1", "mono16", "32FC1")

_warned: set[str] = set()


class ConversionError(InvalidInputError):
    """A ROS message cannot be converted (unknown encoding, inconsistent sizes, bad intrinsics)."""


def reset_warnings() -> None:
    """Forget which one-time warnings were already emitted (tests)."""
    _warned.clear()


def _warn_once(key: str, message: str, warn: Callable[[str], None] | None) -> None:
    if key in _warned:
        return
    _warned.add(key)
    (warn or log.warning)(message)


def image_to_array(msg: Image) -> np.ndarray:
    """Raw pixel array of ``msg``: (H, W) or (H, W, C) in the encoding's dtype, native byte order.

    Handles padded rows and big-endian data; the result is a fresh, contiguous array.
    """
    enc = msg.encoding
    if enc not in _ENCODINGS:
        raise ConversionError(
            f"unsupported image encoding {enc!r} (supported: {', '.join(sorted(_ENCODINGS))})"
        )
    base, channels = _ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise ConversionError(f"empty {enc} image ({w}x{h})")
    itemsize = int(base[1:])
    row_bytes = w * channels * itemsize
    if step < row_bytes:
        raise ConversionError(f"{enc} image {w}x{h}: step {step} < width*bytes_per_pixel {row_bytes}")
    if itemsize > 1 and step % itemsize:
        raise ConversionError(f"{enc} image {w}x{h}: step {step} is not a multiple of {itemsize} bytes")
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    n = buf.size
    if n < step * (h - 1) + row_bytes:
        raise ConversionError(f"truncated {enc} image {w}x{h}: {n} bytes, expected step*height = {step * h}")
    if n > step * h:
        raise ConversionError(f"{enc} image {w}x{h}: {n} bytes of data but step*height = {step * h}")
    if n < step * h:  # last row without its padding: pad so that a strided view works
        buf = np.concatenate([buf, np.zeros(step * h - n, np.uint8)])
    rows = buf.reshape(h, step)[:, :row_bytes]
    order = ">" if msg.is_bigendian else "<"
    dtype = np.dtype(order + base)
    arr = np.ascontiguousarray(rows).view(dtype).reshape((h, w, channels) if channels > 1 else (h, w))
    if not dtype.isnative:  # byte order differs from the host: swap once
        arr = arr.astype(dtype.newbyteorder("="))
    return np.ascontiguousarray(arr)


def image_to_rgb(msg: Image, warn: Callable[[str], None] | None = None) -> np.ndarray:
    """Colour image -> (H, W, 3) uint8 RGB. ``warn`` receives the one-time ``mono8`` warning."""
    if msg.encoding not in COLOUR_ENCODINGS:
        raise ConversionError(
            f"colour image has encoding {msg.encoding!r}; expected one of {', '.join(COLOUR_ENCODINGS)}"
        )
    arr = image_to_array(msg)
    enc = msg.encoding
    if enc == "rgb8":
        return arr
    if enc == "bgr8":
        return np.ascontiguousarray(arr[:, :, ::-1])
    if enc == "rgba8":
        return np.ascontiguousarray(arr[:, :, :3])
    if enc == "bgra8":
        return np.ascontiguousarray(arr[:, :, 2::-1])
    _warn_once("mono8", "mono8 colour image: replicating grey to RGB (accuracy may drop)", warn)
    return np.repeat(arr[:, :, None], 3, axis=2)


def image_to_depth(msg: Image) -> np.ndarray:
    """Depth image -> (H, W) float32 metres, 0 = invalid (``16UC1``/``mono16`` are millimetres)."""
    if msg.encoding not in DEPTH_ENCODINGS:
        raise ConversionError(
            f"depth image has encoding {msg.encoding!r}; expected one of {', '.join(DEPTH_ENCODINGS)}"
        )
    arr = image_to_array(msg)
    if msg.encoding in ("16UC1", "mono16"):
        return arr.astype(np.float32) * np.float32(0.001)
    depth = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(depth) | (depth <= 0)
    if bad.any():
        depth = depth.copy()
        depth[bad] = 0.0
    return depth


def rgb_to_image(rgb: np.ndarray, stamp: TimeMsg | None = None, frame_id: str = "") -> Image:
    """(H, W, 3) uint8 RGB -> ``rgb8`` Image (unpadded, little-endian flag)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ConversionError(f"expected (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}")
    msg = Image()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = int(rgb.shape[1] * 3)
    msg.data = np.ascontiguousarray(rgb).tobytes()  # bytes assignment is ~50x faster than an ndarray
    return msg


def array_to_image(arr: np.ndarray, encoding: str, stamp: TimeMsg | None = None, frame_id: str = "",
                   *, bigendian: bool = False, pad: int = 0) -> Image:
    """numpy -> Image of any supported ``encoding`` (fixtures, tests, bag tools).

    ``pad`` extra bytes are appended to every row; ``bigendian`` stores multi-byte values big-endian.
    """
    if encoding not in _ENCODINGS:
        raise ConversionError(f"unsupported image encoding {encoding!r}")
    base, channels = _ENCODINGS[encoding]
    arr = np.asarray(arr)
    expect_ndim = 3 if channels > 1 else 2
    if arr.ndim != expect_ndim or (channels > 1 and arr.shape[2] != channels):
        want = f"(H, W, {channels})" if channels > 1 else "(H, W)"
        raise ConversionError(f"{encoding} needs shape {want}, got {arr.shape}")
    dtype = np.dtype((">" if bigendian else "<") + base)
    h, w = arr.shape[:2]
    raw = np.ascontiguousarray(arr.astype(dtype)).view(np.uint8).reshape(h, -1)
    if pad:
        raw = np.concatenate([raw, np.zeros((h, pad), np.uint8)], axis=1)
    msg = Image()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(h), int(w)
    msg.encoding = encoding
    msg.is_bigendian = int(bigendian)
    msg.step = int(raw.shape[1])
    msg.data = raw.tobytes()
    return msg


def camera_info_to_intrinsics(msg: CameraInfo, width: int | None = None, height: int | None = None) -> CameraIntrinsics:
    """``CameraInfo.k`` (row-major 3x3) + width/height -> :class:`CameraIntrinsics`.

    ``width``/``height`` (the image size) are used only when the message leaves them 0. Distortion
    (``d``) is not looked at here: the node undoes it with :class:`Undistorter` (new camera matrix = K).
    """
    K = np.asarray(msg.k, dtype=np.float64)
    if K.size != 9:
        raise ConversionError(f"camera_info.k has {K.size} values, expected 9")
    K = K.reshape(3, 3)
    if not np.isfinite(K).all():
        raise ConversionError(f"camera_info.k contains NaN/inf: {K.ravel().tolist()}")
    if not np.any(K):
        raise ConversionError("camera_info.k is all zeros (uncalibrated camera)")
    if abs(K[2, 2] - 1.0) > 1e-6 or abs(K[2, 0]) > 1e-9 or abs(K[2, 1]) > 1e-9:
        raise ConversionError(f"camera_info.k last row must be [0, 0, 1], got {K[2].tolist()}")
    try:
        return CameraIntrinsics.from_K(K, int(msg.width or width or 0), int(msg.height or height or 0))
    except InvalidInputError as exc:
        raise ConversionError(f"invalid camera_info: {exc}") from exc


DISTORTION_MODELS = ("plumb_bob", "rational_polynomial", "equidistant")
_CV_COEFF_COUNTS = (4, 5, 8, 12, 14)


class UnknownDistortionError(ConversionError):
    """``CameraInfo`` has non-zero distortion coefficients of a model the adapter cannot undo."""

    def __init__(self, model: str, n_coeffs: int) -> None:
        super().__init__(f"camera_info distortion model {model!r} ({n_coeffs} non-zero coefficients) is not "
                         f"supported (supported: {', '.join(DISTORTION_MODELS)}); frames are skipped, no "
                         "pose is guessed from distorted images (publish rectified images with zero d)")
        self.model = model


def distortion_of(msg: CameraInfo) -> tuple[str, np.ndarray] | None:
    """``(model, D)`` when ``msg`` has non-zero distortion coefficients, None for a pinhole camera."""
    D = np.asarray(msg.d, dtype=np.float64).ravel()
    if D.size == 0:
        return None
    if not np.isfinite(D).all():
        raise ConversionError(f"camera_info.d contains NaN/inf: {D.tolist()}")
    if not np.any(D):
        return None
    return str(msg.distortion_model), D


class Undistorter:
    """Undo ``CameraInfo`` lens distortion before the (pinhole-only) core sees the images.

    The new camera matrix is **K itself** (``R`` and ``P`` are ignored): the undistorted images are an
    ideal pinhole view with the same intrinsics and the same optical frame as the given camera, so
    published poses stay in that camera's frame and ``K`` is passed to the core unchanged. The rgb
    image is remapped bilinearly; the registered depth image with nearest-neighbour sampling (no
    interpolation across depth edges; invalid 0 stays 0; pixels mapping outside the image are 0 =
    invalid). Remap tables are cached per (model, K, D, size), ``max_cached`` of them (LRU).
    """

    def __init__(self, max_cached: int = 4) -> None:
        self.max_cached = max_cached
        self._maps: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def maps(self, model: str, K: np.ndarray, D: np.ndarray, width: int, height: int,
             ) -> tuple[np.ndarray, np.ndarray]:
        """float32 (H, W) x/y remap tables: output pixel -> position in the distorted image."""
        K = np.asarray(K, dtype=np.float64).reshape(3, 3)
        D = np.asarray(D, dtype=np.float64).ravel()
        key = (model, K.tobytes(), D.tobytes(), int(width), int(height))
        with self._lock:
            hit = self._maps.get(key)
            if hit is not None:
                self._maps.move_to_end(key)
                return hit
        size = (int(width), int(height))
        if model in ("plumb_bob", "rational_polynomial"):
            if D.size not in _CV_COEFF_COUNTS:
                raise ConversionError(f"camera_info.d: {model} with {D.size} coefficients "
                                      f"(expected one of {_CV_COEFF_COUNTS})")
            m1, m2 = cv2.initUndistortRectifyMap(K, D, None, K, size, cv2.CV_32FC1)
        elif model == "equidistant":
            if D.size != 4:
                raise ConversionError(f"camera_info.d: equidistant needs 4 coefficients, got {D.size}")
            m1, m2 = cv2.fisheye.initUndistortRectifyMap(K, D, np.eye(3), K, size, cv2.CV_32FC1)
        else:
            raise UnknownDistortionError(model, int(np.count_nonzero(D)))
        with self._lock:
            self._maps[key] = (m1, m2)
            while len(self._maps) > self.max_cached:
                self._maps.popitem(last=False)
        return m1, m2

    def __call__(self, model: str, K: np.ndarray, D: np.ndarray, rgb: np.ndarray,
                 depth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Undistorted ``(rgb, depth)`` (same size; intrinsics unchanged: K)."""
        h, w = rgb.shape[:2]
        m1, m2 = self.maps(model, K, D, w, h)
        out_rgb = cv2.remap(rgb, m1, m2, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out_depth = None
        if depth is not None:
            out_depth = cv2.remap(np.ascontiguousarray(depth, dtype=np.float32), m1, m2, cv2.INTER_NEAREST,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        return out_rgb, out_depth


def intrinsics_to_camera_info(cam: CameraIntrinsics, stamp: TimeMsg | None = None, frame_id: str = "") -> CameraInfo:
    """:class:`CameraIntrinsics` -> ``CameraInfo`` with zero distortion (``plumb_bob``)."""
    msg = CameraInfo()
    if stamp is not None:
        msg.header.stamp = stamp
    msg.header.frame_id = frame_id
    msg.width, msg.height = int(cam.width), int(cam.height)
    msg.distortion_model = "plumb_bob"
    msg.d = [0.0] * 5
    msg.k = cam.K.ravel().tolist()
    msg.r = np.eye(3).ravel().tolist()
    P = np.zeros((3, 4))
    P[:, :3] = cam.K
    msg.p = P.ravel().tolist()
    return msg


def rotation_to_quaternion(R: np.ndarray) -> np.ndarray:
    """(3, 3) rotation -> unit quaternion (x, y, z, w) with w >= 0.

    The matrix is first projected onto SO(3) (SVD) so slightly non-orthonormal input from solvers
    is fine; the largest-component branch keeps the result accurate near 180 degrees.
    """
    R = np.asarray(R, dtype=np.float64)
    if R.shape != (3, 3) or not np.isfinite(R).all():
        raise ConversionError(f"rotation must be a finite (3, 3) matrix, got shape {R.shape}")
    U, _, Vt = np.linalg.svd(R)
    R = U @ Vt
    if np.linalg.det(R) < 0:
        raise ConversionError("matrix is a reflection (det < 0), not a rotation")
    tr = R[0, 0] + R[1, 1] + R[2, 2]
    diag = (R[0, 0], R[1, 1], R[2, 2])
    if tr >= max(diag):
        s = 2.0 * math.sqrt(max(1.0 + tr, 1e-300))
        q = np.array([(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s])
    elif diag[0] >= diag[1] and diag[0] >= diag[2]:
        s = 2.0 * math.sqrt(max(1.0 + R[0, 0] - R[1, 1] - R[2, 2], 1e-300))
        q = np.array([0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s])
    elif diag[1] >= diag[2]:
        s = 2.0 * math.sqrt(max(1.0 + R[1, 1] - R[0, 0] - R[2, 2], 1e-300))
        q = np.array([(R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s])
    else:
        s = 2.0 * math.sqrt(max(1.0 + R[2, 2] - R[0, 0] - R[1, 1], 1e-300))
        q = np.array([(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s, (R[1, 0] - R[0, 1]) / s])
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def quaternion_to_rotation(q: np.ndarray) -> np.ndarray:
    """Quaternion (x, y, z, w) (normalised here) -> (3, 3) rotation."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _check_T(T: np.ndarray) -> np.ndarray:
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.isfinite(T).all():
        raise ConversionError(f"pose must be a finite (4, 4) matrix, got shape {T.shape}")
    return T


def pose_to_msg(T_cam_obj: np.ndarray) -> Pose:
    """(4, 4) ``T_cam_obj`` (metres) -> ``geometry_msgs/Pose``."""
    T = _check_T(T_cam_obj)
    qx, qy, qz, qw = rotation_to_quaternion(T[:3, :3])
    x, y, z = (float(v) for v in T[:3, 3])
    return Pose(position=Point(x=x, y=y, z=z), orientation=Quaternion(x=qx, y=qy, z=qz, w=qw))


def transform_to_msg(T_parent_child: np.ndarray) -> Transform:
    """(4, 4) transform -> ``geometry_msgs/Transform`` (TF)."""
    T = _check_T(T_parent_child)
    qx, qy, qz, qw = rotation_to_quaternion(T[:3, :3])
    x, y, z = (float(v) for v in T[:3, 3])
    return Transform(translation=Vector3(x=x, y=y, z=z), rotation=Quaternion(x=qx, y=qy, z=qz, w=qw))


def msg_to_T(pose: Pose) -> np.ndarray:
    """``geometry_msgs/Pose`` -> (4, 4) float64."""
    o, p = pose.orientation, pose.position
    T = np.eye(4)
    T[:3, :3] = quaternion_to_rotation(np.array([o.x, o.y, o.z, o.w]))
    T[:3, 3] = (p.x, p.y, p.z)
    return T


def stamp_to_ns(stamp: TimeMsg) -> int:
    """``builtin_interfaces/Time`` -> integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def ns_to_stamp(ns: int) -> TimeMsg:
    """Integer nanoseconds -> ``builtin_interfaces/Time``."""
    return TimeMsg(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))
