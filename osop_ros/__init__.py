"""osop_ros: one-shot 6D pose estimation of unseen objects from their CAD model (OSOP, CVPR 2022)."""

__version__ = "0.1.0"
