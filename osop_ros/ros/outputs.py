"""Build the node's output messages (markers, TF, vision_msgs detections, overlay) from pose estimates.

Pure message construction: no publishers, no rclpy node; ``vision_msgs`` is passed in as a module
so it stays optional.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import Point, TransformStamped, Vector3
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from osop_ros.core.overlay import draw_estimates
from osop_ros.core.types import PoseEstimate
from osop_ros.ros.conversions import pose_to_msg, transform_to_msg

PALETTE = [(0.1, 0.9, 0.1), (1.0, 0.63, 0.0), (0.0, 0.78, 1.0), (1.0, 0.0, 1.0), (1.0, 1.0, 0.0), (0.47, 0.47, 1.0)]
UNIT_SCALES = {"mm": 0.001, "m": 1.0}


@dataclass
class ObjectVisual:
    """What the outputs need to know about one onboarded object.

    mesh_uri:   ``file://`` URI of the mesh for MESH_RESOURCE markers.
    mesh_scale: file units -> metres, None when unknown (units ``auto``): then TRIANGLE_LIST is used.
    triangles:  (3M, 3) float32 metres, model frame, decimated; None when no model is available.
    samples:    (N, 3) float64 metres surface samples for the overlay contour; None = axes only.
    diameter:   metres (axes length, label offset, detection box fallback).
    size:       (3,) metres bounding-box extents (Detection3D bbox).
    center:     (3,) metres bounding-box centre in the model frame.
    """

    name: str
    index: int
    mesh_uri: str | None = None
    mesh_scale: float | None = None
    triangles: np.ndarray | None = None
    samples: np.ndarray | None = None
    diameter: float = 0.1
    size: np.ndarray | None = None
    center: np.ndarray | None = None
    _points: list[Point] | None = None

    @property
    def color(self) -> tuple[float, float, float]:
        return PALETTE[self.index % len(PALETTE)]

    def triangle_points(self) -> list[Point]:
        """Cached ``geometry_msgs/Point`` list of :attr:`triangles`."""
        if self._points is None:
            tri = self.triangles if self.triangles is not None else np.zeros((0, 3))
            self._points = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in tri]
        return self._points


def object_visual(name: str, index: int, mesh_path: Path | None, units: str, model: Any | None,
                  max_triangles: int = 5000, n_samples: int = 1500) -> ObjectVisual:
    """Build an :class:`ObjectVisual` from an onboarded object's model (``ObjectModel``-like, may be None)."""
    vis = ObjectVisual(name=name, index=index)
    if mesh_path is not None:
        vis.mesh_uri = Path(mesh_path).resolve().as_uri()
        vis.mesh_scale = UNIT_SCALES.get(units)
    if model is None:
        return vis
    verts = np.asarray(model.vertices, dtype=np.float32)
    faces = np.asarray(model.faces, dtype=np.int64)
    if len(faces) > max_triangles:
        faces = faces[np.linspace(0, len(faces) - 1, max_triangles).astype(np.int64)]
    vis.triangles = verts[faces].reshape(-1, 3)
    if hasattr(model, "sample_surface"):
        vis.samples = np.asarray(model.sample_surface(n_samples, seed=0)[0], dtype=np.float64)
    else:
        vis.samples = verts.astype(np.float64)
    vis.diameter = float(getattr(model, "diameter", 0.0) or np.ptp(verts, axis=0).max())
    lo, hi = verts.min(axis=0), verts.max(axis=0)
    vis.size = (hi - lo).astype(np.float64)
    vis.center = ((hi + lo) / 2).astype(np.float64)
    return vis


def marker_array(header: Header, estimates: Sequence[PoseEstimate], visuals: dict[str, ObjectVisual],
                 mode: str = "auto") -> MarkerArray:
    """DELETEALL + per estimate a mesh marker (MESH_RESOURCE or TRIANGLE_LIST) and a score label."""
    out = MarkerArray()
    clear = Marker()
    clear.header = header
    clear.action = Marker.DELETEALL
    out.markers.append(clear)
    for k, est in enumerate(estimates):
        vis = visuals.get(est.object_name) or ObjectVisual(est.object_name, 0)
        r, g, b = vis.color
        pose = pose_to_msg(est.T_cam_obj)
        m = Marker(header=header, ns=est.object_name, id=2 * k, action=Marker.ADD, pose=pose)
        m.color = ColorRGBA(r=r, g=g, b=b, a=0.8)
        m.lifetime = Duration(sec=0, nanosec=0)
        use_mesh = mode == "mesh" or (mode == "auto" and vis.mesh_scale is not None)
        if use_mesh and vis.mesh_uri is not None:
            s = vis.mesh_scale if vis.mesh_scale is not None else 1.0
            m.type = Marker.MESH_RESOURCE
            m.mesh_resource = vis.mesh_uri
            m.mesh_use_embedded_materials = True
            m.scale = Vector3(x=s, y=s, z=s)
            out.markers.append(m)
        elif vis.triangles is not None and len(vis.triangles):
            m.type = Marker.TRIANGLE_LIST
            m.scale = Vector3(x=1.0, y=1.0, z=1.0)
            m.points = vis.triangle_points()
            out.markers.append(m)
        label = Marker(header=header, ns=est.object_name + "/label", id=2 * k + 1, action=Marker.ADD)
        label.type = Marker.TEXT_VIEW_FACING
        label.pose.position.x, label.pose.position.y, label.pose.position.z = (float(v) for v in est.t)
        label.pose.position.y -= 0.6 * vis.diameter  # optical frame: -y is up in the image
        label.pose.orientation.w = 1.0
        label.scale.z = max(0.02, 0.25 * vis.diameter)
        label.color = ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)
        label.text = f"{est.object_name} {est.score:.2f}"
        out.markers.append(label)
    return out


def transforms(header: Header, estimates: Sequence[PoseEstimate], prefix: str = "") -> list[TransformStamped]:
    """camera frame -> ``<prefix><name>`` (``_<k>`` appended for the k-th extra instance of a name)."""
    out, seen = [], {}
    for est in estimates:
        k = seen.get(est.object_name, 0)
        seen[est.object_name] = k + 1
        child = f"{prefix}{est.object_name}" + (f"_{k}" if k else "")
        out.append(TransformStamped(header=header, child_frame_id=child, transform=transform_to_msg(est.T_cam_obj)))
    return out


def detection_array(vision_msgs: Any, header: Header, estimates: Sequence[PoseEstimate],
                    visuals: dict[str, ObjectVisual]) -> Any:
    """``vision_msgs/Detection3DArray`` (vision_msgs >= 3 layout: results[].hypothesis + pose)."""
    arr = vision_msgs.Detection3DArray()
    arr.header = header
    for est in estimates:
        vis = visuals.get(est.object_name) or ObjectVisual(est.object_name, 0)
        det = vision_msgs.Detection3D()
        det.header = header
        det.id = est.object_name
        hyp = vision_msgs.ObjectHypothesisWithPose()
        hyp.hypothesis.class_id = est.object_name
        hyp.hypothesis.score = float(est.score)
        hyp.pose.pose = pose_to_msg(est.T_cam_obj)
        det.results.append(hyp)
        T_box = np.array(est.T_cam_obj, dtype=np.float64)
        if vis.center is not None:
            T_box[:3, 3] = T_box[:3, :3] @ vis.center + T_box[:3, 3]
        det.bbox.center = pose_to_msg(T_box)
        size = vis.size if vis.size is not None else np.full(3, vis.diameter)
        det.bbox.size = Vector3(x=float(size[0]), y=float(size[1]), z=float(size[2]))
        arr.detections.append(det)
    return arr


def overlay_image(rgb: np.ndarray, K: np.ndarray, estimates: Sequence[PoseEstimate],
                  visuals: dict[str, ObjectVisual]) -> np.ndarray:
    """Copy of ``rgb`` with contours (projected model samples), axes and ``name score`` labels."""
    samples, diameters = {}, {}
    for name, vis in visuals.items():
        samples[name] = vis.samples if vis.samples is not None else np.zeros((1, 3))
        diameters[name] = vis.diameter
    for est in estimates:  # estimates of objects without a visual still get axes
        samples.setdefault(est.object_name, np.zeros((1, 3)))
    return draw_estimates(rgb, K, estimates, samples, diameters)
