"""launch_testing: start ``osop_node`` as its own process with config/osop.yaml and the test-double
pipeline, stream synthetic frames, expect a pose, then check a clean shutdown.

Needs ``launch`` / ``launch_ros`` / ``launch_testing`` (a ROS 2 distro); with the PyPI ROS wheels the
whole module is skipped. ``test_ros_node.py::test_main_as_subprocess`` covers the same path there.
Runs both ways: ``pytest test/test_ros_launch.py`` and ``launch_test test/test_ros_launch.py`` (which
does not put test/ on sys.path: ``ros_fixtures`` is then loaded from this file's directory).
"""

from __future__ import annotations

import os
import sys
import time
import unittest
from pathlib import Path

import pytest


def _import_fixtures() -> object:
    """``ros_fixtures`` from this directory: pytest puts test/ on sys.path, ``launch_test`` does not."""
    try:
        import ros_fixtures
    except ModuleNotFoundError:
        import importlib.util

        spec = importlib.util.spec_from_file_location("ros_fixtures", Path(__file__).with_name("ros_fixtures.py"))
        ros_fixtures = importlib.util.module_from_spec(spec)
        sys.modules["ros_fixtures"] = ros_fixtures  # dataclasses need the module registered
        spec.loader.exec_module(ros_fixtures)
    return ros_fixtures


F = _import_fixtures()

pytest.importorskip(
    "launch_testing", reason="launch_testing is not importable (PyPI ROS wheels); it runs on a ROS 2 distro"
)

import launch_testing  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
from launch.actions import ExecuteProcess  # noqa: E402
from launch.launch_description import LaunchDescription  # noqa: E402

TEST_DIR = Path(__file__).resolve().parent
CONFIG = TEST_DIR.parent / "config" / "osop.yaml"
NS = "/launch_t"
SALT = 3


@pytest.mark.launch_test
def generate_test_description() -> tuple[LaunchDescription, dict]:
    env = {  # same isolated domain as the test's ros_session(salt=SALT)
        "PYTHONPATH": os.pathsep.join([str(TEST_DIR), os.environ.get("PYTHONPATH", "")]),
        "ROS_DOMAIN_ID": str(F.domain_id_for(SALT)),
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
    }
    node = ExecuteProcess(
        cmd=[sys.executable, "-m", "osop_ros.ros.node", "--ros-args", "--params-file", str(CONFIG),
             "-p", "pipeline_factory:=ros_fixtures:blob_factory", "-p", "qos.reliability:=reliable",
             "-r", f"__ns:={NS}"],
        additional_env=env,
        output="screen",
    )
    return LaunchDescription([node, launch_testing.actions.ReadyToTest()]), {"osop": node}


class TestPoseOverDds(unittest.TestCase):
    def test_pose_published(self, proc_output: object) -> None:
        with F.ros_session(salt=SALT) as session:
            cam = F.CameraStub(session, NS)
            cam.watch_pose("example_object")
            sent: list[int] = []
            cam.stream(lambda st: (sent.append(st), F.make_frame(st))[1],
                       lambda: bool(set(sent) & set(cam.pose_stamps("example_object"))), timeout=30.0)
            pose = cam.pose_for("example_object", sent)
            self.assertEqual(pose.header.frame_id, "cam_optical")
            self.assertAlmostEqual(pose.pose.position.z, 0.8, places=5)
        time.sleep(0.1)


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):
    def test_exit_code(self, proc_info: object) -> None:
        launch_testing.asserts.assertExitCodes(proc_info, allowable_exit_codes=[0, -2, -15])
