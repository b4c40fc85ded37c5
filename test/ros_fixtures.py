"""Helpers for the ROS tests: an isolated DDS session, a test-double pipeline, synthetic camera frames.

Not a test module (no ``test_`` prefix); imported by ``test_ros_*.py`` (pytest puts ``test/`` on
``sys.path``) and by the subprocess test through ``pipeline_factory:=ros_fixtures:blob_factory``.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from osop_ros.core.geometry import make_T, rotation_about_axis
from osop_ros.core.types import CameraIntrinsics, MeshLoadError, Observation, PoseEstimate


def domain_id_for(salt: int) -> int:
    """A ROS_DOMAIN_ID in 1..100 derived from the pid, so parallel test runs do not talk to each other."""
    return 1 + (os.getpid() * 7 + salt * 13) % 100


def cube_obj_text(side: float = 0.05) -> str:
    """Wavefront OBJ of an axis-aligned cube centred at the origin (``side`` in file units)."""
    h = side / 2
    verts = [(x, y, z) for x in (-h, h) for y in (-h, h) for z in (-h, h)]
    faces = [(1, 3, 4), (1, 4, 2), (5, 6, 8), (5, 8, 7), (1, 2, 6), (1, 6, 5),
             (3, 7, 8), (3, 8, 4), (1, 5, 7), (1, 7, 3), (2, 4, 8), (2, 8, 6)]
    return "".join(f"v {x} {y} {z}\n" for x, y, z in verts) + "".join(f"f {a} {b} {c}\n" for a, b, c in faces)


def cube_model(side: float = 0.05) -> SimpleNamespace:
    """``ObjectModel``-like stand-in (vertices/faces/diameter) for the adapter tests."""
    h = side / 2
    verts = np.array([(x, y, z) for x in (-h, h) for y in (-h, h) for z in (-h, h)], np.float32)
    faces = np.array([(0, 2, 3), (0, 3, 1), (4, 5, 7), (4, 7, 6), (0, 1, 5), (0, 5, 4),
                      (2, 6, 7), (2, 7, 3), (0, 4, 6), (0, 6, 2), (1, 3, 7), (1, 7, 5)], np.int32)
    return SimpleNamespace(vertices=verts, faces=faces, diameter=float(side * np.sqrt(3)))


R_TEST = rotation_about_axis(np.array([1.0, 2.0, 3.0]), 0.7)


@dataclass
class CallRecord:
    """What the double saw in one call."""

    shape: tuple[int, ...]
    K: np.ndarray
    has_depth: bool


@dataclass
class BlobPipeline:
    """Honest test double of the OSOP pipeline for the adapter layer.

    Every onboarded object is "found" at the centroid (u, v) of the pure-red pixels, at the median
    valid depth there (``default_z`` without depth), rotated by ``R``: ``t = z K^-1 [u, v, 1]``.
    Meshes must exist; a file whose name contains ``broken`` raises :class:`MeshLoadError`.
    ``fail`` > 0 makes the next calls raise; ``delay_s`` simulates inference time.
    """

    config: dict[str, Any] = field(default_factory=dict)
    score: float = 0.9
    R: np.ndarray = field(default_factory=lambda: R_TEST.copy())
    default_z: float = 1.0
    delay_s: float = 0.0
    fail: int = 0
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[CallRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add_object(self, spec: dict[str, Any]) -> SimpleNamespace:
        path = Path(spec["mesh"])
        if not path.is_file():
            raise MeshLoadError(f"{path}: mesh file not found")
        if "broken" in path.name:
            raise MeshLoadError(f"{path}: cannot parse mesh")
        with self.lock:
            self.objects[spec["name"]] = dict(spec)
        return SimpleNamespace(model=cube_model())

    def __call__(self, obs: Observation) -> list[PoseEstimate]:
        obs.validate()
        with self.lock:
            self.calls.append(CallRecord(obs.rgb.shape, obs.camera.K.copy(), obs.depth is not None))
            names = list(self.objects)
            if self.fail > 0:
                self.fail -= 1
                raise RuntimeError("injected pipeline failure")
        if self.delay_s:
            time.sleep(self.delay_s)
        rgb = obs.rgb
        mask = (rgb[..., 0] > 200) & (rgb[..., 1] < 60) & (rgb[..., 2] < 60)
        if not mask.any():
            return []
        v, u = np.nonzero(mask)
        z = self.default_z
        if obs.depth is not None:
            d = obs.depth[mask]
            z = float(np.median(d[d > 0])) if np.any(d > 0) else self.default_z
        t = z * np.linalg.solve(obs.camera.K, np.array([u.mean(), v.mean(), 1.0]))
        T = make_T(self.R, t)
        return [PoseEstimate(n, T.copy(), self.score, timings={"segment": 0.001, "solve": 0.002}) for n in names]


def blob_factory(config: dict[str, Any]) -> BlobPipeline:
    """``pipeline_factory`` entry point for subprocess tests."""
    return BlobPipeline(config=config)


MID_FRAME_MARKER = "STAND-IN: frame started"


@dataclass
class SlowBlobPipeline(BlobPipeline):
    """:class:`BlobPipeline` that prints :data:`MID_FRAME_MARKER` on stdout when a frame starts, then
    takes ``delay_s`` (env ``OSOP_TEST_FRAME_DELAY``, default 6 s) to answer: a long in-flight frame."""

    def __call__(self, obs: Observation) -> list[PoseEstimate]:
        print(MID_FRAME_MARKER, flush=True)
        return super().__call__(obs)


def slow_factory(config: dict[str, Any]) -> SlowBlobPipeline:
    """``pipeline_factory`` entry point: the slow stand-in (Ctrl-C while a frame is processed)."""
    return SlowBlobPipeline(config=config, delay_s=float(os.environ.get("OSOP_TEST_FRAME_DELAY", "6")))


# ----------------------------------------------------------------------------------- synthetic frames
CAM = CameraIntrinsics(fx=50.0, fy=55.0, cx=31.5, cy=23.5, width=64, height=48)


def expected_T(u: float, v: float, z: float, cam: CameraIntrinsics = CAM, R: np.ndarray = R_TEST) -> np.ndarray:
    """The pose the double must return for a blob centred at (u, v) at depth z (computed by hand)."""
    return make_T(R, np.array([(u - cam.cx) * z / cam.fx, (v - cam.cy) * z / cam.fy, z]))


def make_arrays(cam: CameraIntrinsics = CAM, u: int = 40, v: int = 20, z: float = 0.8, half: int = 2,
                ) -> tuple[np.ndarray, np.ndarray]:
    """Grey (H, W, 3) RGB with a pure-red square centred on (u, v) and constant depth ``z`` metres."""
    rgb = np.full((cam.height, cam.width, 3), 90, np.uint8)
    rgb[v - half : v + half + 1, u - half : u + half + 1] = (255, 0, 0)
    depth = np.full((cam.height, cam.width), z, np.float32)
    return rgb, depth


def make_frame(stamp_ns: int, cam: CameraIntrinsics = CAM, u: int = 40, v: int = 20, z: float = 0.8,
               rgb_encoding: str = "rgb8", depth_encoding: str = "16UC1", frame_id: str = "cam_optical",
               rgb: np.ndarray | None = None, depth: np.ndarray | None = None) -> tuple[Any, Any, Any]:
    """(rgb Image, depth Image, CameraInfo) messages with the same stamp."""
    from osop_ros.ros.conversions import array_to_image, intrinsics_to_camera_info, ns_to_stamp

    st = ns_to_stamp(stamp_ns)
    r, d = make_arrays(cam, u, v, z)
    r = r if rgb is None else rgb
    d = d if depth is None else depth
    if rgb_encoding == "bgr8":
        r = r[..., ::-1]
    if depth_encoding in ("16UC1", "mono16"):
        d = np.round(np.nan_to_num(d, nan=0.0) * 1000.0).clip(0, 65535).astype(np.uint16)
    rgb_msg = array_to_image(r, rgb_encoding, st, frame_id)
    depth_msg = array_to_image(d, depth_encoding, st, frame_id)
    info = intrinsics_to_camera_info(cam, st, frame_id)
    return rgb_msg, depth_msg, info


# ----------------------------------------------------------------------------------- DDS session
@dataclass
class RosSession:
    """An rclpy context with a background multi-threaded executor."""

    context: Any
    executor: Any
    domain_id: int
    thread: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)  # exceptions raised by callbacks
    spin_lock: threading.Lock = field(default_factory=threading.Lock)  # held while the executor waits

    def add(self, node: Any) -> Any:
        self.executor.add_node(node)
        return node

    def remove(self, node: Any) -> None:
        """Remove + destroy ``node`` between two spin iterations (never under a running wait set)."""
        with self.spin_lock:
            self.executor.remove_node(node)
            node.destroy_node()


@contextmanager
def ros_session(salt: int) -> Iterator[RosSession]:
    """LOCALHOST discovery + a pid-derived ROS_DOMAIN_ID set BEFORE rclpy.init, one context per module."""
    import rclpy
    from rclpy.executors import MultiThreadedExecutor

    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    did = domain_id_for(salt)
    os.environ["ROS_DOMAIN_ID"] = str(did)
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=did)
    executor = MultiThreadedExecutor(num_threads=4, context=ctx)
    session = RosSession(ctx, executor, did)

    def spin() -> None:
        while not session.stop.is_set() and ctx.ok():
            try:
                with session.spin_lock:
                    executor.spin_once(timeout_sec=0.05)
            except Exception as exc:  # noqa: BLE001 - keep spinning; tests assert session.errors == []
                if session.stop.is_set() or not ctx.ok():
                    break
                session.errors.append(exc)

    session.thread = threading.Thread(target=spin, name="ros_test_spin", daemon=True)
    session.thread.start()
    try:
        yield session
    finally:
        session.stop.set()
        session.thread.join(timeout=5.0)
        for node in list(executor.get_nodes()):
            executor.remove_node(node)
            node.destroy_node()
        executor.shutdown(timeout_sec=2.0)
        rclpy.try_shutdown(context=ctx)


def stamp_ns(msg: Any) -> int:
    """``msg.header.stamp`` in integer nanoseconds."""
    return int(msg.header.stamp.sec) * 1_000_000_000 + int(msg.header.stamp.nanosec)


def wait_for(pred: Callable[[], bool], timeout: float, period: float = 0.01) -> bool:
    """Poll ``pred`` until true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(period)
    return pred()


class CameraStub:
    """Publishes synthetic camera topics into ``namespace`` and records what the node publishes."""

    def __init__(self, session: RosSession, namespace: str, node_name: str = "osop_node") -> None:
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image
        from visualization_msgs.msg import MarkerArray

        self.session = session
        self.ns = namespace.rstrip("/")
        self.prefix = f"{self.ns}/{node_name}"
        self.node = session.add(Node("camera_stub", namespace=self.ns, context=session.context))
        self.qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.pub_rgb = self.node.create_publisher(Image, "rgb/image_raw", self.qos)
        self.pub_depth = self.node.create_publisher(Image, "depth/image_raw", self.qos)
        self.pub_info = self.node.create_publisher(CameraInfo, "rgb/camera_info", self.qos)
        self.lock = threading.Lock()
        self.poses: dict[str, list[Any]] = {}
        self.pose_recv_wall: dict[int, float] = {}  # stamp ns -> wall time the pose arrived
        self.markers: list[Any] = []
        self.overlays: list[Any] = []
        self.diagnostics: list[Any] = []
        self.node.create_subscription(MarkerArray, f"{self.prefix}/markers", self._rec(self.markers), 10)
        self.node.create_subscription(Image, f"{self.prefix}/overlay", self._rec(self.overlays), 10)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._rec(self.diagnostics), 10)
        self._t = time.time_ns()

    def _rec(self, store: list[Any]) -> Callable[[Any], None]:
        def cb(msg: Any) -> None:
            with self.lock:
                store.append(msg)
                del store[:-50]  # keep the newest only (overlays can be large)

        return cb

    def watch_pose(self, name: str) -> None:
        from geometry_msgs.msg import PoseStamped

        with self.lock:
            if name in self.poses:
                return
            store: list[Any] = []
            self.poses[name] = store

        def cb(msg: Any) -> None:
            now = time.time()
            with self.lock:
                store.append(msg)
                self.pose_recv_wall.setdefault(stamp_ns(msg), now)

        self.node.create_subscription(PoseStamped, f"{self.prefix}/{name}/pose", cb, self.qos)

    def watch_rosout(self) -> list[Any]:
        """Subscribe ``/rosout`` (rcl_interfaces/Log); returns the list the messages are appended to."""
        from rcl_interfaces.msg import Log
        from rclpy.qos import QoSProfile, ReliabilityPolicy

        store: list[Any] = []

        def cb(msg: Any) -> None:
            with self.lock:
                store.append(msg)

        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(Log, "/rosout", cb, qos)
        return store

    def call(self, srv_type: Any, name: str, request: Any, timeout: float = 5.0) -> Any:
        """Call a service over DDS (waits for it); returns the response."""
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout), f"service {name} not available"
            fut = client.call_async(request)
            assert wait_for(fut.done, timeout), f"service call {name} timed out"
            return fut.result()
        finally:
            self.node.destroy_client(client)

    def pose_stamps(self, name: str) -> list[int]:
        with self.lock:
            return [stamp_ns(m) for m in self.poses.get(name, [])]

    def pose_for(self, name: str, stamps: list[int]) -> Any:
        """The newest received pose whose stamp is in ``stamps``."""
        wanted = set(stamps)
        with self.lock:
            return [m for m in self.poses.get(name, []) if stamp_ns(m) in wanted][-1]

    def next_stamp(self) -> int:
        self._t = max(self._t + 33_000_000, time.time_ns())
        return self._t

    def publish(self, rgb: Any, depth: Any | None, info: Any | None) -> None:
        if info is not None:
            self.pub_info.publish(info)
        if depth is not None:
            self.pub_depth.publish(depth)
        self.pub_rgb.publish(rgb)

    def stream(self, make: Callable[[int], tuple[Any, Any | None, Any | None]], until: Callable[[], bool],
               timeout: float = 8.0, period: float = 0.04) -> list[int]:
        """Publish ``make(stamp)`` with fresh stamps every ``period`` s until ``until()``; returns the stamps.

        Raises AssertionError on timeout (never assumes one message is enough: DDS may drop early ones).
        """
        stamps = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.next_stamp()
            stamps.append(st)
            self.publish(*make(st))
            if wait_for(until, period, 0.005):
                return stamps
        raise AssertionError(f"condition not reached within {timeout} s ({len(stamps)} frames sent)")
