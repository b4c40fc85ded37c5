"""End to end over real DDS: osop_node with the real pipeline and the shipped weights on a rendered scene.

Slow (loads the networks, builds the example object's template bank) and dependent on the shipped
weights, so it is marked ``slow`` and skipped when a weights file is missing; run it with
``make test-slow``. Tolerances are the demo's grasp-relevant ones (stated below).
"""

from __future__ import annotations

import numpy as np
import pytest
import ros_fixtures as F

from osop_ros.core.geometry import rotation_error_sym_deg

pytestmark = [pytest.mark.slow, pytest.mark.ros, pytest.mark.gl]

ROT_TOL_DEG = 10.0
TRANS_TOL_M = 0.02


def _example_node(session, namespace: str, tmp_path, **params):  # noqa: ANN001, ANN003, ANN202
    """osop_node with the real pipeline and the example object over reliable DDS (``params``: more ROS
    parameters, dots as ``__``), added to ``session``."""
    from rclpy.parameter import Parameter

    from osop_ros.ros.node import OsopNode

    base = {"objects.names": ["example_object"],
            "objects.example_object.mesh": "package://osop_ros/assets/example_object.ply",
            "objects.example_object.units": "m", "qos.reliability": "reliable", "templates.cache_dir": str(tmp_path)}
    base.update({k.replace("__", "."): v for k, v in params.items()})
    overrides = [Parameter(k, value=v) for k, v in base.items()]
    return session.add(OsopNode(namespace=namespace, context=session.context, parameter_overrides=overrides))


def _shipped_scene():  # noqa: ANN202 - DemoScene
    """The demo scene (seed 3) the node tests run on; skips the test when the shipped weights are absent."""
    from osop_ros.core.config import load_config
    from osop_ros.demo import make_demo_scene

    cfg = load_config(None)
    if not all(cfg.weights_available(s) for s in ("segment", "match", "correspond")):
        pytest.skip("shipped weights not present")
    return make_demo_scene(seed=3)


def test_node_publishes_pose_near_ground_truth(tmp_path) -> None:
    from osop_ros.ros.conversions import array_to_image, intrinsics_to_camera_info, msg_to_T, ns_to_stamp

    scene = _shipped_scene()
    cam = scene.obs.camera
    with F.ros_session(salt=77) as session:
        node = _example_node(session, "/real", tmp_path, pipeline__score_threshold=0.3)
        assert node.wait_ready(timeout=600.0), "node did not become ready"
        stub = F.CameraStub(session, "/real")
        stub.watch_pose("example_object")
        depth_mm = np.round(scene.obs.depth * 1000.0).astype(np.uint16)

        def frame(st: int):
            stamp = ns_to_stamp(st)
            return (array_to_image(scene.obs.rgb, "rgb8", stamp, "cam_optical"),
                    array_to_image(depth_mm, "16UC1", stamp, "cam_optical"),
                    intrinsics_to_camera_info(cam, stamp, "cam_optical"))

        stamps = stub.stream(frame, lambda: bool(stub.pose_stamps("example_object")), timeout=120.0, period=2.0)
        msg = stub.pose_for("example_object", stamps)
        assert msg.header.frame_id == "cam_optical"
        T = msg_to_T(msg.pose)
        rot = rotation_error_sym_deg(T[:3, :3], scene.T_cam_obj[:3, :3])
        trans = float(np.linalg.norm(T[:3, 3] - scene.T_cam_obj[:3, 3]))
        print(f"\nreal pipeline over DDS: rotation error {rot:.2f} deg, translation error {trans * 1000:.1f} mm")
        assert rot < ROT_TOL_DEG and trans < TRANS_TOL_M


def test_node_latency_5hz_rgbd(tmp_path) -> None:
    """Throughput and stamp-to-pose latency of osop_node with the REAL pipeline (example object, RGB-D
    640x480, ICP on) for ~30 s of 5 Hz input over reliable DDS. Prints the numbers (docs/results.md,
    "ROS node latency"); asserts only that poses keep coming."""
    import os
    import time

    import torch

    from osop_ros.ros.conversions import array_to_image, intrinsics_to_camera_info, ns_to_stamp

    scene = _shipped_scene()
    cam = scene.obs.camera
    depth_mm = np.round(scene.obs.depth * 1000.0).astype(np.uint16)
    seconds, hz = 30.0, 5.0
    with F.ros_session(salt=78) as session:
        t0 = time.monotonic()
        node = _example_node(session, "/lat", tmp_path)
        assert node.wait_ready(timeout=900.0), "node did not become ready"
        ready_s = time.monotonic() - t0
        stub = F.CameraStub(session, "/lat")
        stub.watch_pose("example_object")

        def frame(st: int):
            stamp = ns_to_stamp(st)
            return (array_to_image(scene.obs.rgb, "rgb8", stamp, "cam_optical"),
                    array_to_image(depth_mm, "16UC1", stamp, "cam_optical"),
                    intrinsics_to_camera_info(cam, stamp, "cam_optical"))

        stub.stream(frame, lambda: bool(stub.pose_stamps("example_object")), timeout=180.0, period=2.0)  # warm-up
        time.sleep(3.0)
        c0 = dict(node.counters)
        sent: list[int] = []
        next_t = time.monotonic()
        t_end = next_t + seconds
        while time.monotonic() < t_end:
            st = time.time_ns()
            sent.append(st)
            stub.publish(*frame(st))
            next_t += 1.0 / hz
            time.sleep(max(0.0, next_t - time.monotonic()))
        time.sleep(4.0)  # the last in-flight frame
        c1 = dict(node.counters)
        with stub.lock:
            lat = [stub.pose_recv_wall[s] - s / 1e9 for s in sent if s in stub.pose_recv_wall]
        d = {k: c1.get(k, 0) - c0.get(k, 0) for k in ("processed", "dropped_busy", "bad_input", "pipeline_errors")}
        p50, p95 = (float(np.percentile(lat, q)) for q in (50, 95)) if lat else (float("nan"),) * 2
        print(f"\nosop_node real pipeline, RGB-D 640x480, 1 object, {hz:.0f} Hz input for {seconds:.0f} s over "
              f"reliable DDS ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, ready in "
              f"{ready_s:.1f} s incl. cold template bank): sent {len(sent)}, poses {len(lat)} "
              f"({len(lat) / seconds:.2f} fps), processed {d['processed']}, dropped busy {d['dropped_busy']}, "
              f"bad {d['bad_input']}, errors {d['pipeline_errors']}; stamp->pose p50 {1e3 * p50:.0f} ms, "
              f"p95 {1e3 * p95:.0f} ms, max {1e3 * max(lat, default=float('nan')):.0f} ms")
        assert len(lat) >= 3 and d["pipeline_errors"] == 0


def test_node_rgb_only_takes_proposals_and_publishes_no_guess(tmp_path) -> None:
    """RGB-only camera (``use_depth: false``): the node builds the MobileSAM proposals on the first frame
    (``pipeline.segmenter_rgb``), publishes nothing at the default threshold (the RGB score is a constant,
    docs/results.md session 19) and, with the threshold at 0, the unpublishable estimate. Its error is
    printed, not asserted: on this scene the proposals' pose is far off (stage 2 on their mask, results.md)."""
    from rclpy.parameter import Parameter

    from osop_ros.core.factory import LazySegmenter
    from osop_ros.core.proposals import ProposalSegmenter
    from osop_ros.ros.conversions import array_to_image, intrinsics_to_camera_info, msg_to_T, ns_to_stamp

    scene = _shipped_scene()
    cam = scene.obs.camera
    with F.ros_session(salt=79) as session:
        node = _example_node(session, "/rgb", tmp_path, use_depth=False)
        assert node.wait_ready(timeout=600.0), "node did not become ready"
        rgb_seg = node.pipeline.pipeline.rgb_segmenter
        assert isinstance(rgb_seg, LazySegmenter) and rgb_seg.segmenter is None  # nothing loaded before a frame
        stub = F.CameraStub(session, "/rgb")
        stub.watch_pose("example_object")

        def frame(st: int):
            stamp = ns_to_stamp(st)
            return (array_to_image(scene.obs.rgb, "rgb8", stamp, "cam_optical"), None,
                    intrinsics_to_camera_info(cam, stamp, "cam_optical"))

        sent = stub.stream(frame, lambda: node.counters["processed"] >= 2, timeout=180.0, period=2.0)
        assert isinstance(rgb_seg.segmenter, ProposalSegmenter)
        assert not stub.pose_stamps("example_object") and node.counters["pipeline_errors"] == 0
        node.set_parameters([Parameter("pipeline.score_threshold", value=0.0)])
        sent += stub.stream(frame, lambda: bool(stub.pose_stamps("example_object")), timeout=120.0, period=2.0)
        T = msg_to_T(stub.pose_for("example_object", sent).pose)  # a frame in flight may be the first published
        rot = rotation_error_sym_deg(T[:3, :3], scene.T_cam_obj[:3, :3])
        lateral = float(np.linalg.norm(T[:2, 3] - scene.T_cam_obj[:2, 3]))
        depth = abs(float(T[2, 3] - scene.T_cam_obj[2, 3]))
        print(f"\nRGB-only node: rotation {rot:.2f} deg, lateral {lateral * 1e3:.1f} mm, depth {depth * 1e3:.1f} mm")
        assert np.isfinite(T).all() and node.counters["pipeline_errors"] == 0
