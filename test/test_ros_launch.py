"""launch_testing: start ``osop_node`` as its own process with config/osop.yaml and the test-double
pipeline, stream synthetic frames, expect a pose, then check a clean shutdown.

Needs ``launch`` / ``launch_ros`` / ``launch_testing`` (a ROS 2 distro); with the PyPI ROS wheels the
whole module is skipped. ``test_ros_node.py::test_main_as_subprocess`` covers the same path there.
"""

from __future__ import annotations

import os
import sys
import time
import unittest
from pathlib import Path

import pytest

pytest.importorskip(
    "launch_testing", reason="launch_testing is not importable (PyPI ROS wheels); it runs on a ROS 2 distro"
)

import launch_testing  # noqa: E402
import launch_testing.actions  # noqa: E402
import launch_testing.asserts  # noqa: E402
import ros_fixtures as F  # noqa: E402
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
