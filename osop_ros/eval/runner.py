"""Run the OSOP pipeline on a BOP dataset and score it with the BOP19 metrics.

``run_eval(EvalOptions(...), stage_factory=...)``:

1. reads the dataset (:class:`~osop_ros.data.bop.BopDataset`) and its targets (optionally filtered by
   object and limited to the first ``max_images`` images);
2. takes the pipeline configuration the node runs: ``options.config`` (an :class:`OsopConfig`; None =
   the node's ``config/osop.yaml``, read with :func:`load_eval_config`) with the option overrides
   (``modality``, ``correspondence``, ``top_k``, ``icp``, ``verify``, ``score_threshold``, ...);
3. builds that pipeline with :func:`osop_ros.core.factory.build_pipeline` (the node's code path) and
   onboards every target object from the dataset's own models (millimetres) with its cached template
   bank and network features; ORACLE stages (``oracle={"mask", "viewpoint"}``) and template-transfer
   correspondences replace learned stages when asked. With a ``stage_factory`` (tests, custom stages)
   the stages come from it instead;
4. estimates poses per image (sequentially or in ``jobs`` worker processes, merged in image order),
   optionally also for ``absent`` objects that are not in the image, writes the BOP CSV, evaluates
   (VSD only on frames with depth), labels every estimate correct / wrong (MSSD < 0.1 x diameter,
   :func:`~osop_ros.eval.metrics.label_estimates`), and writes a JSON summary (top-level ``AR``,
   ``AR_VSD``, ``AR_MSSD``, ``AR_MSPD``, precision/recall of published poses at the threshold, the
   absent-object rate) plus ``<out>.features.jsonl`` (one line per estimate: verification features,
   score, label) next to the CSV;
5. optionally fits the score calibration on those records (``fit_calibration``) and plots precision /
   recall versus the score threshold (``pr_plot``), see :mod:`osop_ros.eval.calibration`.

Learned stages plug in through ``stage_factory(stage_name, context) -> stage | None`` with stage names
``"segmenter"``, ``"matcher"``, ``"correspondence"``; a needed stage the factory cannot provide raises
:class:`StageUnavailableError`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from osop_ros.core.config import (
    OsopConfig,
    PipelineConfig,
    TemplatesConfig,
    WeightsConfig,
    load_config,
    package_share_dir,
)
from osop_ros.core.correspondence import TemplateTransferCorrespondences
from osop_ros.core.geometry import symmetry_transforms
from osop_ros.core.pipeline import Pipeline
from osop_ros.core.solver import PoseSolver, SolverConfig
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import InvalidInputError, Observation, OsopError
from osop_ros.data.bop import BopDataset, BopResult, read_bop_csv, write_bop_csv
from osop_ros.eval.metrics import (
    CORRECT_MSSD_FRAC,
    EvalConfig,
    EvalEstimate,
    EvalFrame,
    EvalGt,
    EvalObject,
    EvalReport,
    PoseEvaluator,
    format_recall,
    label_estimates,
    make_render_depth,
    published_stats,
)
from osop_ros.eval.oracle import OracleFrame, OracleMatcher, OracleSegmenter

log = logging.getLogger(__name__)

ORACLE_CHOICES = ("mask", "viewpoint")
MODALITIES = ("rgb", "rgbd", "auto")
CORRESPONDENCE_CHOICES = ("transfer", "learned")
STAGES = ("segment", "match", "correspond")


class StageUnavailableError(OsopError):
    """A learned stage was requested but no implementation is available."""


# ------------------------------------------------------------------------------------------------
# Configuration: the node's YAML (ROS parameter file) or a plain core config
# ------------------------------------------------------------------------------------------------


def default_node_config_path() -> Path:
    """``config/osop.yaml`` of the package (what ``ros2 launch osop_ros osop.launch.py`` runs)."""
    return package_share_dir() / "config" / "osop.yaml"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted names, as ROS 2 flattens a parameter file."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _ros_parameters(data: dict[str, Any]) -> dict[str, Any] | None:
    """The ``ros__parameters`` mapping of the ``osop_node`` entry (``/**/osop_node``, ``osop_node``, ...)."""
    entries = {k: v for k, v in data.items() if isinstance(v, dict) and "ros__parameters" in v}
    if not entries:
        return None
    key = next((k for k in entries if str(k).rstrip("/").split("/")[-1] == "osop_node"), next(iter(entries)))
    params = entries[key]["ros__parameters"] or {}
    if not isinstance(params, dict):
        raise InvalidInputError(f"{key}.ros__parameters must be a mapping")
    return params


def load_eval_config(path: str | os.PathLike[str] | None = None) -> OsopConfig:
    """The core configuration of ``path`` (None = the node's ``config/osop.yaml``), objects dropped.

    ROS parameter files (``/**/osop_node: ros__parameters: ...``) are flattened the way the node
    reads them (:func:`osop_ros.ros.params.core_config`: ``device``, ``threads`` and every
    ``<section>.<field>`` of the weights / templates / pipeline dataclasses; node-only keys are
    ignored); any other YAML is a plain core config (:func:`osop_ros.core.config.load_config`).
    """
    p = Path(path) if path is not None else default_node_config_path()
    if not p.is_file():
        raise InvalidInputError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"config file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidInputError(f"config file {p} must contain a mapping")
    params = _ros_parameters(data)
    if params is None:
        return dataclasses.replace(load_config(p), objects=[])
    flat = _flatten(params)
    core: dict[str, Any] = {"device": flat.get("device", "auto"), "threads": flat.get("threads", 0), "objects": []}
    for section, cls in (("weights", WeightsConfig), ("templates", TemplatesConfig), ("pipeline", PipelineConfig)):
        core[section] = {f.name: flat[f"{section}.{f.name}"] for f in dataclasses.fields(cls)
                         if f"{section}.{f.name}" in flat}
    return load_config(core)


# ------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------


@dataclass
class EvalOptions:
    """What to evaluate. ``objects``: BOP obj ids (None = all targets). ``oracle``: subset of
    ``ORACLE_CHOICES``. ``results_csv``: evaluate this existing BOP CSV instead of running the pipeline.

    ``config``: the pipeline configuration (None = the node's ``config/osop.yaml``); the options
    ``modality``, ``correspondence`` (None = learned, what the node runs), ``top_k``, ``icp``, ``verify``,
    ``score_threshold``, ``seg_input_width``, ``calibration``, ``depth_seg``, ``symmetry_search``, ``segmenter``,
    ``segmenter_rgb``, ``seg_ranking``, ``verify_candidates`` and ``device`` override it when not None (a
    ``segmenter`` without ``segmenter_rgb`` is stage 1 of every frame, with or without depth).
    ``max_instances``: None = the config's, ``"targets"`` = the BOP ``inst_count`` of each target.
    ``absent``: per image, also query this many objects of ``objects`` (None: of the dataset) that are not
    in the image (each is onboarded).
    ``jobs``: worker processes (each builds its own pipeline); results are merged in image order.
    ``hard_negatives``: also record the verification features of the 180-degree flips of every chosen
    pose (:func:`~osop_ros.core.verify.model_flips`), labelled by their MSSD like any estimate, as
    fit-only records (``fit_only``: never counted as published) for ``fit_calibration``.
    """

    dataset: Path
    split: str = "test"
    targets_file: Path | None = None
    objects: list[int] | None = None
    config: OsopConfig | None = None
    modality: str | None = None
    oracle: tuple[str, ...] = ()
    correspondence: str | None = None
    top_k: int | None = None
    icp: bool | None = None
    verify: bool | None = None
    score_threshold: float | None = None
    seg_input_width: int | None = None
    calibration: str | None = None
    depth_seg: bool | None = None
    symmetry_search: bool | None = None
    segmenter: str | None = None
    segmenter_rgb: str | None = None
    seg_ranking: str | None = None
    verify_candidates: int | None = None
    device: str | None = None
    max_instances: int | str | None = None
    max_images: int | None = None
    absent: int = 0
    jobs: int = 1
    out: Path = Path("results.csv")
    results_csv: Path | None = None
    cache_dir: Path | None = None
    template_config: Any | None = None  # TemplateConfig; None = the config's templates section
    solver_config: SolverConfig | None = None
    vsd: bool = True
    progress: bool = True
    fit_calibration: Path | None = None
    hard_negatives: bool = False
    pr_plot: Path | None = None
    seed: int = 0

    def validate(self) -> None:
        if self.modality is not None and self.modality not in MODALITIES:
            raise InvalidInputError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        bad = [o for o in self.oracle if o not in ORACLE_CHOICES]
        if bad:
            raise InvalidInputError(f"unknown oracle mode(s) {bad}; choose from {ORACLE_CHOICES}")
        if self.correspondence is not None and self.correspondence not in CORRESPONDENCE_CHOICES:
            raise InvalidInputError(f"correspondence must be one of {CORRESPONDENCE_CHOICES}")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_images is not None and self.max_images < 1:
            raise InvalidInputError(f"max_images must be >= 1, got {self.max_images}")
        if self.max_instances is not None and self.max_instances != "targets" and (
            not isinstance(self.max_instances, int) or self.max_instances < 1
        ):
            raise InvalidInputError(f"max_instances must be an integer >= 1 or 'targets', got {self.max_instances!r}")
        if self.absent < 0 or self.jobs < 1:
            raise InvalidInputError(f"absent must be >= 0 and jobs >= 1, got {self.absent} and {self.jobs}")
        if self.score_threshold is not None and not 0.0 <= self.score_threshold <= 1.0:
            raise InvalidInputError(f"score_threshold must be in [0, 1], got {self.score_threshold}")

    def resolved_config(self) -> OsopConfig:
        """The node configuration with this run's overrides applied (no objects, tracking off)."""
        cfg = self.config if self.config is not None else load_eval_config()
        p = cfg.pipeline
        over: dict[str, Any] = {"tracking": False}
        for key, val in (("top_k_templates", self.top_k), ("icp", self.icp), ("verify", self.verify),
                         ("score_threshold", self.score_threshold), ("seg_input_width", self.seg_input_width),
                         ("calibration", self.calibration), ("depth_seg", self.depth_seg),
                         ("symmetry_search", self.symmetry_search),
                         ("segmenter", self.segmenter), ("seg_ranking", self.seg_ranking),
                         ("verify_candidates", self.verify_candidates)):
            if val is not None:
                over[key] = val
        if self.segmenter_rgb is not None or self.segmenter is not None:
            over["segmenter_rgb"] = self.segmenter_rgb or "same"
        if self.modality is not None:
            over["modality"] = self.modality
        if isinstance(self.max_instances, int):
            over["max_instances"] = self.max_instances
        templates = cfg.templates
        if self.cache_dir is not None:
            templates = dataclasses.replace(templates, cache_dir=str(self.cache_dir))
        cfg = dataclasses.replace(cfg, objects=[], pipeline=dataclasses.replace(p, **over), templates=templates,
                                  device=self.device or cfg.device)
        cfg.validate()
        return cfg

    @property
    def corr_mode(self) -> str:
        return self.correspondence or "learned"


@dataclass
class StageContext:
    """Handed to ``stage_factory``: everything a learned stage may need to initialise."""

    dataset: BopDataset
    objects: list[OnboardedObject]
    renderer: Any
    options: EvalOptions
    config: OsopConfig | None = None


StageFactory = Callable[[str, StageContext], Any]


def _weights_available(cfg: OsopConfig, stages: tuple[str, ...] = STAGES) -> list[str]:
    """Stages of ``stages`` whose weights (file or training-free spec) are missing."""
    from osop_ros.nets.specs import is_training_free

    missing = []
    for s in stages:
        p = cfg.weight_path(s)
        if not (is_training_free(p) or Path(p).is_file()):
            missing.append(s)
    return missing


def default_stage_factory(device: str = "auto", weights_dir: Path | None = None) -> StageFactory | None:
    """Factory of the learned stages (shipped weights, or ``weights_dir/{segment,match,correspond}.pt``).

    Returns None when a weights file is missing. Networks are loaded once, on first use; the stages
    take the run's pipeline settings (top-k, stage-1 input width) from ``ctx.config``.
    """
    weights = {} if weights_dir is None else {s: str(Path(weights_dir) / f"{s}.pt") for s in STAGES}
    cfg = load_config({"device": device, "weights": weights})
    if _weights_available(cfg):
        return None
    cache: dict[str, Any] = {}

    def factory(name: str, ctx: StageContext) -> Any:
        from osop_ros.core.correspondence import DenseCorrespondence
        from osop_ros.core.factory import Networks
        from osop_ros.core.matching import TemplateMatcher
        from osop_ros.core.segmentation import OneShotSegmenter

        if "nets" not in cache:
            cache["nets"] = Networks.load(cfg)
        n = cache["nets"]
        p = ctx.config.pipeline if ctx.config is not None else PipelineConfig()
        if name == "segmenter":
            if ctx.config is None:
                return OneShotSegmenter(n.segnet, n.device, input_width=p.seg_input_width)
            from osop_ros.core.factory import build_segmenter

            return build_segmenter(ctx.config, n, TemplateMatcher(n.matchnet, n.device, top_k=p.top_k_templates))
        if name == "matcher":
            return TemplateMatcher(n.matchnet, n.device, top_k=p.top_k_templates)
        if name == "correspondence":
            return DenseCorrespondence(n.corrnet, n.device)
        return None

    factory.digest = lambda: cache["nets"].digest if "nets" in cache else None  # type: ignore[attr-defined]
    return factory


@dataclass
class EvalRun:
    """Result of :func:`run_eval`."""

    summary: dict[str, Any]
    report: EvalReport
    csv_path: Path
    json_path: Path
    results: list[BopResult] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)


def object_name(obj_id: int) -> str:
    return f"obj_{obj_id:06d}"


def oracle_label(oracle: tuple[str, ...] | list[str]) -> str:
    """'ORACLE(mask,viewpoint)' or '' when no oracle is used."""
    return f"ORACLE({','.join(sorted(oracle))})" if oracle else ""


def _stage(name: str, factory: StageFactory | None, ctx: StageContext, hint: str) -> Any:
    stage = factory(name, ctx) if factory is not None else None
    if stage is None:
        raise StageUnavailableError(f"learned {name} is not available in this build; {hint}")
    return stage


def _needed_learned(options: EvalOptions) -> list[tuple[str, str]]:
    """[(pipeline stage name, weights stage name)] of the learned stages this run needs."""
    oracle = set(options.oracle)
    out = []
    if "mask" not in oracle:
        out.append(("segmenter", "segment"))
    if "viewpoint" not in oracle:
        out.append(("matcher", "match"))
    if options.corr_mode == "learned":
        out.append(("correspondence", "correspond"))
    return out


def _bop_symmetries_m(info: dict[str, Any]) -> dict[str, Any]:
    """A BOP models_info entry's symmetries with translations in metres (for ``ObjectConfig.symmetries``)."""
    out: dict[str, Any] = {}
    if info.get("symmetries_discrete"):
        disc = []
        for s in info["symmetries_discrete"]:
            T = np.asarray(s, dtype=np.float64).reshape(4, 4).copy()
            T[:3, 3] *= 0.001
            disc.append(T.reshape(-1).tolist())
        out["symmetries_discrete"] = disc
    if info.get("symmetries_continuous"):
        out["symmetries_continuous"] = [
            {"axis": list(s["axis"]), "offset": (np.asarray(s.get("offset", [0, 0, 0]), float) * 0.001).tolist()}
            for s in info["symmetries_continuous"]
        ]
    return out


# ------------------------------------------------------------------------------------------------
# Estimation (one process, or one per worker)
# ------------------------------------------------------------------------------------------------


@dataclass
class EstRecord:
    """One returned pose: object, score, pose and what the pipeline reported about it."""

    obj_id: int
    score: float
    T_cam_obj: np.ndarray
    absent: bool
    modality: str
    features: dict[str, float | None]
    score_raw: float | None
    calibrated: bool
    timings: dict[str, float]
    flips: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class ImageOutput:
    scene_id: int
    im_id: int
    time: float
    estimates: list[EstRecord]
    absent_queries: list[int]
    used_depth: bool


def _record(e: Any, obj_id: int, absent: bool, used_depth: bool) -> EstRecord:
    d = e.diagnostics
    return EstRecord(
        obj_id, float(e.score), np.asarray(e.T_cam_obj, dtype=np.float64), absent,
        str(d.get("verify_modality", "rgbd" if used_depth else "rgb")), dict(d.get("verify", {})),
        d.get("score_raw"), bool(d.get("score_calibrated", False)), dict(e.timings), list(d.get("verify_flips", [])),
    )


class _Estimator:
    """Dataset + renderer + onboarded objects + pipeline for one process."""

    def __init__(
        self,
        options: EvalOptions,
        cfg: OsopConfig,
        ds: BopDataset,
        target_objs: list[int],
        renderer: Any,
        stage_factory: StageFactory | None,
        build: bool = True,
    ) -> None:
        from osop_ros.core.mesh import ObjectModel

        self.options, self.cfg, self.ds, self.ren = options, cfg, ds, renderer
        self.models: dict[int, Any] = {}
        self.keys: dict[int, str] = {}
        for obj_id in ds.obj_ids:
            try:
                path = ds.model_path(obj_id)
            except OsopError:
                if obj_id in target_objs:
                    raise
                continue
            self.models[obj_id] = ObjectModel.load(
                path, units="mm", name=object_name(obj_id), symmetries=ds.models_info[obj_id]
            )
            self.keys[obj_id] = f"eval_{object_name(obj_id)}"
            renderer.add_object(self.keys[obj_id], self.models[obj_id])
        self.oframe = OracleFrame(renderer, self.keys)
        self.objects: list[OnboardedObject] = []
        self.pipeline: Pipeline | None = None
        self.stage_names: dict[str, str] = {}
        self.digest: str | None = None
        if build:
            self._build(target_objs, stage_factory)

    def _template_config(self) -> Any:
        from osop_ros.core.templates import TemplateConfig
        from osop_ros.core.views import ViewGridConfig

        if self.options.template_config is not None:
            return self.options.template_config
        t = self.cfg.templates
        return TemplateConfig(
            views=ViewGridConfig(n_elevations=t.n_elevations, n_azimuths=t.n_azimuths, n_inplane=t.n_inplane,
                                 elevation_range_deg=(t.elevation_min_deg, t.elevation_max_deg)),
            crop_size=t.crop_size,
        )

    def _onboard_plain(self, obj_id: int) -> OnboardedObject:
        from osop_ros.core.templates import TemplateCache

        cache = TemplateCache(self.cfg.template_cache_dir())
        bank = cache.get_or_build(self.models[obj_id], self.ren, self._template_config(),
                                  progress=self.options.progress)
        m = self.models[obj_id]
        return OnboardedObject(object_name(obj_id), m, bank, symmetry_transforms(m.symmetries), obj_id=obj_id)

    def _build(self, target_objs: list[int], stage_factory: StageFactory | None) -> None:
        opts, cfg = self.options, self.cfg
        oracle = set(opts.oracle)
        p = cfg.pipeline
        learned = _needed_learned(opts)
        top_k = p.top_k_templates
        solver = PoseSolver(opts.solver_config or SolverConfig(icp=p.icp))
        if learned and stage_factory is None:
            from osop_ros.core.config import ObjectConfig
            from osop_ros.core.factory import build_pipeline, onboard_object

            missing = _weights_available(cfg)
            if missing:
                raise StageUnavailableError(
                    f"learned {', '.join(n for n, _ in learned)} not available in this build (no weights for "
                    f"{', '.join(missing)}); use --oracle mask,viewpoint and --correspondence transfer for the "
                    "oracle/non-learned stages"
                )
            pipe = build_pipeline(cfg)  # the node's code path (cfg has no objects: networks + stages only)
            self.digest = pipe.networks.digest
            for obj_id in target_objs:
                if opts.template_config is None:
                    info = self.ds.models_info[obj_id]
                    oc = ObjectConfig(object_name(obj_id), str(self.ds.model_path(obj_id)), "mm", obj_id,
                                      _bop_symmetries_m(info))
                    self.objects.append(onboard_object(oc, cfg, pipe.networks, renderer_factory=self.ren))
                else:  # custom (test) template grid: plain bank, features computed by the stages
                    self.objects.append(self._onboard_plain(obj_id))
                pipe.add_object(self.objects[-1])
            if "mask" in oracle:
                pipe.segmenter = OracleSegmenter(self.oframe)
                pipe.rgb_segmenter = None
            if "viewpoint" in oracle:
                pipe.matcher = OracleMatcher(self.oframe, top_k=top_k)
            if opts.corr_mode == "transfer":
                pipe.correspondence = TemplateTransferCorrespondences(n_templates=top_k)
            if opts.solver_config is not None:
                pipe.solver = solver
            pipe.modality = "auto"  # the runner drops / requires depth per frame
        else:
            for obj_id in target_objs:
                self.objects.append(self._onboard_plain(obj_id))
            ctx = StageContext(self.ds, self.objects, self.ren, opts, cfg)
            seg = (OracleSegmenter(self.oframe) if "mask" in oracle
                   else _stage("segmenter", stage_factory, ctx, "pass --oracle mask to use ground-truth masks"))
            mat = (OracleMatcher(self.oframe, top_k=top_k) if "viewpoint" in oracle
                   else _stage("matcher", stage_factory, ctx, "pass --oracle viewpoint to use GT viewpoints"))
            if opts.corr_mode == "learned":
                cor = _stage("correspondence", stage_factory, ctx, "use --correspondence transfer")
            else:
                cor = TemplateTransferCorrespondences(n_templates=top_k)
            pipe = Pipeline(self.objects, seg, mat, cor, solver, max_instances=p.max_instances)
            pipe.configure(p, cfg.base_dir)
            digest = getattr(stage_factory, "digest", None)
            self.digest = digest() if callable(digest) else None
        if opts.hard_negatives and pipe.verifier is not None:
            pipe.verifier.config.report_flips = True
        self.pipeline = pipe
        self.stage_names = {
            "segmenter": "ORACLE(mask)" if "mask" in oracle else type(pipe.segmenter).__name__,
            "matcher": "ORACLE(viewpoint)" if "viewpoint" in oracle else type(pipe.matcher).__name__,
            "correspondence": type(pipe.correspondence).__name__,
            "solver": type(pipe.solver).__name__,
            "verifier": type(pipe.verifier).__name__ if pipe.verifier is not None else "none",
            "calibration": "loaded" if pipe.calibration is not None else "none",
        }

    def warm_up(self, scene_id: int, im_id: int) -> None:
        """Lazy imports and GL buffers outside the timed loop."""
        if self.cfg.pipeline.modality != "rgb":
            import open3d  # noqa: F401
        cam, _ = self.ds.camera(scene_id, im_id)
        obj_id = next(iter(self.keys))
        T = np.eye(4)
        T[2, 3] = 2.0 * float(self.models[obj_id].diameter) + 0.1
        self.ren.render(cam.K, cam.width, cam.height, [(self.keys[obj_id], T)])

    def estimate_image(
        self, scene_id: int, im_id: int, im_targets: dict[int, int], absent: list[int], frame: Any = None
    ) -> ImageOutput | None:
        """Poses of the image's targets (timed) and of the ``absent`` objects; None when skipped (no depth)."""
        assert self.pipeline is not None
        mod = self.cfg.pipeline.modality
        ds = self.ds
        has_depth = ds.has_depth(scene_id, im_id)
        if mod == "rgbd" and not has_depth:
            return None
        if frame is None:
            frame = ds.load_frame(scene_id, im_id, with_depth=True)
        use_depth = has_depth and mod != "rgb" and frame.obs.depth is not None
        obs = Observation(frame.obs.rgb, frame.obs.camera, frame.obs.depth if use_depth else None)
        mv = [ds.mask_visib(scene_id, im_id, g.gt_index) for g in frame.gts]
        self.oframe.set_frame([(g.obj_id, g.T_cam_obj) for g in frame.gts],
                              mv if all(m is not None for m in mv) else None)
        if self.options.max_instances == "targets":
            self.pipeline.max_instances = max(im_targets.values())
        t0 = time.perf_counter()
        ests = self.pipeline(obs, objects=[object_name(o) for o in im_targets])
        dt = time.perf_counter() - t0
        ids = {object_name(o): o for o in [*im_targets, *absent]}
        recs = [_record(e, ids[e.object_name], False, use_depth) for e in ests]
        if absent:
            if self.options.max_instances == "targets":
                self.pipeline.max_instances = 1
            for e in self.pipeline(obs, objects=[object_name(o) for o in absent]):
                recs.append(_record(e, ids[e.object_name], True, use_depth))
        return ImageOutput(scene_id, im_id, dt, recs, list(absent), use_depth)


# worker-process state (``jobs`` > 1): one estimator per process, built by the pool initializer
_WORKER: dict[str, Any] = {}


def _worker_init(options: EvalOptions, cfg: OsopConfig, target_objs: list[int], threads: int) -> None:
    import torch

    from osop_ros.core.render import Renderer

    torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=logging.WARNING)
    ds = BopDataset(options.dataset, options.split, targets_file=options.targets_file)
    ren = Renderer()
    _WORKER["est"] = _Estimator(options, cfg, ds, target_objs, ren, None)


def _worker_run(item: tuple[int, int, dict[int, int], list[int]]) -> ImageOutput | None:
    return _WORKER["est"].estimate_image(*item)


def _absent_objects(ds_objs: list[int], present: set[int], n: int, seed: int, scene_id: int, im_id: int) -> list[int]:
    """``n`` objects of ``ds_objs`` not in ``present``, drawn deterministically per image."""
    cand = sorted(set(ds_objs) - present)
    if n <= 0 or not cand:
        return []
    rng = np.random.default_rng([seed, scene_id, im_id])
    return sorted(int(o) for o in rng.choice(cand, size=min(n, len(cand)), replace=False))


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


def run_eval(
    options: EvalOptions,
    stage_factory: StageFactory | None = None,
    renderer: Any | None = None,
    print_fn: Callable[[str], None] | None = print,
) -> EvalRun:
    """Estimate (unless ``options.results_csv``), write the CSV + JSON summary, evaluate. See module doc."""
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer

    options.validate()
    say = print_fn or (lambda s: None)
    t_start = time.perf_counter()
    cfg = options.resolved_config()
    modality = cfg.pipeline.modality
    ds = BopDataset(options.dataset, options.split, targets_file=options.targets_file)
    targets = ds.targets
    if options.objects:
        missing = sorted(set(options.objects) - set(ds.obj_ids))
        if missing:
            raise InvalidInputError(f"objects {missing} are not in {ds.models_dir / 'models_info.json'}")
        targets = [t for t in targets if t.obj_id in set(options.objects)]
    have_images = set(ds.images())
    dropped = [t for t in targets if (t.scene_id, t.im_id) not in have_images]
    if dropped:
        log.warning("%d targets refer to images that are not in the dataset; ignored", len(dropped))
        targets = [t for t in targets if (t.scene_id, t.im_id) in have_images]
    images = sorted({(t.scene_id, t.im_id) for t in targets})
    if options.max_images is not None:
        images = images[: options.max_images]
    im_set = set(images)
    targets = [t for t in targets if (t.scene_id, t.im_id) in im_set]
    if not targets:
        raise InvalidInputError(f"no estimation targets selected in {options.dataset} (objects={options.objects})")
    target_objs = sorted({t.obj_id for t in targets})
    # absent-object queries: objects of ``objects`` (else of the dataset) that are not in the image
    absent_pool = sorted(set(options.objects or ds.obj_ids)) if options.absent else []
    onboard_objs = sorted(set(target_objs) | set(absent_pool))
    oracle = tuple(sorted(set(options.oracle)))
    label = oracle_label(oracle)
    run_pipeline = options.results_csv is None
    if options.jobs > 1 and stage_factory is not None and run_pipeline:
        raise InvalidInputError("jobs > 1 builds the pipeline from the config in each worker; "
                                "a custom stage_factory needs jobs = 1")
    if run_pipeline and stage_factory is None:
        learned = _needed_learned(options)
        if learned and _weights_available(cfg):
            raise StageUnavailableError(
                f"learned {', '.join(n for n, _ in learned)} not available in this build (missing weights for "
                f"{', '.join(_weights_available(cfg))}); use --oracle mask,viewpoint and --correspondence transfer "
                "for the oracle/non-learned stages"
            )

    own_renderer = renderer is None
    ren = Renderer() if own_renderer else renderer
    est: _Estimator | None = None
    try:
        t0 = time.perf_counter()
        est = _Estimator(options, cfg, ds, onboard_objs, ren, stage_factory, build=run_pipeline)
        t_onboard = time.perf_counter() - t0

        by_image: dict[tuple[int, int], dict[int, int]] = {}
        for t in targets:
            by_image.setdefault((t.scene_id, t.im_id), {})[t.obj_id] = t.inst_count
        gt_objs: dict[tuple[int, int], set[int]] = {k: {g.obj_id for g in ds.gt(*k)} for k in images}
        items = [
            (s, i, by_image[(s, i)],
             _absent_objects(absent_pool, gt_objs[(s, i)], options.absent, options.seed, s, i))
            for s, i in images
        ]

        # ---- estimation ----
        frames: list[EvalFrame] = []
        outputs: dict[tuple[int, int], ImageOutput] = {}
        skipped_no_depth: list[tuple[int, int]] = []
        n_frames_depth = 0
        from tqdm import tqdm

        eval_images = []
        for s, i in images:
            if not ds.has_depth(s, i):
                if modality == "rgbd":
                    skipped_no_depth.append((s, i))
                    continue
            else:
                n_frames_depth += 1
            eval_images.append((s, i))
        loaded: dict[tuple[int, int], Any] = {}

        def eval_frame(s: int, i: int) -> EvalFrame:
            frame = ds.load_frame(s, i, with_depth=True)
            loaded[(s, i)] = frame
            return EvalFrame(s, i, frame.obs.camera.K, frame.obs.camera.width, frame.obs.camera.height,
                             frame.obs.depth, [EvalGt(g.obj_id, g.T_cam_obj, g.visib_fract) for g in frame.gts],
                             dict(by_image[(s, i)]))

        todo = [it for it in items if (it[0], it[1]) in set(eval_images)]
        workers = 0
        if run_pipeline and options.jobs > 1 and len(todo) > 1:
            from concurrent.futures import ProcessPoolExecutor
            from multiprocessing import get_context

            frames = [eval_frame(s, i) for s, i in eval_images]
            loaded.clear()
            threads = cfg.threads or max(1, (os.cpu_count() or 1) // options.jobs)
            workers = min(options.jobs, len(todo))
            with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                     initializer=_worker_init,
                                     initargs=(options, cfg, onboard_objs, threads)) as pool:
                futs = [pool.submit(_worker_run, it) for it in todo]
                for f in tqdm(futs, desc="eval", unit="img", disable=not options.progress, leave=False):
                    o = f.result()
                    if o is not None:
                        outputs[(o.scene_id, o.im_id)] = o
        else:
            if run_pipeline and todo:
                est.warm_up(todo[0][0], todo[0][1])
            for it in tqdm(todo, desc="eval", unit="img", disable=not options.progress, leave=False):
                s, i = it[0], it[1]
                frames.append(eval_frame(s, i))
                if run_pipeline:
                    o = est.estimate_image(*it, frame=loaded.pop((s, i)))
                    if o is not None:
                        outputs[(s, i)] = o
                loaded.pop((s, i), None)

        results: list[BopResult] = []
        times: list[float] = []
        if run_pipeline:
            for s, i in eval_images:  # deterministic order, whatever the worker scheduling
                o = outputs.get((s, i))
                if o is None:
                    continue
                times.append(o.time)
                for r in o.estimates:
                    if not r.absent:
                        results.append(BopResult(s, i, r.obj_id, r.score, r.T_cam_obj, o.time))
            csv_path = write_bop_csv(options.out, results)
        else:
            evaluated = {(f.scene_id, f.im_id) for f in frames}
            results = [r for r in read_bop_csv(options.results_csv) if (r.scene_id, r.im_id) in evaluated]
            csv_path = Path(options.results_csv)

        # ---- evaluation ----
        t0 = time.perf_counter()
        eval_models_dir = ds.root / "models_eval"
        eval_objects = {}
        for obj_id in target_objs:
            pts = est.models[obj_id].vertices.astype(np.float64)
            p_eval = eval_models_dir / f"obj_{obj_id:06d}.ply"
            if p_eval.is_file():
                pts = ObjectModel.load(p_eval, units="mm").vertices.astype(np.float64)
            eval_objects[obj_id] = EvalObject(
                pts, symmetry_transforms(ds.symmetries(obj_id), max_step_rad=0.01), ds.diameter(obj_id)
            )
        render_depth = make_render_depth(ren, est.keys) if options.vsd else None
        evaluator = PoseEvaluator(eval_objects, render_depth, EvalConfig())
        ests_eval = [EvalEstimate(r.scene_id, r.im_id, r.obj_id, r.score, r.T_cam_obj) for r in results]
        report = evaluator.evaluate(frames, ests_eval)
        records = _label_records(frames, outputs, eval_objects, results if not run_pipeline else None)
        t_eval = time.perf_counter() - t0
    finally:
        _release(est)
        if own_renderer:
            ren.release()

    threshold = cfg.pipeline.score_threshold
    n_targets_total = sum(t.inst_count for t in targets)
    m = report.to_dict()
    rd = report.recall_depth
    have_vsd = report.ar_bop is not None
    src = rd if have_vsd else report.recall
    pub = published_stats(records, report.n_targets, threshold)
    summary: dict[str, Any] = {
        "label": label or "no oracle",
        "AR": report.ar_bop,
        "AR_VSD": rd["vsd"] if have_vsd else None,
        "AR_MSSD": src["mssd"],
        "AR_MSPD": src["mspd"],
        "AR_scope": ("targets in frames with depth" if have_vsd else "all targets (no VSD: AR not computed)"),
        "published": pub,
        "oracle": list(oracle),
        "oracle_warning": (
            f"{label}: ground truth was used by these stages; the numbers measure the other stages "
            "only and are not comparable to real methods"
        )
        if oracle
        else None,
        "dataset": ds.summary(),
        "split": options.split,
        "modality": modality,
        "pipeline": asdict(cfg.pipeline) | {"correspondence": options.corr_mode},
        "weights_digest": est.digest,
        "stages": est.stage_names if run_pipeline else {"results_csv": str(options.results_csv)},
        "objects": target_objs,
        "images_selected": len(images),
        "images_evaluated": len(frames),
        "images_with_depth": n_frames_depth,
        "images_skipped_no_depth": len(skipped_no_depth),
        "targets_selected": n_targets_total,
        "estimates": len(results),
        "worker_processes": workers if run_pipeline else 0,
        "correct_criterion": f"MSSD < {CORRECT_MSSD_FRAC} x diameter (symmetry-aware), one estimate per GT instance",
        "metrics": m,
        "timing_s": {
            "per_image_mean": statistics.fmean(times) if times else None,
            "per_image_median": statistics.median(times) if times else None,
            "estimation_total": float(sum(times)),
            "per_stage_median": _stage_medians(outputs),
            "onboarding": t_onboard,
            "evaluation": t_eval,
            "total": time.perf_counter() - t_start,
        },
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(options).items()
            if k not in ("template_config", "solver_config", "config")
        },
        "csv": str(csv_path),
    }
    json_path = csv_path.with_suffix(".json") if run_pipeline else Path(options.out).with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if run_pipeline:
        feat_path = json_path.with_suffix(".features.jsonl")
        with open(feat_path, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(_jsonable(r)) + "\n")
        summary["features_jsonl"] = str(feat_path)
    from osop_ros.eval.calibration import choose_threshold, fit_and_save, plot_precision_recall, threshold_table

    if options.fit_calibration is not None:
        summary["calibration_fit"] = fit_and_save(records, options.fit_calibration, _provenance(summary))
    if options.pr_plot is not None:
        plot_precision_recall(records, report.n_targets, options.pr_plot, threshold,
                              title=f"{Path(options.dataset).name} ({modality})")
        summary["pr_plot"] = str(options.pr_plot)
    summary["threshold_table"] = threshold_table(records, report.n_targets)
    summary["threshold_for_precision_0.9"] = choose_threshold(records, report.n_targets)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(summary), indent=1))
    tmp.replace(json_path)
    summary["json"] = str(json_path)
    say(format_summary(summary))
    return EvalRun(summary, report, csv_path, json_path, results, records)


def _release(est: _Estimator | None) -> None:
    """Free the verifier renderers of an estimator's pipeline."""
    if est is not None and est.pipeline is not None and est.pipeline.verifier is not None:
        est.pipeline.verifier.release()


def _provenance(summary: dict[str, Any]) -> dict[str, Any]:
    import sys

    return {
        "dataset": summary["dataset"].get("root"),
        "split": summary["split"],
        "modality": summary["modality"],
        "objects": summary["objects"],
        "images_evaluated": summary["images_evaluated"],
        "absent_per_image": summary["options"].get("absent"),
        "weights_digest": summary["weights_digest"],
        "command": "osop " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("osop") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _stage_medians(outputs: dict[tuple[int, int], ImageOutput]) -> dict[str, float]:
    per: dict[str, list[float]] = {}
    for o in outputs.values():
        for r in o.estimates:
            if not r.absent:
                for k, v in r.timings.items():
                    per.setdefault(k, []).append(v)
    return {k: float(np.median(v)) for k, v in per.items()}


def _label_records(
    frames: list[EvalFrame],
    outputs: dict[tuple[int, int], ImageOutput],
    objects: dict[int, EvalObject],
    csv_results: list[BopResult] | None,
) -> list[dict[str, Any]]:
    """One dict per estimate (present targets and absent queries) with its correctness label; present
    targets without any estimate get a record with ``score`` None (counted as missed)."""
    records: list[dict[str, Any]] = []
    for fr in frames:
        key = (fr.scene_id, fr.im_id)
        if csv_results is not None:
            recs = [EstRecord(r.obj_id, r.score, r.T_cam_obj, False, "rgbd" if fr.depth is not None else "rgb",
                              {}, None, False, {}) for r in csv_results if (r.scene_id, r.im_id) == key]
            o = ImageOutput(fr.scene_id, fr.im_id, 0.0, recs, [], fr.depth is not None)
        else:
            o = outputs.get(key)
            if o is None:
                continue
        for obj_id in sorted(fr.targets):
            mine = [r for r in o.estimates if r.obj_id == obj_id and not r.absent]
            labels = label_estimates(fr, obj_id, [r.T_cam_obj for r in mine], [r.score for r in mine], objects[obj_id])
            for r, (err, ok) in zip(mine, labels, strict=True):
                records.append(_rec_dict(fr, r, err, ok))
                for fl in r.flips:  # hard negatives (fit only)
                    Tf = np.asarray(fl["T_cam_obj"], dtype=np.float64)
                    (ferr, fok), = label_estimates(fr, obj_id, [Tf], [r.score], objects[obj_id])
                    records.append({**_rec_dict(fr, dataclasses.replace(r, T_cam_obj=Tf, features=fl["features"],
                                                                        flips=[]), ferr, fok),
                                    "score": None, "score_raw": None, "fit_only": True})
            if not mine:
                records.append({"scene_id": fr.scene_id, "im_id": fr.im_id, "obj_id": obj_id, "absent": False,
                                "score": None, "correct": False, "mssd_rel": None})
        for q in o.absent_queries:
            mine = [r for r in o.estimates if r.obj_id == q and r.absent]
            for r in mine:
                records.append(_rec_dict(fr, r, None, False))
            if not mine:
                records.append({"scene_id": fr.scene_id, "im_id": fr.im_id, "obj_id": q, "absent": True,
                                "score": None, "correct": False, "mssd_rel": None})
    return records


def _rec_dict(fr: EvalFrame, r: EstRecord, err: float | None, ok: bool) -> dict[str, Any]:
    return {
        "scene_id": fr.scene_id, "im_id": fr.im_id, "obj_id": r.obj_id, "absent": r.absent, "score": r.score,
        "score_raw": r.score_raw, "calibrated": r.calibrated, "modality": r.modality, "correct": bool(ok),
        "mssd_rel": err, "features": r.features,
        "T_cam_obj": np.asarray(r.T_cam_obj).reshape(-1).tolist(),
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable report of :func:`run_eval` (oracle stages labelled on the first and last line)."""
    m = summary["metrics"]
    rec = m["recall"]
    lab = summary["label"]
    lines = []
    if summary["oracle"]:
        lines.append(f"*** {lab}: ground truth used by the {', '.join(summary['oracle'])} stage(s) ***")
    ds = summary["dataset"]
    lines.append(f"osop eval [{lab}] dataset={ds['root']} split={summary['split']} modality={summary['modality']}")
    if summary.get("stages"):
        lines.append("stages: " + ", ".join(f"{k}={v}" for k, v in summary["stages"].items()))
    pl = summary.get("pipeline") or {}
    if pl and "results_csv" not in summary.get("stages", {}):
        lines.append(
            f"pipeline: correspondence={pl.get('correspondence')} top_k={pl.get('top_k_templates')} "
            f"icp={pl.get('icp')} "
            f"verify={pl.get('verify')} max_instances={pl.get('max_instances')} "
            f"score_threshold={pl.get('score_threshold')} weights={summary.get('weights_digest')}"
        )
    lines.append(
        f"images: {summary['images_evaluated']} evaluated of {summary['images_selected']} selected "
        f"({summary['images_with_depth']} with depth, {summary['images_skipped_no_depth']} skipped for lack of depth)"
    )
    lines.append(
        f"targets: {m['n_targets']} instances evaluated ({m['n_targets_depth']} in frames with depth); "
        f"estimates used: {m['n_estimates']} of {summary['estimates']} written"
    )
    lines.append(f"{'obj':>6} {'n':>4} {'n_d':>4} {'MSSD':>6} {'MSPD':>6} {'VSD':>6} {'ADD':>6} {'ADD-S':>6}")
    for obj_id, r in m["per_object"].items():
        lines.append(
            f"{obj_id:>6} {r['n_targets']:>4} {r['n_targets_depth']:>4} {format_recall(r['mssd']):>6} "
            f"{format_recall(r['mspd']):>6} {format_recall(r['vsd']):>6} {format_recall(r['add']):>6} "
            f"{format_recall(r['adds']):>6}"
        )
    lines.append(
        f"{'all':>6} {m['n_targets']:>4} {m['n_targets_depth']:>4} {format_recall(rec['mssd']):>6} "
        f"{format_recall(rec['mspd']):>6} {format_recall(rec['vsd']):>6} {format_recall(rec['add']):>6} "
        f"{format_recall(rec['adds']):>6}   (ADD(-S)@0.1d: {format_recall(rec['add_s'])})"
    )
    lines.append(
        f"RGB AR = mean(MSSD, MSPD) over all {m['n_targets']} targets = {format_recall(m['ar_rgb'])}  [not the BOP AR]"
    )
    rd = m["recall_depth"]
    if m["ar_bop"] is not None:
        scope = "all" if m["ar_bop_covers_all_targets"] else f"only the {m['n_targets_depth']} of {m['n_targets']}"
        lines.append(
            f"BOP AR = mean(VSD, MSSD, MSPD) = {format_recall(m['ar_bop'])} over {scope} targets in frames with depth "
            f"(VSD {format_recall(rd['vsd'])}, MSSD {format_recall(rd['mssd'])}, MSPD {format_recall(rd['mspd'])})"
        )
    else:
        lines.append("BOP AR: n/a (no frame with depth, VSD unavailable)")
    pub = summary.get("published")
    if pub:
        lines.append(
            f"published (score >= {pub['threshold']:.2f}): {pub['n_published']} poses, {pub['n_correct']} correct "
            f"(MSSD < {CORRECT_MSSD_FRAC} d): precision {format_recall(pub['precision'])}, recall "
            f"{format_recall(pub['recall'])} of {pub['n_targets']} targets"
        )
        if pub["absent_queries"]:
            lines.append(
                f"absent objects: {pub['absent_queries']} queries, {pub['absent_published']} published a pose -> "
                f"no pose {format_recall(pub['absent_no_pose_rate'])} of the time; precision counting those as "
                f"wrong {format_recall(pub['precision_with_absent'])}"
            )
    tm = summary["timing_s"]
    if tm["per_image_mean"] is not None:
        stage = ", ".join(f"{k} {v:.3f}" for k, v in tm.get("per_stage_median", {}).items())
        lines.append(
            f"time: {tm['per_image_mean']:.3f} s/image mean, {tm['per_image_median']:.3f} median "
            f"(estimation {tm['estimation_total']:.1f} s); onboarding {tm['onboarding']:.1f} s, "
            f"evaluation {tm['evaluation']:.1f} s, total {tm['total']:.1f} s"
        )
        if stage:
            lines.append(f"per-instance stage medians (s): {stage}")
    if summary.get("calibration_fit"):
        cf = summary["calibration_fit"]
        lines.append(f"calibration written to {cf['path']}: " + "; ".join(
            f"{k}: n={v['n']} ({v['n_pos']} correct), log-loss {v['log_loss']:.3f}, AUC {format_recall(v['auc'])}"
            for k, v in cf["models"].items()))
    if summary.get("published") and summary.get("threshold_for_precision_0.9", "n/a") != "n/a":
        t = summary["threshold_for_precision_0.9"]
        lines.append("lowest threshold with published precision >= 0.9 (and absent no-pose >= 0.95): "
                     + ("none" if t is None else f"{t:.2f}"))
    if summary.get("pr_plot"):
        lines.append(f"precision/recall plot: {summary['pr_plot']}")
    lines.append(
        f"wrote {summary['csv']} and {summary.get('json', '(json)')}" + (f"  [{lab}]" if summary["oracle"] else "")
    )
    if summary["oracle"]:
        lines.append(f"*** {lab}: these numbers are NOT comparable to a real (non-oracle) method ***")
    return "\n".join(lines)
