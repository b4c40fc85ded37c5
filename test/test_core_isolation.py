"""The algorithm core never imports ROS; the CLI parser stays light (no torch at `osop --help`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_ROS = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = ("rclpy", "cv_bridge", "sensor_msgs", "geometry_msgs", "std_msgs", "std_srvs",
               "visualization_msgs", "diagnostic_msgs", "message_filters", "tf2_ros", "vision_msgs",
               "launch", "launch_ros", "builtin_interfaces")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"ROS module {name} imported by the core")
            return None

    sys.meta_path.insert(0, Block())
    import osop_ros
    n = 0
    for pkg in ("core", "data", "eval", "nets", "train", "commands"):
        mod = importlib.import_module(f"osop_ros.{pkg}")
        for info in pkgutil.iter_modules(mod.__path__):
            importlib.import_module(f"osop_ros.{pkg}.{info.name}")
            n += 1
    import osop_ros.cli, osop_ros.demo
    print("imported", n)
    """
)


def test_core_imports_with_ros_blocked() -> None:
    res = subprocess.run([sys.executable, "-c", BLOCK_ROS], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) >= 30


def test_cli_parser_does_not_import_torch() -> None:
    code = "import sys, osop_ros.cli as c; c.build_parser(); print('torch' in sys.modules, 'open3d' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "False"]
