"""Image/CameraInfo/pose conversions against hand-computed values (no DDS)."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("sensor_msgs.msg", reason="ROS 2 message packages not installed")

from sensor_msgs.msg import CameraInfo, Image  # noqa: E402

from osop_ros.core.geometry import random_rotation, rotation_about_axis  # noqa: E402
from osop_ros.core.types import CameraIntrinsics, OsopError  # noqa: E402
from osop_ros.ros import conversions as C  # noqa: E402

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)


def raw_image(data: bytes, encoding: str, w: int, h: int, step: int, bigendian: bool = False) -> Image:
    m = Image()
    m.width, m.height, m.step, m.encoding, m.is_bigendian = w, h, step, encoding, int(bigendian)
    m.data = data
    return m


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize(
    "encoding, arr",
    [
        ("rgb8", RGB),
        ("bgr8", RGB[..., ::-1]),
        ("rgba8", np.dstack([RGB, np.full(RGB.shape[:2], 7, np.uint8)])),
        ("bgra8", np.dstack([RGB[..., ::-1], np.full(RGB.shape[:2], 7, np.uint8)])),
    ],
)
def test_colour_encodings_to_rgb(encoding: str, arr: np.ndarray, pad: int) -> None:
    msg = C.array_to_image(arr, encoding, pad=pad)
    assert msg.step == arr.shape[1] * arr.shape[2] + pad
    out = C.image_to_rgb(msg)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, RGB)


def test_mono8_replicated_with_one_warning() -> None:
    C.reset_warnings()
    grey = RGB[..., 0]
    seen: list[str] = []
    for _ in range(3):
        out = C.image_to_rgb(C.array_to_image(grey, "mono8", pad=1), warn=seen.append)
        np.testing.assert_array_equal(out, np.repeat(grey[..., None], 3, axis=2))
    assert len(seen) == 1 and "mono8" in seen[0]


def test_rgb8_bytes_by_hand() -> None:
    # 2x1 image, step 8 (2 padding bytes per row): pixel (0,0) = (1,2,3), (0,1) = (4,5,6)
    msg = raw_image(bytes([1, 2, 3, 4, 5, 6, 99, 99]), "rgb8", 2, 1, 8)
    np.testing.assert_array_equal(C.image_to_rgb(msg), [[[1, 2, 3], [4, 5, 6]]])
    msg = raw_image(bytes([1, 2, 3, 4, 5, 6, 99, 99]), "bgr8", 2, 1, 8)
    np.testing.assert_array_equal(C.image_to_rgb(msg), [[[3, 2, 1], [6, 5, 4]]])


@pytest.mark.parametrize("bigendian", [False, True])
@pytest.mark.parametrize("pad", [0, 2])
def test_16uc1_millimetres_to_metres(bigendian: bool, pad: int) -> None:
    mm = np.array([[0, 1, 1000], [65535, 250, 2]], np.uint16)
    msg = C.array_to_image(mm, "16UC1", bigendian=bigendian, pad=pad)
    d = C.image_to_depth(msg)
    assert d.dtype == np.float32 and d.shape == (2, 3)
    np.testing.assert_allclose(d, mm.astype(np.float64) / 1000.0, rtol=1e-6)


def test_16uc1_big_endian_bytes_by_hand() -> None:
    # 1000 mm = 0x03E8: big-endian bytes 03 E8, little-endian E8 03
    big = raw_image(bytes([0x03, 0xE8]), "16UC1", 1, 1, 2, bigendian=True)
    little = raw_image(bytes([0xE8, 0x03]), "16UC1", 1, 1, 2, bigendian=False)
    assert C.image_to_depth(big)[0, 0] == pytest.approx(1.0)
    assert C.image_to_depth(little)[0, 0] == pytest.approx(1.0)
    # the flag matters: reading big-endian bytes as little-endian would give 0xE803 = 59395 mm
    wrong = raw_image(bytes([0x03, 0xE8]), "16UC1", 1, 1, 2, bigendian=False)
    assert C.image_to_depth(wrong)[0, 0] == pytest.approx(59.395)


@pytest.mark.parametrize("bigendian", [False, True])
def test_32fc1_metres_invalid_to_zero(bigendian: bool) -> None:
    m = np.array([[0.5, np.nan, np.inf], [-1.0, 0.0, 2.25]], np.float32)
    d = C.image_to_depth(C.array_to_image(m, "32FC1", bigendian=bigendian, pad=4))
    np.testing.assert_array_equal(d, [[0.5, 0.0, 0.0], [0.0, 0.0, 2.25]])


def test_host_order_detection() -> None:
    native_big = sys.byteorder == "big"
    msg = C.array_to_image(np.array([[1.5]], np.float32), "32FC1", bigendian=not native_big)
    assert C.image_to_array(msg).dtype.isnative
    assert C.image_to_array(msg)[0, 0] == 1.5


def test_last_row_without_padding_accepted() -> None:
    data = bytes([1, 2, 3, 0, 4, 5, 6])  # 2 rows of 1 px rgb8, step 4, last row unpadded
    np.testing.assert_array_equal(C.image_to_rgb(raw_image(data, "rgb8", 1, 2, 4)), [[[1, 2, 3]], [[4, 5, 6]]])


@pytest.mark.parametrize(
    "msg, words",
    [
        (raw_image(bytes(12), "yuv422", 2, 2, 4), "unsupported image encoding"),
        (raw_image(bytes(12), "rgb8", 2, 2, 5), "step 5 < width"),
        (raw_image(bytes(10), "rgb8", 2, 2, 6), "truncated"),
        (raw_image(bytes(20), "rgb8", 2, 2, 6), r"step\*height"),
        (raw_image(b"", "rgb8", 0, 0, 0), "empty"),
        (raw_image(bytes(6), "16UC1", 1, 2, 3), "multiple of 2"),
        (raw_image(bytes(8), "16UC1", 2, 2, 4), "colour image has encoding"),
    ],
)
def test_bad_images_raise_conversion_error(msg: Image, words: str) -> None:
    with pytest.raises(C.ConversionError, match=words) as info:
        C.image_to_rgb(msg) if "colour" in words else C.image_to_array(msg)
    assert isinstance(info.value, OsopError)


def test_unknown_colour_encoding_named() -> None:
    with pytest.raises(C.ConversionError, match="'yuv422'"):
        C.image_to_rgb(raw_image(bytes(8), "yuv422", 2, 2, 4))


def test_colour_image_given_as_depth_rejected() -> None:
    with pytest.raises(C.ConversionError, match="depth image has encoding 'rgb8'"):
        C.image_to_depth(C.array_to_image(RGB, "rgb8"))


def test_camera_info_round_trip_and_fallback_size() -> None:
    cam = CameraIntrinsics(500.0, 510.0, 319.5, 239.5, 640, 480)
    msg = C.intrinsics_to_camera_info(cam, frame_id="cam")
    assert C.camera_info_to_intrinsics(msg) == cam
    msg.width = msg.height = 0
    assert C.camera_info_to_intrinsics(msg, 640, 480) == cam


@pytest.mark.parametrize(
    "k, words",
    [
        ([0.0] * 9, "all zeros"),
        ([np.nan, 0, 1, 0, 1, 1, 0, 0, 1], "NaN"),
        ([0.0, 0, 320, 0, 0, 240, 0, 0, 1], "focal lengths"),
        ([500.0, 0, 320, 0, 500, 240, 0, 0, 0], "last row"),
    ],
)
def test_bad_intrinsics_rejected(k: list[float], words: str) -> None:
    msg = CameraInfo(width=640, height=480)
    msg.k = [float(x) for x in k]
    with pytest.raises(C.ConversionError, match=words):
        C.camera_info_to_intrinsics(msg)


def test_rgb_to_image() -> None:
    msg = C.rgb_to_image(RGB, C.ns_to_stamp(1_500_000_001), "cam")
    assert (msg.encoding, msg.width, msg.height, msg.step) == ("rgb8", 7, 5, 21)
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec, msg.header.frame_id) == (1, 500_000_001, "cam")
    np.testing.assert_array_equal(C.image_to_rgb(msg), RGB)
    with pytest.raises(C.ConversionError):
        C.rgb_to_image(RGB[..., 0])


def test_quaternion_known_values() -> None:
    np.testing.assert_allclose(C.rotation_to_quaternion(np.eye(3)), [0, 0, 0, 1])
    # 90 deg about z: q = (0, 0, sin 45, cos 45)
    Rz = np.array([[0.0, -1, 0], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(C.rotation_to_quaternion(Rz), [0, 0, np.sqrt(0.5), np.sqrt(0.5)], atol=1e-12)
    # 180 deg about x: q = (1, 0, 0, 0) (trace = -1, the numerically hard case)
    np.testing.assert_allclose(C.rotation_to_quaternion(np.diag([1.0, -1, -1])), [1, 0, 0, 0], atol=1e-12)


def test_quaternion_round_trip_random_and_near_pi() -> None:
    rng = np.random.default_rng(3)
    Rs = [random_rotation(rng) for _ in range(200)]
    Rs += [rotation_about_axis(rng.normal(size=3), np.pi - eps) for eps in (0.0, 1e-9, 1e-6, 1e-3)]
    for R in Rs:
        q = C.rotation_to_quaternion(R)
        assert abs(np.linalg.norm(q) - 1) < 1e-12 and q[3] >= 0
        np.testing.assert_allclose(C.quaternion_to_rotation(q), R, atol=1e-9)


def test_quaternion_tolerates_slightly_non_orthonormal() -> None:
    R = rotation_about_axis(np.array([0.0, 1, 0]), 0.3) * 1.001 + 1e-4
    q = C.rotation_to_quaternion(R)
    assert abs(np.linalg.norm(q) - 1) < 1e-12
    with pytest.raises(C.ConversionError, match="reflection"):
        C.rotation_to_quaternion(np.diag([1.0, 1, -1]))
    with pytest.raises(C.ConversionError):
        C.rotation_to_quaternion(np.full((3, 3), np.nan))


def test_pose_and_transform_round_trip() -> None:
    T = np.eye(4)
    T[:3, :3] = rotation_about_axis(np.array([1.0, 2, 3]), 1.1)
    T[:3, 3] = (0.1, -0.2, 0.75)
    np.testing.assert_allclose(C.msg_to_T(C.pose_to_msg(T)), T, atol=1e-12)
    tf = C.transform_to_msg(T)
    assert (tf.translation.x, tf.translation.y, tf.translation.z) == (0.1, -0.2, 0.75)
    with pytest.raises(C.ConversionError):
        C.pose_to_msg(np.eye(3))


def test_stamp_ns_round_trip() -> None:
    for ns in (0, 1, 999_999_999, 1_000_000_000, 1_732_000_000_123_456_789):
        assert C.stamp_to_ns(C.ns_to_stamp(ns)) == ns


# ----------------------------------------------------------------------------------- undistortion (issue 13.7)
K_U = np.array([[120.0, 0.0, 79.5], [0.0, 118.0, 59.5], [0.0, 0.0, 1.0]])
D_U = np.array([-0.25, 0.08, 0.001, -0.001, 0.0])


def test_distortion_of_camera_info() -> None:
    info = C.intrinsics_to_camera_info(CameraIntrinsics.from_K(K_U, 160, 120))
    assert C.distortion_of(info) is None  # plumb_bob with zero d
    info.d = []
    assert C.distortion_of(info) is None
    info.distortion_model, info.d = "rational_polynomial", [0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    model, D = C.distortion_of(info)
    assert model == "rational_polynomial" and D.shape == (8,)
    info.d = [float("nan")] * 5
    with pytest.raises(C.ConversionError, match="NaN"):
        C.distortion_of(info)


def test_undistort_rgb_matches_cv2_and_maps_are_cached() -> None:
    import cv2

    vv, uu = np.mgrid[0:120, 0:160]
    rgb = np.dstack([127 + 120 * np.sin(uu / 7.0), 127 + 120 * np.cos(vv / 5.0), (uu + vv) / 2.0]).astype(np.uint8)
    und = C.Undistorter(max_cached=2)
    out, depth = und("plumb_bob", K_U, D_U, rgb)
    assert depth is None and out.shape == rgb.shape and out.dtype == np.uint8
    ref = cv2.undistort(rgb, K_U, D_U, None, K_U)  # same model, same new camera matrix (K)
    # cv2.undistort uses fixed-point tables (1/32 px): equal up to a few grey levels on this smooth image
    assert np.abs(out.astype(int) - ref.astype(int))[10:-10, 10:-10].max() <= 3
    m = und.maps("plumb_bob", K_U, D_U, 160, 120)
    assert und.maps("plumb_bob", K_U.copy(), D_U.copy(), 160, 120) is m  # cache hit per (model, K, D, size)
    assert und.maps("plumb_bob", K_U, D_U * 0.5, 160, 120) is not m
    und.maps("plumb_bob", K_U, D_U * 0.25, 160, 120)  # LRU of 2: the first table is evicted
    assert und.maps("plumb_bob", K_U, D_U, 160, 120) is not m


def test_undistort_point_lands_where_the_pinhole_model_puts_it() -> None:
    import cv2

    und = C.Undistorter()
    m1, m2 = und.maps("plumb_bob", K_U, D_U, 160, 120)
    # pixel (130, 95) of the undistorted image samples the distorted image where the lens maps it
    x = np.linalg.solve(K_U, [130.0, 95.0, 1.0])
    dist, _ = cv2.projectPoints(x.reshape(1, 3), np.zeros(3), np.zeros(3), K_U, D_U)
    np.testing.assert_allclose([m1[95, 130], m2[95, 130]], dist.ravel(), atol=1e-3)


def test_undistort_depth_is_nearest_neighbour_and_keeps_invalid() -> None:
    depth = np.full((120, 160), 2.0, np.float32)
    depth[:, 80:] = 0.5  # a depth edge
    depth[30:60, 20:50] = 0.0  # invalid patch
    rgb = np.zeros((120, 160, 3), np.uint8)
    _, out = C.Undistorter()("plumb_bob", K_U, D_U, rgb, depth)
    assert out.dtype == np.float32 and out.shape == depth.shape
    assert set(np.unique(out).tolist()) <= {0.0, 0.5, 2.0}  # never a value interpolated across the edge
    m1, m2 = C.Undistorter().maps("plumb_bob", K_U, D_U, 160, 120)
    src = depth[np.clip(np.rint(m2), 0, 119).astype(int), np.clip(np.rint(m1), 0, 159).astype(int)]
    inside = (m1 >= 0) & (m1 <= 159) & (m2 >= 0) & (m2 <= 119)
    np.testing.assert_array_equal(out[inside & (src == 0)], 0.0)  # invalid stays invalid
    assert (out[~inside] == 0).all()  # outside the distorted image: invalid, not guessed


def test_undistort_equidistant_and_unknown_models() -> None:
    import cv2

    D4 = np.array([0.05, -0.01, 0.002, 0.0])
    und = C.Undistorter()
    m1, m2 = und.maps("equidistant", K_U, D4, 160, 120)
    x = np.linalg.solve(K_U, [120.0, 20.0, 1.0])
    dist = cv2.fisheye.distortPoints((x[:2] / x[2]).reshape(1, 1, 2), K_U, D4)
    np.testing.assert_allclose([m1[20, 120], m2[20, 120]], dist.ravel(), atol=1e-2)
    with pytest.raises(C.ConversionError, match="4 coefficients"):
        und.maps("equidistant", K_U, D_U, 160, 120)
    with pytest.raises(C.UnknownDistortionError, match="'fov'") as info:
        und.maps("fov", K_U, np.array([0.3]), 160, 120)
    assert info.value.model == "fov"
