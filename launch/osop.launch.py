"""Launch ``osop_node`` (+ optionally rviz2) for one RGB-D camera.

    ros2 launch osop_ros osop.launch.py \
        rgb_topic:=/camera/color/image_raw \
        depth_topic:=/camera/aligned_depth_to_color/image_raw \
        camera_info_topic:=/camera/color/camera_info device:=cuda rviz:=true

Arguments: ``config_file`` (default: the package's config/osop.yaml), ``device`` ("" = keep the
config file's value), ``namespace``, ``rgb_topic``, ``depth_topic``, ``camera_info_topic``,
``use_depth`` ("" = keep the config value), ``rviz`` (true/false), ``fixed_frame`` (rviz fixed frame),
``log_level``.
"""

from __future__ import annotations

import os

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.launch_context import LaunchContext
from launch.launch_description import LaunchDescription
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "osop_ros"


def _nodes(context: LaunchContext) -> list[Node]:
    """osop_node with only the overrides actually given (the YAML stays authoritative), and rviz2."""
    share = get_package_share_directory(PACKAGE)
    overrides: dict[str, object] = {}
    device = LaunchConfiguration("device").perform(context)
    if device:
        overrides["device"] = device
    use_depth = LaunchConfiguration("use_depth").perform(context).lower()
    if use_depth:
        overrides["use_depth"] = use_depth in ("true", "1", "yes")
    params: list[object] = [LaunchConfiguration("config_file").perform(context)]
    if overrides:
        params.append(overrides)
    ns = LaunchConfiguration("namespace").perform(context).strip("/")
    node_path = f"/{ns}/osop_node" if ns else "/osop_node"
    rgb_topic = LaunchConfiguration("rgb_topic").perform(context)
    nodes = [
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
                ("depth/image_raw", LaunchConfiguration("depth_topic").perform(context)),
                ("rgb/camera_info", LaunchConfiguration("camera_info_topic").perform(context)),
            ],
            arguments=["--ros-args", "--log-level", LaunchConfiguration("log_level").perform(context)],
        )
    ]
    if LaunchConfiguration("rviz").perform(context).lower() in ("true", "1", "yes"):
        # config/osop.rviz uses fixed topic names; remap them to this camera / namespace
        nodes.append(
            Node(
                package="rviz2",
                executable="rviz2",
                name="osop_rviz",
                arguments=["-d", os.path.join(share, "config", "osop.rviz"),
                           "-f", LaunchConfiguration("fixed_frame").perform(context)],
                remappings=[
                    ("/osop/camera_image", rgb_topic),
                    ("/osop_node/overlay", f"{node_path}/overlay"),
                    ("/osop_node/markers", f"{node_path}/markers"),
                ],
                output="screen",
            )
        )
    return nodes


def generate_launch_description() -> LaunchDescription:
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
        DeclareLaunchArgument("rviz", default_value="false", description="start rviz2 with config/osop.rviz"),
        DeclareLaunchArgument("fixed_frame", default_value="camera_color_optical_frame",
                              description="rviz fixed frame (the camera optical frame)"),
        DeclareLaunchArgument("log_level", default_value="info"),
    ]
    return LaunchDescription([*args, OpaqueFunction(function=_nodes)])
