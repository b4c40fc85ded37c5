"""ROS parameters of ``osop_node``: declarations (with descriptions), validation, and the mapping to the
plain core configuration consumed by :func:`osop_ros.core.config.load_config`.

Parameter scheme (``config/osop.yaml``)
---------------------------------------
ROS parameters cannot be lists of mappings, so objects are a name list plus one namespace per name::

    objects.names: [example_object]
    objects.example_object.mesh: package://osop_ros/assets/example_object.ply  # absolute or package://
    objects.example_object.units: m             # mm | m | auto
    objects.example_object.obj_id: 1
    objects.example_object.symmetries.continuous_axes: [0.0, 0.0, 1.0]    # 3 floats per axis (optional)
    objects.example_object.symmetries.continuous_offsets: [0.0, 0.0, 0.0] # 3 floats per axis, metres
    objects.example_object.symmetries.discrete: [16 floats per 4x4 row-major transform, metres]

Every field of the core ``weights``, ``templates`` and ``pipeline`` sections (see
:mod:`osop_ros.core.config`) is a parameter ``<section>.<field>`` (derived from the dataclasses, so
new core options appear automatically), plus ``device`` and ``threads``. The remaining parameters
(``NODE_PARAMS``) belong to the ROS adapter only.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.parameter import Parameter

from osop_ros.core.config import PipelineConfig, TemplatesConfig, WeightsConfig, resolve_path
from osop_ros.core.types import InvalidInputError

NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
UNITS = ("mm", "m", "auto")


class ParameterError(InvalidInputError):
    """Invalid node parameters (the message lists every problem)."""


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter. ``default`` may be a ``Parameter.Type`` for typed-but-unset arrays."""

    name: str
    default: Any
    description: str
    read_only: bool = True
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()

    @property
    def is_typed_array(self) -> bool:
        """Declared with a type instead of a value: an array whose default is empty. The node gives it a
        typed empty value (a NOT_SET value breaks ``ros2 param dump/get`` and rqt)."""
        return isinstance(self.default, Parameter.Type)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` violates this parameter's choices or range (None when it does not)."""
        if value is None:
            return None
        if self.name == "device":
            dev = str(value)
            if not (dev in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", dev)):
                return f"device must be auto, cpu, cuda or cuda:N, got {dev!r}"
            return None
        if self.choices and value not in self.choices:
            return f"{self.name} must be one of {', '.join(self.choices)}, got {value!r}"
        if self.range is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = self.range
            if not lo <= value <= hi:
                return f"{self.name} must be in [{lo}, {hi}], got {value}"
        return None

    def descriptor(self) -> ParameterDescriptor:
        d = ParameterDescriptor(name=self.name, description=self.description, read_only=self.read_only)
        if self.choices:
            d.additional_constraints = "one of: " + ", ".join(self.choices)
        if self.range is not None:
            lo, hi = self.range
            if isinstance(self.default, float):
                d.floating_point_range = [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]
            elif isinstance(self.default, int) and not isinstance(self.default, bool):
                d.integer_range = [IntegerRange(from_value=int(lo), to_value=int(hi), step=1)]
        return d


_STR_ARRAY = Parameter.Type.STRING_ARRAY
_DBL_ARRAY = Parameter.Type.DOUBLE_ARRAY

NODE_PARAMS: tuple[ParamSpec, ...] = (
    ParamSpec("objects.names", _STR_ARRAY,
              "objects to onboard at startup; each needs objects.<name>.mesh (names become topic names)"),
    ParamSpec("device", "auto", "inference device", choices=("auto", "cpu", "cuda", "cuda:N")),
    ParamSpec("threads", 0, "torch CPU threads (0 = torch default)", range=(0, 1024)),
    ParamSpec("pipeline_factory", "",
              "'module:function' building the pipeline from the core config dict; empty = the OSOP networks"),
    ParamSpec("use_depth", True, "subscribe depth/image_raw; false = RGB-only pose estimation"),
    ParamSpec("qos.reliability", "best_effort", "input subscription reliability (sensor-data QoS by default)",
              choices=("best_effort", "reliable")),
    ParamSpec("qos.depth", 5, "input subscription history depth", range=(1, 1000)),
    ParamSpec("sync.queue_size", 10, "approximate-time synchroniser queue per input", range=(1, 1000)),
    ParamSpec("sync.slop", 0.05, "max stamp difference (s) between rgb, depth and camera_info of one frame",
              range=(0.0, 10.0)),
    ParamSpec("sync.backend", "auto", "auto = message_filters when importable, else the built-in policy",
              choices=("auto", "message_filters", "builtin")),
    ParamSpec("camera_frame", "", "frame_id of published poses; empty = the rgb image's header.frame_id"),
    ParamSpec("max_image_side", 1280,
              "images whose longer side exceeds this are downscaled before inference (0 = never)",
              read_only=False, range=(0, 100000)),
    ParamSpec("min_image_side", 16, "images with a side shorter than this are rejected", read_only=False,
              range=(1, 100000)),
    ParamSpec("publish.markers", True, "publish ~/markers (visualization_msgs/MarkerArray)", read_only=False),
    ParamSpec("publish.overlay", True, "publish ~/overlay (rgb8 image with contours/axes) when subscribed",
              read_only=False),
    ParamSpec("publish.tf", True, "broadcast camera -> <tf_prefix><object> TF frames (needs tf2_ros)",
              read_only=False),
    ParamSpec("publish.detections", True, "publish ~/detections (vision_msgs/Detection3DArray, if installed)",
              read_only=False),
    ParamSpec("publish.diagnostics", True, "publish /diagnostics every stats_period", read_only=False),
    ParamSpec("markers.mode", "auto",
              "auto = MESH_RESOURCE when the mesh units are explicit, else TRIANGLE_LIST",
              read_only=False, choices=("auto", "mesh", "triangles")),
    ParamSpec("markers.max_triangles", 5000, "TRIANGLE_LIST markers keep at most this many faces",
              read_only=False, range=(1, 10_000_000)),
    ParamSpec("tf_prefix", "", "prefix of the per-object TF child frames", read_only=False),
    ParamSpec("stats_period", 5.0, "seconds between timing/dropped-frame log lines", range=(0.1, 3600.0)),
    ParamSpec("warn_throttle", 5.0, "seconds between two warnings of the same kind", read_only=False,
              range=(0.0, 3600.0)),
    ParamSpec("camera_info_timeout", 3.0, "warn when images arrive but no frame synchronises for this long (s)",
              read_only=False, range=(0.1, 3600.0)),
    ParamSpec("onboard.name", "", "runtime onboarding: object name, then call ~/add_object", read_only=False),
    ParamSpec("onboard.mesh", "", "runtime onboarding: mesh path (absolute or package://)", read_only=False),
    ParamSpec("onboard.units", "auto", "runtime onboarding: mesh units", read_only=False, choices=UNITS),
    ParamSpec("onboard.obj_id", 0, "runtime onboarding: integer object id", read_only=False, range=(0, 1_000_000)),
    ParamSpec("onboard.symmetries.continuous_axes", _DBL_ARRAY, "runtime onboarding: 3 floats per axis",
              read_only=False),
    ParamSpec("onboard.symmetries.continuous_offsets", _DBL_ARRAY, "runtime onboarding: 3 floats per axis (m)",
              read_only=False),
    ParamSpec("onboard.symmetries.discrete", _DBL_ARRAY, "runtime onboarding: 16 floats per 4x4 transform (m)",
              read_only=False),
    ParamSpec("onboard.timeout", 600.0, "seconds ~/add_object waits for onboarding to finish", read_only=False,
              range=(1.0, 86400.0)),
)

_CORE_DESCRIPTIONS = {
    "pipeline.score_threshold": "publish poses whose calibrated P(pose correct) is at least this (live)",
    "pipeline.modality": "auto | rgb | rgbd",
    "pipeline.max_instances": "instances per object and frame",
    "weights.segment": "segmentation checkpoint; empty = shipped weights; cosine:<backbone> = training-free",
    "weights.match": (
        "template matching checkpoint (default package://osop_ros/weights/match_feat.pt); "
        "descriptor:<backbone> = training-free; empty = weights/match.pt (the CPU-trained MatchNet)"
    ),
    "weights.correspond": "correspondence checkpoint; empty = shipped weights",
    "templates.cache_dir": "template bank cache; empty = $OSOP_CACHE_DIR or ~/.cache/osop/templates",
    "pipeline.verify": "render-and-compare verification of every pose hypothesis; score = calibrated P(correct)",
    "pipeline.verify_refine_top_n": "ICP (RGB-D) of this many best-verified hypotheses, then re-verification",
    "pipeline.verify_candidates": "stage-1 instance candidates verified per object (the best max_instances kept)",
    "pipeline.calibration": "score calibration YAML/JSON; empty = config/score_calibration.yaml, 'none' = raw score",
    "pipeline.symmetry_search": "after ICP, pick among the shape's symmetric twins of the pose by colour agreement",
    "pipeline.symmetry_approx_tol": "symmetry search: also near-symmetries within this x diameter (0 = exact only)",
    "pipeline.symmetry_partial_quantile": "symmetry search: also twins that fit this share of the surface (0 = off)",
    "pipeline.depth_seg": "RGB-D: clean stage-1 masks with depth (support plane, depth edges, 3D cluster)",
    "pipeline.segmenter": "stage 1: head (OSOP head components) | proposals (MobileSAM masks ranked by descriptors)",
    "pipeline.segmenter_rgb": "stage 1 of frames without depth: same (= segmenter) | head | proposals",
    "pipeline.seg_ranking": "stage-1 head components ordered by descriptor (template cosine + 0.2 x prob) | head",
    "pipeline.proposal_image_size": "proposals: MobileSAM input side in pixels (multiple of 16)",
    "pipeline.proposal_grid_x": "proposals: point-prompt grid columns per frame",
    "pipeline.proposal_grid_y": "proposals: point-prompt grid rows per frame",
    "pipeline.proposal_head_peaks": "proposals: extra prompts per object at the head's probability peaks",
    "pipeline.proposal_head_weight": "proposals: ranking weight of the mean head probability (cosine's = 1)",
    "pipeline.proposal_cover_weight": "proposals: ranking weight of the share of the head's mask covered",
    "pipeline.proposal_colour_weight": "proposals: ranking weight of the colour agreement with the templates",
    "pipeline.proposal_min_score": "proposals: drop masks whose ranking score (cosine + weighted terms) is below this",
    "pipeline.rgb_scale_search": (
        "frames without depth: move the pose along its viewing ray by up to this relative distance change to the "
        "best-verified distance (0 = off)"
    ),
    "pipeline.rgb_scale_steps": "frames without depth: distance factors tried by rgb_scale_search (log-spaced)",
    "pipeline.rgb_contour_refine": (
        "frames without depth: after the distance search, pull the pose's rendered contour onto the image edges"
    ),
}
_CORE_RANGES = {
    "pipeline.score_threshold": (0.0, 1.0),
    "pipeline.symmetry_approx_tol": (0.0, 0.2),
    "pipeline.symmetry_partial_quantile": (0.0, 0.97),
    "pipeline.verify_refine_top_n": (0, 16),
    "pipeline.verify_candidates": (1, 16),
    "pipeline.proposal_image_size": (64, 2048),
    "pipeline.proposal_grid_x": (0, 64),
    "pipeline.proposal_grid_y": (0, 64),
    "pipeline.proposal_head_peaks": (0, 64),
    "pipeline.proposal_head_weight": (0.0, 5.0),
    "pipeline.proposal_cover_weight": (0.0, 5.0),
    "pipeline.proposal_colour_weight": (0.0, 5.0),
    "pipeline.proposal_min_score": (-2.0, 5.0),
    "pipeline.rgb_scale_search": (0.0, 0.5),
    "pipeline.rgb_scale_steps": (3, 101),
}
_CORE_SECTIONS = (("weights", WeightsConfig), ("templates", TemplatesConfig), ("pipeline", PipelineConfig))
LIVE_PARAMS = {"pipeline.score_threshold"}
_CORE_CHOICES = {"pipeline.modality": ("auto", "rgb", "rgbd"), "pipeline.segmenter": ("head", "proposals"),
                 "pipeline.segmenter_rgb": ("same", "head", "proposals"),
                 "pipeline.seg_ranking": ("descriptor", "head")}


def core_param_specs() -> list[ParamSpec]:
    """One parameter per field of the core config sections (defaults from the dataclasses)."""
    specs = []
    for section, cls in _CORE_SECTIONS:
        for f in dataclasses.fields(cls):
            if f.default is dataclasses.MISSING:  # only scalar options can be ROS parameters
                continue
            name = f"{section}.{f.name}"
            rng = _CORE_RANGES.get(name)
            desc = _CORE_DESCRIPTIONS.get(name, f"core config {name} (see osop_ros/core/config.py)")
            specs.append(ParamSpec(name, f.default, desc, read_only=name not in LIVE_PARAMS, range=rng,
                                   choices=_CORE_CHOICES.get(name, ())))
    return specs


def object_param_specs(name: str) -> list[ParamSpec]:
    """Parameters of one configured object ``objects.<name>.*``."""
    p = f"objects.{name}."
    return [
        ParamSpec(p + "mesh", "", f"mesh of {name} (absolute path or package://osop_ros/...)"),
        ParamSpec(p + "units", "auto", f"units of {name}'s mesh file", choices=UNITS),
        ParamSpec(p + "obj_id", 0, f"integer id of {name}", range=(0, 1_000_000)),
        ParamSpec(p + "symmetries.continuous_axes", _DBL_ARRAY, "3 floats per continuous symmetry axis"),
        ParamSpec(p + "symmetries.continuous_offsets", _DBL_ARRAY, "3 floats per axis: a point on it (m)"),
        ParamSpec(p + "symmetries.discrete", _DBL_ARRAY, "16 floats per discrete symmetry (4x4 row-major, m)"),
    ]


def spec_for(name: str) -> ParamSpec | None:
    """The :class:`ParamSpec` of a declared parameter name (node, core or ``objects.<name>.*``)."""
    for spec in (*NODE_PARAMS, *core_param_specs()):
        if spec.name == name:
            return spec
    m = re.fullmatch(r"objects\.([A-Za-z][A-Za-z0-9_]*)\..+", name)
    if m:
        for spec in object_param_specs(m.group(1)):
            if spec.name == name:
                return spec
    return None


def symmetries_dict(axes: list[float] | None, offsets: list[float] | None, discrete: list[float] | None,
                    where: str) -> dict[str, Any]:
    """Flat float lists -> ``{continuous: [{axis, offset}], discrete: [[16]]}`` (core/BOP form, metres)."""
    axes, offsets, discrete = list(axes or []), list(offsets or []), list(discrete or [])
    if len(axes) % 3:
        raise ParameterError(f"{where}.symmetries.continuous_axes needs 3 floats per axis, got {len(axes)}")
    if offsets and len(offsets) != len(axes):
        raise ParameterError(f"{where}.symmetries.continuous_offsets needs {len(axes)} floats, got {len(offsets)}")
    if len(discrete) % 16:
        raise ParameterError(f"{where}.symmetries.discrete needs 16 floats per transform, got {len(discrete)}")
    out: dict[str, Any] = {}
    if axes:
        offsets = offsets or [0.0] * len(axes)
        cont = []
        for i in range(0, len(axes), 3):
            ax = axes[i : i + 3]
            if not any(abs(v) > 0 for v in ax):
                raise ParameterError(f"{where}.symmetries.continuous_axes: axis {i // 3} is zero")
            cont.append({"axis": ax, "offset": offsets[i : i + 3]})
        out["continuous"] = cont
    if discrete:
        out["discrete"] = [discrete[i : i + 16] for i in range(0, len(discrete), 16)]
    return out


@dataclass
class ObjectSpec:
    """One object to onboard; ``to_core()`` is an ``objects[]`` entry of the core config (mesh resolved)."""

    name: str
    mesh: str
    units: str = "auto"
    obj_id: int = 0
    symmetries: dict[str, Any] = field(default_factory=dict)

    @property
    def mesh_path(self) -> Path:
        return resolve_path(self.mesh)

    def validate(self) -> list[str]:
        errs = []
        if not NAME_RE.match(self.name):
            errs.append(f"object name {self.name!r} must match [A-Za-z][A-Za-z0-9_]* (it becomes a topic name)")
        if not self.mesh:
            errs.append(f"object {self.name}: mesh path is empty")
        if self.units not in UNITS:
            errs.append(f"object {self.name}: units must be one of {UNITS}, got {self.units!r}")
        return errs

    def to_core(self) -> dict[str, Any]:
        return {"name": self.name, "mesh": str(self.mesh_path), "units": self.units, "obj_id": int(self.obj_id),
                "symmetries": dict(self.symmetries)}


def object_spec_from_values(values: dict[str, Any], prefix: str, name: str) -> ObjectSpec:
    """Read ``<prefix>mesh/units/obj_id/symmetries.*`` from a name -> value mapping."""
    sym = symmetries_dict(values.get(prefix + "symmetries.continuous_axes"),
                          values.get(prefix + "symmetries.continuous_offsets"),
                          values.get(prefix + "symmetries.discrete"), prefix.rstrip("."))
    return ObjectSpec(name, str(values.get(prefix + "mesh") or ""), str(values.get(prefix + "units") or "auto"),
                      int(values.get(prefix + "obj_id") or 0), sym)


def validate_values(values: dict[str, Any]) -> list[str]:
    """Cross-parameter checks (ranges/choices are also enforced here: overrides bypass descriptors)."""
    errs = []
    for spec in (*NODE_PARAMS, *core_param_specs()):
        problem = spec.problem(values.get(spec.name))
        if problem:
            errs.append(problem)
    if values.get("pipeline.modality") == "rgbd" and not values.get("use_depth", True):
        errs.append("pipeline.modality is rgbd but use_depth is false")
    mx, mn = values.get("max_image_side", 0), values.get("min_image_side", 1)
    if mx and mx < mn:
        errs.append(f"max_image_side ({mx}) must be 0 or >= min_image_side ({mn})")
    factory = str(values.get("pipeline_factory") or "")
    if factory and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", factory):
        errs.append(f"pipeline_factory must look like 'package.module:function', got {factory!r}")
    names = list(values.get("objects.names") or [])
    if len(set(names)) != len(names):
        errs.append(f"objects.names must be unique, got {names}")
    return errs


def core_config(values: dict[str, Any]) -> dict[str, Any]:
    """Plain core config dict (``load_config`` form) from parameter values; ``objects`` left empty
    because the node onboards objects one by one (progress, per-object failures)."""
    cfg: dict[str, Any] = {"device": str(values["device"]), "threads": int(values["threads"]), "objects": []}
    for section, cls in _CORE_SECTIONS:
        cfg[section] = {f.name: values[f"{section}.{f.name}"] for f in dataclasses.fields(cls)
                        if f"{section}.{f.name}" in values}
    return cfg
