"""Launch ``osop_node`` (+ optionally rviz2) for one RGB-D camera.

    ros2 launch osop_ros osop.launch.py \
        rgb_topic:=/camera/color/image_raw \
        depth_topic:=/camera/aligned_depth_to_color/image_raw \
        camera_info_topic:=/camera/color/camera_info device:=cuda qos_reliability:=reliable rviz:=true

Arguments: ``config_file`` (default: the package's config/osop.yaml), ``device`` ("" = keep the
config file's value), ``namespace``, ``rgb_topic``, ``depth_topic``, ``camera_info_topic``,
``use_depth`` ("" = keep the config value), ``qos_reliability`` (best_effort | reliable, "" = keep
the config value), ``rviz`` (true/false), ``fixed_frame`` (rviz fixed frame), ``log_level``.

``rviz:=true`` without rviz2 installed logs a message and starts osop_node alone (a missing rviz2
executable would otherwise abort the whole launch and orphan osop_node).

The launch modules are imported inside the functions, so :func:`find_rviz2` can be used (and tested)
where ``launch``/``launch_ros`` are not installed.
"""

from __future__ import annotations

import os
import shutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launch.launch_context import LaunchContext
    from launch.launch_description import LaunchDescription

PACKAGE = "osop_ros"
RVIZ_MISSING = ("rviz:=true but rviz2 is not installed (neither in the ament index nor on PATH): starting "
                "osop_node without rviz (install ros-$ROS_DISTRO-rviz2, or use rviz:=false)")


def find_rviz2() -> tuple[str | None, str | None]:
    """How to start rviz2: ``("rviz2", "rviz2")`` (package + executable) when it is in the ament index,
    ``(None, "/path/to/rviz2")`` when it is only on PATH, ``(None, None)`` when it is not installed."""
    try:
        from ament_index_python.packages import get_package_prefix

        exe = os.path.join(get_package_prefix("rviz2"), "lib", "rviz2", "rviz2")
        if os.access(exe, os.X_OK):
            return "rviz2", "rviz2"
    except (ImportError, LookupError, ValueError, OSError):  # not a ROS install / no rviz2 package
        pass
    path = shutil.which("rviz2")
    return (None, path) if path else (None, None)


def _is_true(value: str) -> bool:
    return value.lower() in ("true", "1", "yes")


def _nodes(context: LaunchContext) -> list[Any]:
    """osop_node with only the overrides actually given (the YAML stays authoritative), and rviz2."""
    from ament_index_python.packages import get_package_share_directory
    from launch.actions import LogInfo
    from launch.substitutions import LaunchConfiguration
    from launch_ros.actions import Node

    def arg(name: str) -> str:
        return LaunchConfiguration(name).perform(context)

    share = get_package_share_directory(PACKAGE)
    overrides: dict[str, object] = {}
    if arg("device"):
        overrides["device"] = arg("device")
    if arg("use_depth"):
        overrides["use_depth"] = _is_true(arg("use_depth"))
    if arg("qos_reliability"):
        overrides["qos.reliability"] = arg("qos_reliability")
    params: list[object] = [arg("config_file")]
    if overrides:
        params.append(overrides)
    ns = arg("namespace").strip("/")
    node_path = f"/{ns}/osop_node" if ns else "/osop_node"
    rgb_topic = arg("rgb_topic")
    actions: list[Any] = [
        Node(
            package=PACKAGE,
            executable="osop_node",
            name="osop_node",
            namespace=ns,
            output="screen",
            emulate_tty=True,
            parameters=params,
            remappings=[
                ("rgb/image_raw", rgb_topic),
                ("depth/image_raw", arg("depth_topic")),
                ("rgb/camera_info", arg("camera_info_topic")),
            ],
            arguments=["--ros-args", "--log-level", arg("log_level")],
        )
    ]
    if _is_true(arg("rviz")):
        package, executable = find_rviz2()
        if executable is None:
            actions.append(LogInfo(msg=RVIZ_MISSING))
        else:
            # config/osop.rviz uses fixed topic names; remap them to this camera / namespace
            actions.append(
                Node(
                    package=package,
                    executable=executable,
                    name="osop_rviz",
                    arguments=["-d", os.path.join(share, "config", "osop.rviz"), "-f", arg("fixed_frame")],
                    remappings=[
                        ("/osop/camera_image", rgb_topic),
                        ("/osop_node/overlay", f"{node_path}/overlay"),
                        ("/osop_node/markers", f"{node_path}/markers"),
                    ],
                    output="screen",
                )
            )
    return actions


def generate_launch_description() -> LaunchDescription:
    from ament_index_python.packages import get_package_share_directory
    from launch.actions import DeclareLaunchArgument, OpaqueFunction
    from launch.launch_description import LaunchDescription

    share = get_package_share_directory(PACKAGE)
    args = [
        DeclareLaunchArgument("config_file", default_value=os.path.join(share, "config", "osop.yaml"),
                              description="osop_node parameter file"),
        DeclareLaunchArgument("device", default_value="", description="auto | cpu | cuda | cuda:N ('' = config)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of osop_node"),
        DeclareLaunchArgument("rgb_topic", default_value="/camera/color/image_raw"),
        DeclareLaunchArgument("depth_topic", default_value="/camera/aligned_depth_to_color/image_raw",
                              description="depth registered to the rgb camera (16UC1 mm or 32FC1 m)"),
        DeclareLaunchArgument("camera_info_topic", default_value="/camera/color/camera_info"),
        DeclareLaunchArgument("use_depth", default_value="", description="true | false ('' = config)"),
        DeclareLaunchArgument("qos_reliability", default_value="",
                              description="input QoS: best_effort | reliable ('' = config); reliable needs a "
                                          "reliable camera publisher"),
        DeclareLaunchArgument("rviz", default_value="false",
                              description="start rviz2 with config/osop.rviz (skipped with a message if missing)"),
        DeclareLaunchArgument("fixed_frame", default_value="camera_color_optical_frame",
                              description="rviz fixed frame (the camera optical frame)"),
        DeclareLaunchArgument("log_level", default_value="info"),
    ]
    return LaunchDescription([*args, OpaqueFunction(function=_nodes)])
