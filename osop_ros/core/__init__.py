"""ROS-free algorithm core: geometry, rendering, templates, the four OSOP stages and the pipeline.

Nothing under this package may import rclpy, cv_bridge or ROS message packages.
"""
