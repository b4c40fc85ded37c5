"""Thin ROS 2 adapter over :mod:`osop_ros.core` (the only place that imports rclpy)."""
