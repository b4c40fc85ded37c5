"""Run the OSOP pipeline on a BOP dataset and score it with the BOP19 metrics.

``run_eval(EvalOptions(...), stage_factory=...)``:

1. reads the dataset (:class:`~osop_ros.data.bop.BopDataset`) and its targets (optionally filtered by
   object and limited to the first ``max_images`` images);
2. onboards every target object from the dataset's own models (millimetres) with a cached template bank;
3. builds a :class:`~osop_ros.core.pipeline.Pipeline`: ORACLE segmenter/matcher when asked
   (``oracle={"mask", "viewpoint"}``), else the learned stage from ``stage_factory``; correspondences by
   template transfer (or the learned stage when ``correspondence="learned"``); :class:`PoseSolver`;
4. estimates poses per image (RGB, or RGB-D on the frames that have depth), writes the BOP CSV, evaluates
   (VSD only on frames with depth) and writes a JSON summary next to the CSV.

Learned stages plug in through ``stage_factory(stage_name, context) -> stage | None`` with stage names
``"segmenter"``, ``"matcher"``, ``"correspondence"``; a needed stage the factory cannot provide raises
:class:`StageUnavailableError`.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from osop_ros.core.correspondence import TemplateTransferCorrespondences
from osop_ros.core.geometry import symmetry_transforms
from osop_ros.core.pipeline import Pipeline
from osop_ros.core.solver import PoseSolver, SolverConfig
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import InvalidInputError, Observation, OsopError
from osop_ros.data.bop import BopDataset, BopResult, read_bop_csv, write_bop_csv
from osop_ros.eval.metrics import (
    EvalConfig,
    EvalEstimate,
    EvalFrame,
    EvalGt,
    EvalObject,
    EvalReport,
    PoseEvaluator,
    format_recall,
    make_render_depth,
)
from osop_ros.eval.oracle import OracleFrame, OracleMatcher, OracleSegmenter

log = logging.getLogger(__name__)

ORACLE_CHOICES = ("mask", "viewpoint")
MODALITIES = ("rgb", "rgbd")
CORRESPONDENCE_CHOICES = ("transfer", "learned")


class StageUnavailableError(OsopError):
    """A learned stage was requested but no implementation is available."""


@dataclass
class EvalOptions:
    """What to evaluate. ``objects``: BOP obj ids (None = all targets). ``oracle``: subset of
    ``ORACLE_CHOICES``. ``results_csv``: evaluate this existing BOP CSV instead of running the pipeline."""

    dataset: Path
    split: str = "test"
    targets_file: Path | None = None
    objects: list[int] | None = None
    modality: str = "rgb"
    oracle: tuple[str, ...] = ()
    correspondence: str = "transfer"
    top_k: int = 1
    max_images: int | None = None
    out: Path = Path("results.csv")
    results_csv: Path | None = None
    cache_dir: Path | None = None
    template_config: Any | None = None  # TemplateConfig; None = default
    solver_config: SolverConfig | None = None
    vsd: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.modality not in MODALITIES:
            raise InvalidInputError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        bad = [o for o in self.oracle if o not in ORACLE_CHOICES]
        if bad:
            raise InvalidInputError(f"unknown oracle mode(s) {bad}; choose from {ORACLE_CHOICES}")
        if self.correspondence not in CORRESPONDENCE_CHOICES:
            raise InvalidInputError(f"correspondence must be one of {CORRESPONDENCE_CHOICES}")
        if self.top_k < 1:
            raise InvalidInputError(f"top_k must be >= 1, got {self.top_k}")
        if self.max_images is not None and self.max_images < 1:
            raise InvalidInputError(f"max_images must be >= 1, got {self.max_images}")


@dataclass
class StageContext:
    """Handed to ``stage_factory``: everything a learned stage may need to initialise."""

    dataset: BopDataset
    objects: list[OnboardedObject]
    renderer: Any
    options: EvalOptions


StageFactory = Callable[[str, StageContext], Any]


def default_stage_factory(device: str = "auto", weights_dir: Path | None = None) -> StageFactory | None:
    """Factory of the learned stages (shipped weights, or ``weights_dir/{segment,match,correspond}.pt``).

    Returns None when a weights file is missing, so ``osop eval`` says which stage is unavailable.
    Networks are loaded once, on first use.
    """
    from osop_ros.core.config import load_config

    weights = (
        {}
        if weights_dir is None
        else {s: str(Path(weights_dir) / f"{s}.pt") for s in ("segment", "match", "correspond")}
    )
    cfg = load_config({"device": device, "weights": weights})
    if not all(cfg.weight_path(s).is_file() for s in ("segment", "match", "correspond")):
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
        if name == "segmenter":
            return OneShotSegmenter(n.segnet, n.device)
        if name == "matcher":
            return TemplateMatcher(n.matchnet, n.device, top_k=ctx.options.top_k)
        if name == "correspondence":
            return DenseCorrespondence(n.corrnet, n.device)
        return None

    return factory


@dataclass
class EvalRun:
    """Result of :func:`run_eval`."""

    summary: dict[str, Any]
    report: EvalReport
    csv_path: Path
    json_path: Path
    results: list[BopResult] = field(default_factory=list)


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


def run_eval(
    options: EvalOptions,
    stage_factory: StageFactory | None = None,
    renderer: Any | None = None,
    print_fn: Callable[[str], None] | None = print,
) -> EvalRun:
    """Estimate (unless ``options.results_csv``), write the CSV + JSON summary, evaluate. See module doc."""
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer
    from osop_ros.core.templates import TemplateCache, TemplateConfig

    options.validate()
    say = print_fn or (lambda s: None)
    t_start = time.perf_counter()
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
    oracle = tuple(sorted(set(options.oracle)))
    label = oracle_label(oracle)
    if options.results_csv is None and stage_factory is None:
        learned = [
            n
            for n, needed in (
                ("segmenter", "mask" not in oracle),
                ("matcher", "viewpoint" not in oracle),
                ("correspondence", options.correspondence == "learned"),
            )
            if needed
        ]
        if learned:
            raise StageUnavailableError(
                f"learned {', '.join(learned)} not available in this build (no stage factory); use --oracle "
                f"mask,viewpoint and --correspondence transfer for the oracle/non-learned stages"
            )

    own_renderer = renderer is None
    ren = Renderer() if own_renderer else renderer
    try:
        # ---- models (all dataset objects: oracle occlusion + VSD) and onboarding of the targets ----
        t0 = time.perf_counter()
        models: dict[int, Any] = {}
        keys: dict[int, str] = {}
        for obj_id in ds.obj_ids:
            try:
                path = ds.model_path(obj_id)
            except OsopError:
                if obj_id in target_objs:
                    raise
                continue
            models[obj_id] = ObjectModel.load(
                path, units="mm", name=object_name(obj_id), symmetries=ds.models_info[obj_id]
            )
            keys[obj_id] = f"eval_{object_name(obj_id)}"
            ren.add_object(keys[obj_id], models[obj_id])
        t_models = time.perf_counter() - t0
        objects: list[OnboardedObject] = []
        t0 = time.perf_counter()
        if options.results_csv is None:
            cache = TemplateCache(options.cache_dir)
            tcfg = options.template_config or TemplateConfig()
            for obj_id in target_objs:
                bank = cache.get_or_build(models[obj_id], ren, tcfg, progress=options.progress)
                objects.append(
                    OnboardedObject(
                        name=object_name(obj_id),
                        model=models[obj_id],
                        bank=bank,
                        sym_Ts=symmetry_transforms(models[obj_id].symmetries),
                        obj_id=obj_id,
                    )
                )
        t_onboard = time.perf_counter() - t0

        # ---- estimation ----
        frames: list[EvalFrame] = []
        results: list[BopResult] = []
        times: list[float] = []
        skipped_no_depth: list[tuple[int, int]] = []
        n_frames_depth = 0
        stage_names: dict[str, str] = {}
        by_image: dict[tuple[int, int], dict[int, int]] = {}
        for t in targets:
            by_image.setdefault((t.scene_id, t.im_id), {})[t.obj_id] = t.inst_count
        pipeline = None
        oframe = OracleFrame(ren, keys)
        if options.results_csv is None:
            ctx = StageContext(ds, objects, ren, options)
            seg = (
                OracleSegmenter(oframe)
                if "mask" in oracle
                else _stage("segmenter", stage_factory, ctx, "pass --oracle mask to use ground-truth masks")
            )
            mat = (
                OracleMatcher(oframe, top_k=options.top_k)
                if "viewpoint" in oracle
                else _stage("matcher", stage_factory, ctx, "pass --oracle viewpoint to use GT viewpoints")
            )
            if options.correspondence == "learned":
                cor = _stage("correspondence", stage_factory, ctx, "use --correspondence transfer")
            else:
                cor = TemplateTransferCorrespondences(n_templates=options.top_k)
            solver = PoseSolver(options.solver_config)
            pipeline = Pipeline(objects, seg, mat, cor, solver)
            stage_names = {
                "segmenter": "ORACLE(mask)" if "mask" in oracle else type(seg).__name__,
                "matcher": "ORACLE(viewpoint)" if "viewpoint" in oracle else type(mat).__name__,
                "correspondence": type(cor).__name__,
                "solver": type(solver).__name__,
            }
        from tqdm import tqdm

        if pipeline is not None and images:  # warm-ups outside the timed loop (lazy imports, GL buffers)
            if options.modality == "rgbd":
                import open3d  # noqa: F401
            cam, _ = ds.camera(*images[0])
            ren.render(cam.K, cam.width, cam.height, [(keys[target_objs[0]], _warmup_pose(models[target_objs[0]]))])
        for s, i in tqdm(images, desc="eval", unit="img", disable=not options.progress, leave=False):
            im_targets = by_image[(s, i)]
            if not ds.has_depth(s, i):
                if options.modality == "rgbd":
                    skipped_no_depth.append((s, i))
                    continue
            else:
                n_frames_depth += 1
            frame = ds.load_frame(s, i, with_depth=True)
            depth = frame.obs.depth
            frames.append(
                EvalFrame(
                    s,
                    i,
                    frame.obs.camera.K,
                    frame.obs.camera.width,
                    frame.obs.camera.height,
                    depth,
                    [EvalGt(g.obj_id, g.T_cam_obj, g.visib_fract) for g in frame.gts],
                    dict(im_targets),
                )
            )
            if pipeline is None:
                continue
            obs = Observation(frame.obs.rgb, frame.obs.camera, depth if options.modality == "rgbd" else None)
            mv = [ds.mask_visib(s, i, g.gt_index) for g in frame.gts]
            oframe.set_frame(
                [(g.obj_id, g.T_cam_obj) for g in frame.gts], mv if all(m is not None for m in mv) else None
            )
            pipeline.max_instances = max(im_targets.values())
            t0 = time.perf_counter()
            ests = pipeline(obs, objects=[object_name(o) for o in im_targets])
            dt = time.perf_counter() - t0
            times.append(dt)
            name_to_id = {object_name(o): o for o in im_targets}
            for e in ests:
                results.append(BopResult(s, i, name_to_id[e.object_name], float(e.score), e.T_cam_obj, dt))
        if options.results_csv is not None:
            evaluated = {(f.scene_id, f.im_id) for f in frames}
            results = [r for r in read_bop_csv(options.results_csv) if (r.scene_id, r.im_id) in evaluated]
            csv_path = Path(options.results_csv)
        else:
            csv_path = write_bop_csv(options.out, results)

        # ---- evaluation ----
        t0 = time.perf_counter()
        eval_models_dir = ds.root / "models_eval"
        eval_objects = {}
        for obj_id in target_objs:
            pts = models[obj_id].vertices.astype(np.float64)
            p_eval = eval_models_dir / f"obj_{obj_id:06d}.ply"
            if p_eval.is_file():
                pts = ObjectModel.load(p_eval, units="mm").vertices.astype(np.float64)
            eval_objects[obj_id] = EvalObject(
                pts, symmetry_transforms(ds.symmetries(obj_id), max_step_rad=0.01), ds.diameter(obj_id)
            )
        render_depth = make_render_depth(ren, keys) if options.vsd else None
        evaluator = PoseEvaluator(eval_objects, render_depth, EvalConfig())
        ests_eval = [EvalEstimate(r.scene_id, r.im_id, r.obj_id, r.score, r.T_cam_obj) for r in results]
        report = evaluator.evaluate(frames, ests_eval)
        t_eval = time.perf_counter() - t0
    finally:
        if own_renderer:
            ren.release()

    n_targets_total = sum(t.inst_count for t in targets)
    summary: dict[str, Any] = {
        "label": label or "no oracle",
        "oracle": list(oracle),
        "oracle_warning": (
            f"{label}: ground truth was used by these stages; the numbers measure the other stages "
            "only and are not comparable to real methods"
        )
        if oracle
        else None,
        "dataset": ds.summary(),
        "split": options.split,
        "modality": options.modality,
        "stages": stage_names if options.results_csv is None else {"results_csv": str(options.results_csv)},
        "objects": target_objs,
        "images_selected": len(images),
        "images_evaluated": len(frames),
        "images_with_depth": n_frames_depth,
        "images_skipped_no_depth": len(skipped_no_depth),
        "targets_selected": n_targets_total,
        "estimates": len(results),
        "metrics": report.to_dict(),
        "timing_s": {
            "per_image_mean": statistics.fmean(times) if times else None,
            "per_image_median": statistics.median(times) if times else None,
            "estimation_total": float(sum(times)),
            "load_models": t_models,
            "onboarding": t_onboard,
            "evaluation": t_eval,
            "total": time.perf_counter() - t_start,
        },
        "options": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(options).items()
            if k not in ("template_config", "solver_config")
        },
        "csv": str(csv_path),
    }
    json_path = csv_path.with_suffix(".json") if options.results_csv is None else Path(options.out).with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = json_path.with_name(json_path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(summary), indent=1))
    tmp.replace(json_path)
    summary["json"] = str(json_path)
    say(format_summary(summary))
    return EvalRun(summary, report, csv_path, json_path, results)


def _warmup_pose(model: Any) -> np.ndarray:
    T = np.eye(4)
    T[2, 3] = 2.0 * float(model.diameter) + 0.1
    return T


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
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
    tm = summary["timing_s"]
    if tm["per_image_mean"] is not None:
        lines.append(
            f"time: {tm['per_image_mean']:.3f} s/image mean, {tm['per_image_median']:.3f} median "
            f"(estimation {tm['estimation_total']:.1f} s); onboarding {tm['onboarding']:.1f} s, "
            f"evaluation {tm['evaluation']:.1f} s, total {tm['total']:.1f} s"
        )
    lines.append(
        f"wrote {summary['csv']} and {summary.get('json', '(json)')}" + (f"  [{lab}]" if summary["oracle"] else "")
    )
    if summary["oracle"]:
        lines.append(f"*** {lab}: these numbers are NOT comparable to a real (non-oracle) method ***")
    return "\n".join(lines)
