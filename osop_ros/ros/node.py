"""``osop_node``: thin ROS 2 adapter over the OSOP pipeline.

Topics (relative names, remap them)
-----------------------------------
Subscribed: ``rgb/image_raw`` (rgb8/bgr8/rgba8/bgra8/mono8), ``depth/image_raw`` (16UC1 mm or 32FC1 m,
registered to rgb; only with ``use_depth``), ``rgb/camera_info``. Sensor-data QoS (best effort, depth 5)
unless ``qos.*`` say otherwise. The three are matched by an approximate-time synchroniser
(``sync.*``, see :mod:`osop_ros.ros.sync`).

Published (``~`` = node namespace + name):

* ``~/<object>/pose`` geometry_msgs/PoseStamped: best instance of each object scoring at least
  ``pipeline.score_threshold``; header = rgb image stamp + camera optical frame (``camera_frame`` or
  the image's frame_id); the pose is ``T_cam_obj`` (model frame -> camera optical frame, metres).
* ``~/markers`` visualization_msgs/MarkerArray: DELETEALL, then per estimate the mesh
  (MESH_RESOURCE ``file://`` URI scaled to metres when the mesh units are explicit, else a decimated
  TRIANGLE_LIST) and a TEXT_VIEW_FACING ``name score`` label.
* ``~/overlay`` sensor_msgs/Image rgb8: the processed image with model contours, axes and labels
  (only built while someone subscribes).
* TF ``camera frame -> <tf_prefix><object>`` when ``tf2_ros`` is importable;
  ``~/detections`` vision_msgs/Detection3DArray when ``vision_msgs`` is importable;
  ``/diagnostics`` every ``stats_period``.

Threading
---------
Subscription callbacks only decode headers and feed the synchroniser; the newest synchronised frame
goes into a one-slot buffer (an unprocessed older frame is dropped and counted). One worker thread
owns the pipeline: it builds it at startup (networks, template banks, progress logged, then one
``ready`` line with load time and RSS), runs inference and publishes the results. Because GL/torch
state lives on that thread, runtime onboarding runs there too (frames arriving meanwhile are
dropped and counted).

Runtime onboarding (no standard service type carries a mesh path)
----------------------------------------------------------------
Set the ``onboard.*`` parameters, then call the std_srvs/Trigger service ``~/add_object``::

    ros2 param set /osop_node onboard.name mug
    ros2 param set /osop_node onboard.mesh /data/mug.ply
    ros2 param set /osop_node onboard.units mm          # optional: mm | m | auto
    ros2 service call /osop_node/add_object std_srvs/srv/Trigger

The call returns when onboarding finished (``success`` + message) or after ``onboard.timeout`` s.
The service has its own callback group: with the MultiThreadedExecutor of :func:`main`, image
callbacks keep running while it waits (with a single-threaded executor they pause until it returns).
An existing name is replaced; ``~/<name>/pose`` appears once onboarding succeeded.

Robustness: bad input (unknown encoding, rgb/depth/camera_info size mismatch, depth without any
valid pixel, zero/NaN intrinsics, tiny images, duplicated or out-of-order stamps, missing
camera_info) and pipeline exceptions never stop the node and never produce a pose: a warning
(throttled per kind, see :mod:`osop_ros.ros.throttle`) is logged, the frame is skipped and counted,
the next good frame is processed. Any other exception of the worker loop (e.g. a failed publish) is
logged, counted (``worker_errors``) and turns diagnostics to ERROR; the loop goes on. Images larger
than ``max_image_side`` are downscaled (intrinsics scaled accordingly). Non-zero ``camera_info.d``
(plumb_bob, rational_polynomial, equidistant) is undone before the core, with K as the new camera
matrix (:class:`osop_ros.ros.conversions.Undistorter`); other distortion models skip the frame.
Many lost camera frames (stamp gaps, rgb without partners) give a throttled warning suggesting
reliable QoS (:class:`osop_ros.ros.sync.InputLossMonitor`).

Logging: while the node runs, the ``osop_ros`` Python loggers (core) go through the node's rclpy
logger (:mod:`osop_ros.ros.log_bridge`): console, ``/rosout``, ROS log files, ``--log-level``.

Shutdown: Ctrl-C / SIGTERM exits with code 0 within about a second; a frame being processed is
abandoned (nothing is published once the context is shut down).
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PoseStamped
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
    ParameterUninitializedException,
)
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from std_srvs.srv import Trigger
from visualization_msgs.msg import MarkerArray

from osop_ros.core.types import InvalidInputError, Observation, OsopError, PoseEstimate
from osop_ros.ros import log_bridge, outputs
from osop_ros.ros.conversions import (
    ConversionError,
    Undistorter,
    UnknownDistortionError,
    camera_info_to_intrinsics,
    distortion_of,
    image_to_depth,
    image_to_rgb,
    pose_to_msg,
    rgb_to_image,
    stamp_to_ns,
)
from osop_ros.ros.params import (
    NODE_PARAMS,
    ObjectSpec,
    ParameterError,
    ParamSpec,
    core_config,
    core_param_specs,
    object_param_specs,
    object_spec_from_values,
    spec_for,
    validate_values,
)
from osop_ros.ros.sync import DUPLICATE, OUT_OF_ORDER, RESET, FrameSynchronizer, InputLossMonitor
from osop_ros.ros.throttle import WarnThrottle, error_kind

try:  # optional on a real ROS install
    from tf2_ros import TransformBroadcaster
except ImportError:  # pragma: no cover - depends on the install
    TransformBroadcaster = None
try:
    import vision_msgs.msg as vision_msgs
except ImportError:  # pragma: no cover
    vision_msgs = None


class PipelineLike(Protocol):
    """What the node needs from a pipeline (the real one or a test double)."""

    def __call__(self, obs: Observation) -> list[PoseEstimate]: ...

    def add_object(self, spec: dict[str, Any]) -> Any:
        """Onboard ``spec`` (a core-config ``objects[]`` entry with an absolute mesh path); returns an
        object with ``.model`` (``ObjectModel``-like) or None; raises OsopError on failure."""
        ...


PipelineFactory = Callable[[dict[str, Any]], PipelineLike]


class CorePipelineAdapter:
    """Wraps :class:`osop_ros.core.pipeline.Pipeline` (built by :mod:`osop_ros.core.factory`) as a
    :class:`PipelineLike`: ``add_object(spec)`` onboards with the pipeline's networks."""

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline

    def __call__(self, obs: Observation) -> list[PoseEstimate]:
        return self.pipeline(obs)

    def add_object(self, spec: dict[str, Any]) -> Any:
        from osop_ros.core.config import ObjectConfig
        from osop_ros.core.factory import onboard_object

        obj = onboard_object(ObjectConfig(**spec), self.pipeline.config, self.pipeline.networks)
        self.pipeline.add_object(obj)
        return obj


def default_pipeline_factory(config: dict[str, Any]) -> PipelineLike:
    """Validate ``config`` (core form) and build the OSOP pipeline (networks loaded, no objects yet)."""
    from osop_ros.core.config import load_config
    from osop_ros.core.factory import build_pipeline

    return CorePipelineAdapter(build_pipeline(load_config(config)))


def load_factory(ref: str) -> PipelineFactory:
    """``'package.module:function'`` -> the function."""
    module, _, attr = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ParameterError(f"pipeline_factory {ref!r} cannot be imported: {exc}") from exc


def rss_mib() -> float:
    """Resident set size of this process in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@dataclass
class _Frame:
    rgb: Image
    depth: Image | None
    info: CameraInfo
    t_sync: float


@dataclass
class _Job:
    spec: ObjectSpec
    done: threading.Event = field(default_factory=threading.Event)
    result: tuple[bool, str] = (False, "not run")


class OsopNode(Node):
    """The ROS adapter (see module docstring). ``pipeline_factory`` overrides the ``pipeline_factory``
    parameter and the default OSOP pipeline (tests inject doubles); other kwargs go to ``Node``."""

    def __init__(self, pipeline_factory: PipelineFactory | None = None, *, node_name: str = "osop_node",
                 **node_kwargs: Any) -> None:
        super().__init__(node_name, **node_kwargs)
        self._stop = False
        try:
            self._values, self._object_specs = self._declare_parameters()
            if pipeline_factory is None:
                ref = str(self._values["pipeline_factory"])
                pipeline_factory = load_factory(ref) if ref else default_pipeline_factory
        except ParameterError:
            self.destroy_node()
            raise
        v = self._values
        self._factory = pipeline_factory
        self.pipeline: PipelineLike | None = None
        self.failed: BaseException | None = None
        self.ready = threading.Event()

        self._lock = threading.Lock()  # counters, warnings, timings, visuals
        self._pub_lock = threading.Lock()  # held while the worker publishes; destroy_node waits for it
        self.counters: Counter[str] = Counter()
        self.warnings: deque[tuple[str, str]] = deque(maxlen=500)
        self._throttle = WarnThrottle(lambda: float(self._param("warn_throttle")))
        self._last_worker_error = ""
        self._skipped_objects: list[str] = []
        self._undistort = Undistorter()
        self._loss = InputLossMonitor()
        self._timings: dict[str, list[float]] = {}
        self._latencies: list[float] = []
        self._visuals: dict[str, outputs.ObjectVisual] = {}
        self._pose_pubs: dict[str, Any] = {}
        self._period_start = time.monotonic()
        self._prev_counters: Counter[str] = Counter()

        # one-slot frame buffer + onboarding jobs, consumed by the worker thread
        self._cv = threading.Condition()
        self._slot: _Frame | None = None
        self._jobs: deque[_Job] = deque()
        self._current_job: _Job | None = None

        # inputs
        self._use_depth = bool(v["use_depth"])
        qos = QoSProfile(
            history=HistoryPolicy.KEEP_LAST,
            depth=int(v["qos.depth"]),
            reliability=ReliabilityPolicy.RELIABLE if v["qos.reliability"] == "reliable"
            else ReliabilityPolicy.BEST_EFFORT,
            durability=DurabilityPolicy.VOLATILE,
        )
        inputs: list[tuple[type, str]] = [(Image, "rgb/image_raw")]
        if self._use_depth:
            inputs.append((Image, "depth/image_raw"))
        inputs.append((CameraInfo, "rgb/camera_info"))
        self._input_names = [name for _, name in inputs]
        self._sync = FrameSynchronizer(len(inputs), self._on_synced, queue_size=int(v["sync.queue_size"]),
                                       slop_s=float(v["sync.slop"]), backend=str(v["sync.backend"]))
        self._last_input_t: list[float | None] = [None] * len(inputs)
        self._last_input_stamp: list[int | None] = [None] * len(inputs)
        self._n_synced = 0
        self._unsynced_rgb: tuple[float, int] | None = None  # (first arrival, count) of rgb since last sync
        group_in = MutuallyExclusiveCallbackGroup()
        self._subs = [
            self.create_subscription(t, name, lambda msg, i=i: self._on_input(i, msg), qos, callback_group=group_in)
            for i, (t, name) in enumerate(inputs)
        ]
        self._topics = [s.topic_name for s in self._subs]

        # outputs
        self._markers_pub = self.create_publisher(MarkerArray, "~/markers", 10)
        self._overlay_pub = self.create_publisher(Image, "~/overlay", 5)
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self._det_pub = self.create_publisher(vision_msgs.Detection3DArray, "~/detections", 10) if vision_msgs else None
        self._tf = TransformBroadcaster(self) if TransformBroadcaster is not None else None
        self._service = self.create_service(Trigger, "~/add_object", self._on_add_object,
                                            callback_group=MutuallyExclusiveCallbackGroup())
        self._stats_timer = self.create_timer(float(v["stats_period"]), self._report)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.get_logger().info(
            f"inputs {', '.join(self._topics)} (sync {self._sync.backend_name}, slop {v['sync.slop']} s, "
            f"qos {v['qos.reliability']}/{v['qos.depth']}); tf2_ros {'yes' if self._tf else 'no'}, "
            f"vision_msgs {'yes' if vision_msgs else 'no'}"
        )
        self._worker = threading.Thread(target=self._run, name="osop_worker", daemon=True)
        self._log_token = log_bridge.attach(self.get_logger(), self._worker)
        self._worker.start()

    # ------------------------------------------------------------------ parameters
    def _declare(self, spec: ParamSpec, errors: list[str]) -> Any:
        try:
            if not spec.is_typed_array:
                return self.declare_parameter(spec.name, spec.default, spec.descriptor()).value
            # Typed array: declared by type (an override must match it), then given a typed empty value
            # unless an override set one. A NOT_SET value would break `ros2 param dump/get` and rqt.
            loose = spec.descriptor()
            loose.read_only = False  # made read-only below, once it holds a value
            if self.declare_parameter(spec.name, spec.default, loose).type_ == Parameter.Type.NOT_SET:
                self.set_parameters([Parameter(spec.name, spec.default, [])])
            if spec.read_only:
                final = spec.descriptor()
                final.type = spec.default.value
                self.set_descriptor(spec.name, final)
            return list(self.get_parameter(spec.name).value)
        except (InvalidParameterTypeException, InvalidParameterValueException) as exc:
            errors.append(f"{spec.name}: {exc}")
            return None

    def _on_set_parameters(self, params: list[Parameter]) -> SetParametersResult:
        """Live changes: enforce choices and ranges (descriptors only carry them as hints for strings)."""
        current = {n: self._param(n) for n in ("max_image_side", "min_image_side")}
        for p in params:
            spec = spec_for(p.name)
            problem = spec.problem(p.value) if spec is not None else None
            if problem:
                return SetParametersResult(successful=False, reason=problem)
            if p.name in current:
                current[p.name] = p.value
        mx, mn = current["max_image_side"], current["min_image_side"]
        if mx and mn and mx < mn:
            return SetParametersResult(successful=False,
                                       reason=f"max_image_side ({mx}) must be 0 or >= min_image_side ({mn})")
        return SetParametersResult(successful=True)

    def _declare_parameters(self) -> tuple[dict[str, Any], list[ObjectSpec]]:
        errors: list[str] = []
        values = {s.name: self._declare(s, errors) for s in (*NODE_PARAMS, *core_param_specs())}
        specs = []
        for name in values.get("objects.names") or []:
            probe = ObjectSpec(name, "x")
            bad = probe.validate()
            if bad:
                errors.extend(bad)
                continue
            for s in object_param_specs(name):
                values[s.name] = self._declare(s, errors)
            try:
                spec = object_spec_from_values(values, f"objects.{name}.", name)
            except ParameterError as exc:
                errors.append(str(exc))
                continue
            errors.extend(spec.validate())
            specs.append(spec)
        errors.extend(validate_values(values))
        if errors:
            raise ParameterError("invalid osop_node parameters:\n  - " + "\n  - ".join(errors))
        return values, specs

    def _param(self, name: str) -> Any:
        """Current value; None for typed-but-unset parameters (empty arrays)."""
        try:
            return self.get_parameter(name).value
        except ParameterUninitializedException:
            return None

    # ------------------------------------------------------------------ diagnostics helpers
    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] += n

    def _warn(self, key: str, message: str, *, error: bool = False, once: bool = False) -> None:
        """Record + count a warning; log it at most once per ``warn_throttle`` s per kind ``key``
        (suppressed ones are reported on that kind's next message or by the periodic flush);
        ``once``: log the first of this kind only; ``error``: log at ERROR severity."""
        with self._lock:
            self.warnings.append((key, message))
            self.counters[f"warn.{key}"] += 1
        text = self._throttle.offer(key, message, time.monotonic(), error=error, once=once)
        if text is not None:
            self._log_warning(text, error)

    def _log_warning(self, text: str, error: bool) -> None:
        if error:  # separate call sites: rclpy forbids two severities from one line
            self.get_logger().error(text)
        else:
            self.get_logger().warning(text)

    def _add_timing(self, name: str, seconds: float) -> None:
        acc = self._timings.setdefault(name, [0.0, 0])
        acc[0] += seconds
        acc[1] += 1

    # ------------------------------------------------------------------ input side (executor threads)
    def _on_input(self, index: int, msg: Any) -> None:
        now = time.monotonic()
        self._last_input_t[index] = now
        n_synced = self._n_synced
        try:
            stamp = stamp_to_ns(msg.header.stamp)
            self._last_input_stamp[index] = stamp
            status = self._sync.add(index, msg)
        except Exception as exc:  # noqa: BLE001 - a malformed message must not kill the callback
            self._warn("input", f"{self._topics[index]}: message rejected: {exc}")
            return
        if status in (DUPLICATE, OUT_OF_ORDER):
            st = msg.header.stamp
            self._warn("stamps", f"{self._topics[index]}: {status.replace('_', '-')} stamp "
                                 f"{st.sec}.{st.nanosec:09d} dropped")
        elif index == 0:
            if status == RESET:
                self._loss.reset_stream()
            self._loss.add_primary(stamp)
        if index == 0 and self._n_synced == n_synced:
            self._check_stalled(now)

    def _check_stalled(self, now: float) -> None:
        """rgb frames keep arriving but none synchronises: say why (missing camera_info/depth or stamp
        mismatch). A pause of the whole stream is not a stall: only rgb frames that arrived since the
        last synchronised set, for at least ``camera_info_timeout`` s, count (those frames are lost)."""
        if self._unsynced_rgb is None:
            self._unsynced_rgb = (now, 1)
            return
        first, n = self._unsynced_rgb[0], self._unsynced_rgb[1] + 1
        self._unsynced_rgb = (first, n)
        timeout = float(self._param("camera_info_timeout"))
        if now - first < timeout or n < 3:
            return
        lost = f"{n} rgb frames in {now - first:.1f} s not processed"
        info_i = len(self._input_names) - 1
        last_info = self._last_input_t[info_i]
        last_depth = self._last_input_t[1] if self._use_depth else now
        if last_info is None or last_info < first:
            self._warn("camera_info", f"no camera_info on {self._topics[info_i]}: {lost}")
        elif last_depth is None or last_depth < first:
            self._warn("depth", f"no depth image on {self._topics[1]}: {lost} "
                                f"(set use_depth:=false for RGB-only)")
        else:
            stamps = ", ".join(f"{t}={s / 1e9:.3f}" for t, s in zip(self._topics, self._last_input_stamp, strict=True)
                               if s is not None)
            self._warn("sync", f"inputs do not synchronise within sync.slop={self._param('sync.slop')} s: "
                               f"{lost} (latest stamps {stamps})")

    def _on_synced(self, msgs: list[Any]) -> None:  # called under the synchroniser lock
        self._n_synced += 1
        self._unsynced_rgb = None
        self._loss.add_synced()
        frame = _Frame(msgs[0], msgs[1] if self._use_depth else None, msgs[-1], time.monotonic())
        with self._cv:
            if not self.ready.is_set():
                self._count("dropped_not_ready")
                return
            if self._slot is not None:
                self._count("dropped_busy")
            self._slot = frame
            self._cv.notify()

    # ------------------------------------------------------------------ worker thread
    def _shutting_down(self) -> bool:
        """destroy_node() was called or the context is shut down (Ctrl-C): publish nothing more."""
        return self._stop or not self.context.ok()

    def _run(self) -> None:
        try:
            self._startup()
        except Exception as exc:  # noqa: BLE001 - reported, main() exits non-zero
            if self._shutting_down():  # e.g. Ctrl-C during onboarding: not a pipeline failure
                self.get_logger().info(f"startup interrupted by shutdown ({type(exc).__name__}: {exc})")
                self._fail_jobs("node shutting down")
                return
            self.failed = exc
            self.get_logger().fatal(f"pipeline construction failed: {type(exc).__name__}: {exc}")
            self.get_logger().debug(traceback.format_exc())
            self._fail_jobs("pipeline construction failed")
            return
        while True:
            with self._cv:
                while not self._stop and self._slot is None and not self._jobs:
                    self._cv.wait()
                if self._stop:
                    break
                job = self._jobs.popleft() if self._jobs else None
                frame = None
                if job is None:
                    frame, self._slot = self._slot, None
            try:
                if job is not None:
                    self._current_job = job
                    job.result = self._onboard(job.spec)
                    job.done.set()
                    self._current_job = None
                elif frame is not None:
                    self._process(frame)
            except Exception as exc:  # noqa: BLE001 - the worker must survive anything (publish errors, bugs)
                if job is not None:
                    job.result = (False, f"internal error: {type(exc).__name__}: {exc}")
                    job.done.set()
                self._on_worker_error(exc)
        self._fail_jobs("node shutting down")

    def _on_worker_error(self, exc: Exception) -> None:
        """Log (throttled), count and report in diagnostics (ERROR) an exception of the worker loop."""
        if self._shutting_down():
            return  # e.g. publishing while Ctrl-C invalidated the context: expected, not an error
        text = f"{type(exc).__name__}: {exc}"
        with self._lock:
            self.counters["worker_errors"] += 1
            self._last_worker_error = text
        self._warn(f"worker.{error_kind(exc)}", f"worker error (frame skipped, the node keeps running): {text}",
                   error=True)
        self.get_logger().debug(traceback.format_exc())

    def _fail_jobs(self, why: str) -> None:
        with self._cv:
            jobs, self._jobs = list(self._jobs), deque()
        for job in jobs:
            job.result = (False, why)
            job.done.set()

    def _startup(self) -> None:
        t0 = time.perf_counter()
        log = self.get_logger()
        log.info("building pipeline ...")
        self.pipeline = self._factory(core_config(self._values))
        log.info(f"pipeline built in {time.perf_counter() - t0:.1f} s")
        n = len(self._object_specs)
        failed = []
        for i, spec in enumerate(self._object_specs, 1):
            if self._shutting_down():
                raise RuntimeError("shutdown requested during onboarding")
            log.info(f"onboarding {spec.name} ({i}/{n}) from {spec.mesh_path} ...")
            ok, msg = self._onboard(spec)
            if ok:
                log.info(msg)
            else:
                log.error(f"object {spec.name} skipped: {msg}")
                failed.append(spec.name)
        if self._shutting_down():
            raise RuntimeError("shutdown requested during onboarding")
        with self._lock:
            names = sorted(self._visuals)
            self._skipped_objects = [f for f in failed if f not in self._visuals]
        if not names:
            log.warning("no object onboarded: nothing will be published until ~/add_object succeeds")
        extra = f"; skipped: {', '.join(failed)}" if failed else ""
        log.info(f"ready: {len(names)}/{n} objects ({', '.join(names) or '-'}) in "
                 f"{time.perf_counter() - t0:.1f} s, RSS {rss_mib():.0f} MiB{extra}")
        self.ready.set()

    def _onboard(self, spec: ObjectSpec) -> tuple[bool, str]:
        """Onboard one object on the worker thread; never raises."""
        t0 = time.perf_counter()
        path = spec.mesh_path
        if not path.is_file():
            return False, f"mesh file not found: {path} (from {spec.mesh!r})"
        try:
            obj = self.pipeline.add_object(spec.to_core())
            vis = outputs.object_visual(spec.name, 0, path, spec.units, getattr(obj, "model", None),
                                        max_triangles=int(self._param("markers.max_triangles")))
        except OsopError as exc:
            return False, str(exc)
        except Exception as exc:  # noqa: BLE001 - a broken mesh must not stop the node
            self.get_logger().debug(traceback.format_exc())
            return False, f"{type(exc).__name__}: {exc}"
        with self._lock:
            names = sorted({*self._visuals, spec.name})
            vis.index = names.index(spec.name)
            self._visuals[spec.name] = vis
            if spec.name in self._skipped_objects:
                self._skipped_objects.remove(spec.name)
            new = spec.name not in self._pose_pubs
        if new:
            self._pose_pubs[spec.name] = self.create_publisher(PoseStamped, f"~/{spec.name}/pose", 10)
        return True, f"onboarded {spec.name} in {time.perf_counter() - t0:.1f} s"

    def _decode(self, frame: _Frame) -> tuple[Observation, Header]:
        """Messages -> validated Observation (downscaled if needed) + output header. Raises OsopError."""
        rgb = image_to_rgb(frame.rgb, warn=lambda m: self._warn("mono8", m))
        h, w = rgb.shape[:2]
        min_side = int(self._param("min_image_side"))
        if min(h, w) < min_side:
            raise InvalidInputError(f"image {w}x{h} is smaller than min_image_side={min_side}")
        cam = camera_info_to_intrinsics(frame.info, w, h)
        if (cam.width, cam.height) != (w, h):
            raise ConversionError(f"camera_info is for {cam.width}x{cam.height} but the rgb image is {w}x{h}")
        depth = None
        if frame.depth is not None:
            depth = image_to_depth(frame.depth)
            if depth.shape != (h, w):
                raise ConversionError(f"depth image is {depth.shape[1]}x{depth.shape[0]} but rgb is {w}x{h} "
                                      "(depth must be registered to the rgb camera)")
            if not np.any(depth > 0):
                raise InvalidInputError("depth image has no valid pixel (all zero, NaN or negative)")
        dist = distortion_of(frame.info)
        if dist is not None:  # the core is pinhole-only: undistort with new camera matrix = K
            rgb, depth = self._undistort(dist[0], cam.K, dist[1], rgb, depth)
            self._count("undistorted")
        max_side = int(self._param("max_image_side"))
        if max_side and max(h, w) > max_side:
            s = max_side / max(h, w)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            rgb = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
            if depth is not None:
                depth = cv2.resize(depth, (nw, nh), interpolation=cv2.INTER_NEAREST)
            cam = cam.scaled(nw / w, nh / h)
            self._count("downscaled")
        obs = Observation(rgb=rgb, camera=cam, depth=depth)
        obs.validate()
        frame_id = str(self._param("camera_frame")) or frame.rgb.header.frame_id or frame.info.header.frame_id
        if not frame_id:
            self._warn("frame_id", "rgb image and camera_info have an empty frame_id: using 'camera' "
                                   "(set the camera_frame parameter)")
            frame_id = "camera"
        return obs, Header(stamp=frame.rgb.header.stamp, frame_id=frame_id)

    def _process(self, frame: _Frame) -> None:
        stamp = frame.rgb.header.stamp
        tag = f"frame {stamp.sec}.{stamp.nanosec:09d}"
        t0 = time.perf_counter()
        try:
            obs, header = self._decode(frame)
        except UnknownDistortionError as exc:
            self._count("skipped_distortion")
            self._warn(f"distortion.{exc.model}", f"{tag} skipped: {exc}", once=True)
            return
        except OsopError as exc:
            self._count("bad_input")
            self._warn(f"input.{error_kind(exc)}", f"{tag} skipped: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - unexpected decoder failure: still skip the frame
            self._count("bad_input")
            self._warn(f"input.{error_kind(exc)}", f"{tag} skipped: {type(exc).__name__}: {exc}")
            return
        t1 = time.perf_counter()
        try:
            estimates = list(self.pipeline(obs))
        except Exception as exc:  # noqa: BLE001 - pipeline failures skip the frame, the node keeps running
            self._count("pipeline_errors")
            self._warn("pipeline", f"{tag}: pipeline failed: {type(exc).__name__}: {exc}")
            self.get_logger().debug(traceback.format_exc())
            return
        t2 = time.perf_counter()
        if self._shutting_down():  # Ctrl-C while the pipeline ran: abandon the frame, publish nothing
            return
        published = self._publish(header, obs, estimates)
        t3 = time.perf_counter()
        latency = (self.get_clock().now().nanoseconds - stamp_to_ns(stamp)) / 1e9
        with self._lock:
            self.counters["processed"] += 1
            self.counters["poses_published"] += published
            for name, dt in (("decode", t1 - t0), ("pipeline", t2 - t1), ("publish", t3 - t2),
                             ("sync_to_publish", time.monotonic() - frame.t_sync)):
                self._add_timing(name, dt)
            for est in estimates:
                for k, dt in (est.timings or {}).items():
                    self._add_timing(f"stage.{k}", float(dt))
            self._latencies.append(latency)

    def _valid_estimates(self, estimates: list[PoseEstimate]) -> list[PoseEstimate]:
        thr = float(self._param("pipeline.score_threshold"))
        good = []
        for est in estimates:
            T = np.asarray(est.T_cam_obj, dtype=np.float64)
            if T.shape != (4, 4) or not np.isfinite(T).all() or not np.isfinite(est.score):
                self._count("invalid_estimates")
                self._warn("pipeline", f"{est.object_name}: non-finite pose/score discarded")
                continue
            if abs(np.linalg.det(T[:3, :3]) - 1.0) > 0.05:
                self._count("invalid_estimates")
                self._warn("pipeline", f"{est.object_name}: pose rotation is not a rotation (det "
                                       f"{np.linalg.det(T[:3, :3]):.3f}), discarded")
                continue
            if est.score < thr:
                self._count("below_threshold")
                continue
            good.append(est)
        return good

    def _publish(self, header: Header, obs: Observation, estimates: list[PoseEstimate]) -> int:
        """Publish the results of one frame (nothing once shutting down); returns the poses published."""
        with self._pub_lock:
            if self._shutting_down():
                return 0
            return self._publish_locked(header, obs, estimates)

    def _publish_locked(self, header: Header, obs: Observation, estimates: list[PoseEstimate]) -> int:
        good = self._valid_estimates(estimates)
        with self._lock:
            visuals = dict(self._visuals)
            pubs = dict(self._pose_pubs)
        best: dict[str, PoseEstimate] = {}
        for est in good:
            if est.object_name not in best or est.score > best[est.object_name].score:
                best[est.object_name] = est
        n = 0
        for name, est in best.items():
            pub = pubs.get(name)
            if pub is None:
                self._warn("pipeline", f"estimate for unknown object {name!r} ignored")
                continue
            pub.publish(PoseStamped(header=header, pose=pose_to_msg(est.T_cam_obj)))
            n += 1
        if self._param("publish.markers") and self._markers_pub.get_subscription_count() > 0:
            self._markers_pub.publish(outputs.marker_array(header, good, visuals, str(self._param("markers.mode"))))
        if self._tf is not None and self._param("publish.tf") and good:
            self._tf.sendTransform(outputs.transforms(header, good, str(self._param("tf_prefix"))))
        if self._det_pub is not None and self._param("publish.detections") \
                and self._det_pub.get_subscription_count() > 0:
            self._det_pub.publish(outputs.detection_array(vision_msgs, header, good, visuals))
        if self._param("publish.overlay") and self._overlay_pub.get_subscription_count() > 0:
            img = outputs.overlay_image(obs.rgb, obs.camera.K, good, visuals)
            self._overlay_pub.publish(rgb_to_image(img, header.stamp, header.frame_id))
        return n

    # ------------------------------------------------------------------ onboarding service
    def _on_add_object(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        try:
            return self._add_object(response)
        except Exception as exc:  # noqa: BLE001 - a service callback must answer, never raise
            self.get_logger().error(f"~/add_object failed: {type(exc).__name__}: {exc}")
            response.success, response.message = False, f"internal error: {type(exc).__name__}: {exc}"
            return response

    def _add_object(self, response: Trigger.Response) -> Trigger.Response:
        values = {s.name: self._param(s.name) for s in NODE_PARAMS if s.name.startswith("onboard.")}
        name = str(values["onboard.name"])
        try:
            spec = object_spec_from_values(values, "onboard.", name)
        except ParameterError as exc:
            response.success, response.message = False, str(exc)
            return response
        errors = spec.validate()
        if not errors and not spec.mesh_path.is_file():
            errors.append(f"mesh file not found: {spec.mesh_path}")
        if self.failed is not None:
            errors.append(f"pipeline is not available ({self.failed})")
        if errors:
            response.success, response.message = False, "; ".join(errors)
            self.get_logger().warning(f"~/add_object rejected: {response.message}")
            return response
        job = _Job(spec)
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()
        self.get_logger().info(f"~/add_object: onboarding {spec.name} from {spec.mesh_path} ...")
        timeout = float(values["onboard.timeout"])
        if not job.done.wait(timeout):
            response.success = False
            response.message = f"onboarding {spec.name} still running after {timeout:.0f} s (continues)"
        else:
            response.success, response.message = job.result
        if response.success:  # separate call sites: rclpy forbids two severities from one line
            self.get_logger().info(f"~/add_object {spec.name}: {response.message}")
        else:
            self.get_logger().error(f"~/add_object {spec.name}: {response.message}")
        return response

    # ------------------------------------------------------------------ periodic report
    def _report(self) -> None:
        now = time.monotonic()
        period = max(now - self._period_start, 1e-9)
        self._period_start = now
        sync = self._sync.stats
        with self._lock:
            timings, self._timings = self._timings, {}
            lat, self._latencies = self._latencies, []
            c = Counter(self.counters)
            c.update({"sync.duplicates": sync.duplicates, "sync.out_of_order": sync.out_of_order,
                      "sync.unmatched": sync.unmatched, "sync.synced": sync.synced})
            for topic, k in zip(self._topics, sync.received, strict=True):
                c[f"in.{topic}"] = k
            d = c - self._prev_counters  # per-period increments (Counter subtraction drops <= 0)
            self._prev_counters = c
        for text, error in self._throttle.flush(now):  # the last burst of every kind gets reported
            self._log_warning(text, error)
        self._check_losses()
        if not any(v for k, v in d.items() if k.startswith("in.")):
            if self.ready.is_set():
                self.get_logger().info(f"waiting for images on {self._topics[0]}", throttle_duration_sec=60.0)
        else:
            ins = "/".join(str(d[f"in.{t}"]) for t in self._topics)
            tim = ", ".join(f"{k.removeprefix('stage.')} {1e3 * s / max(n, 1):.1f}" for k, (s, n) in timings.items())
            lat_s = f" | stamp->publish {1e3 * np.mean(lat):.0f} ms (max {1e3 * np.max(lat):.0f})" if lat else ""
            self.get_logger().info(
                f"{period:.1f} s: in {ins}, synced {d['sync.synced']}, processed {d['processed']} "
                f"({d['processed'] / period:.1f} Hz), poses {d['poses_published']}, dropped busy "
                f"{d['dropped_busy']} not-ready {d['dropped_not_ready']}, stamps dup {d['sync.duplicates']} "
                f"ooo {d['sync.out_of_order']} unmatched {d['sync.unmatched']}, bad {d['bad_input']}, "
                f"errors {d['pipeline_errors']} | ms: {tim or '-'}{lat_s}")
        if self._param("publish.diagnostics") and not self._shutting_down():
            self._publish_diagnostics(c, d, period, lat)

    def _check_losses(self) -> None:
        """Warn (throttled) when many camera frames never reach the pipeline (lossy transport)."""
        rep = self._loss.take()
        if rep is None:
            return
        self._count("loss_warnings")
        hz = f" at ~{1.0 / rep.period_s:.1f} Hz" if rep.period_s else ""
        text = (f"{rep.rate:.0%} of the camera frames are lost before processing: {rep.gaps} missing from "
                f"the rgb stamp sequence{hz}, {rep.unpaired} of {rep.received} received rgb frames without "
                "their depth/camera_info partner")
        if self._values["qos.reliability"] == "best_effort":
            text += (". Best-effort DDS often drops large images: run with qos.reliability:=reliable "
                     "(the camera driver must publish reliable)")
        self._warn("qos", text)

    def _publish_diagnostics(self, total: Counter[str], d: Counter[str], period: float, lat: list[float]) -> None:
        fqn = self.get_fully_qualified_name()
        st = DiagnosticStatus(name=f"{fqn}: pose estimation", hardware_id=fqn)
        with self._lock:
            n_objects, skipped, worker_error = len(self._visuals), list(self._skipped_objects), self._last_worker_error
        if self.failed is not None:
            st.level, st.message = DiagnosticStatus.ERROR, f"pipeline failed: {self.failed}"
        elif d["worker_errors"]:
            st.level, st.message = DiagnosticStatus.ERROR, f"{d['worker_errors']} worker errors, last: {worker_error}"
        elif not self.ready.is_set():
            st.level, st.message = DiagnosticStatus.WARN, "starting (onboarding objects)"
        elif n_objects == 0:
            st.level, st.message = DiagnosticStatus.WARN, (
                "no object onboarded" + (f" (failed: {', '.join(skipped)})" if skipped else "")
                + ": nothing is published until ~/add_object succeeds")
        elif skipped:
            st.level, st.message = DiagnosticStatus.WARN, f"objects not onboarded: {', '.join(skipped)}"
        elif d["bad_input"] or d["pipeline_errors"]:
            st.level, st.message = DiagnosticStatus.WARN, f"{d['bad_input']} bad frames, {d['pipeline_errors']} errors"
        else:
            st.level, st.message = DiagnosticStatus.OK, f"{d['processed'] / period:.1f} Hz"
        vals = {"rate_hz": f"{d['processed'] / period:.2f}",
                "latency_ms": f"{1e3 * np.mean(lat):.1f}" if lat else "",
                "objects": str(n_objects),
                **{k: str(v) for k, v in sorted(total.items())}}
        st.values = [KeyValue(key=k, value=v) for k, v in vals.items()]
        arr = DiagnosticArray(status=[st])
        arr.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(arr)

    # ------------------------------------------------------------------ lifecycle
    @property
    def object_names(self) -> list[str]:
        with self._lock:
            return sorted(self._visuals)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until startup finished (True) or failed/timed out (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.failed is not None or (deadline is not None and time.monotonic() > deadline):
                return False
        return True

    def destroy_node(self, worker_timeout: float = 1.0) -> None:
        """Stop the worker and destroy the node. An in-flight frame or onboarding is abandoned: the worker
        publishes nothing more, waiting service calls are answered, and the worker (a daemon thread,
        possibly inside the pipeline) is joined for at most ``worker_timeout`` s."""
        cv = getattr(self, "_cv", None)
        if cv is not None:
            with cv:
                self._stop = True
                cv.notify_all()
            job = self._current_job
            if job is not None and not job.done.is_set():
                job.result = (False, "node shutting down")
                job.done.set()
            self._fail_jobs("node shutting down")
        pub_lock = getattr(self, "_pub_lock", None)
        if pub_lock is not None:
            with pub_lock:  # a publication in progress finishes; none starts after this
                pass
        worker = getattr(self, "_worker", None)
        if worker is not None and worker.is_alive() and worker is not threading.current_thread():
            worker.join(timeout=worker_timeout)
        token = getattr(self, "_log_token", None)
        if token is not None:
            log_bridge.detach(token)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Console script ``osop_node``: run until Ctrl-C (SIGINT/SIGTERM: exit 0 within ~1 s, an in-flight
    frame is abandoned); exit 2 on bad parameters, 1 if startup fails."""
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] [%(name)s]: %(message)s")
    rclpy.init(args=args)
    node = None
    executor = None
    try:
        node = OsopNode()
        executor = MultiThreadedExecutor(num_threads=3)
        executor.add_node(node)
        while rclpy.ok() and node.failed is None:
            executor.spin_once(timeout_sec=0.2)
    except ParameterError as exc:
        rclpy.logging.get_logger("osop_node").fatal(str(exc))
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        try:
            if node is not None:
                node.destroy_node()
            if executor is not None:
                executor.shutdown(timeout_sec=1.0)
        except KeyboardInterrupt:  # a second Ctrl-C while shutting down: just go
            pass
        rclpy.try_shutdown()
    return 1 if node is not None and node.failed is not None else 0


if __name__ == "__main__":
    raise SystemExit(main())
