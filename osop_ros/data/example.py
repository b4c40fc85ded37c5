"""The embedded example object: a procedurally built, asymmetric, vertex-coloured toy (never trained on).

``osop_ros/assets/example_object.ply`` is produced by :func:`write_example_object`; the demo, the
default ROS config and the node tests use it. It is built from primitives that appear nowhere in
the training meshes (pybullet_data), so it is an unseen object for the shipped networks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

EXAMPLE_PATH = Path(__file__).resolve().parents[1] / "assets" / "example_object.ply"


def _coloured(
    mesh: trimesh.Trimesh, base: tuple[int, int, int], stripe: tuple[int, int, int], axis: int, period: float
) -> trimesh.Trimesh:
    mesh = mesh.subdivide_to_size(max_edge=0.006)
    v = mesh.vertices
    s = (np.floor(v[:, axis] / period) % 2).astype(bool)
    col = np.where(s[:, None], np.array(stripe), np.array(base)).astype(np.uint8)
    mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=np.c_[col, np.full(len(col), 255, np.uint8)])
    return mesh


def make_example_object() -> trimesh.Trimesh:
    """A ~12 cm toy: striped red body, yellow cylinder knob off-centre, blue handle on one side (metres)."""
    body = _coloured(trimesh.creation.box((0.09, 0.05, 0.035)), (200, 40, 40), (240, 230, 220), 0, 0.015)
    knob = trimesh.creation.cylinder(radius=0.012, height=0.03, sections=24)
    knob.apply_translation((0.025, 0.0, 0.0325))
    knob = _coloured(knob, (230, 200, 30), (60, 60, 60), 2, 0.01)
    handle = trimesh.creation.box((0.02, 0.03, 0.06))
    handle.apply_translation((-0.055, 0.0, -0.01))
    handle = _coloured(handle, (40, 70, 200), (40, 70, 200), 0, 1.0)
    nose = trimesh.creation.icosphere(subdivisions=2, radius=0.012)
    nose.apply_translation((0.045, 0.02, 0.0))
    nose = _coloured(nose, (40, 160, 60), (40, 160, 60), 0, 1.0)
    mesh = trimesh.util.concatenate([body, knob, handle, nose])
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    return mesh


def write_example_object(path: Path = EXAMPLE_PATH) -> Path:
    """Write the example mesh as a binary PLY in metres with vertex colours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_example_object().export(path)
    return path
