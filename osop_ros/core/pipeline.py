"""The OSOP pipeline: segmentation -> template matching -> correspondences -> pose, per object."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from osop_ros.core.stages import (
    CorrespondenceEstimator,
    Matcher,
    OnboardedObject,
    PoseSolverStage,
    Segmenter,
)
from osop_ros.core.types import (
    InvalidInputError,
    Observation,
    PoseEstimate,
    PoseFailure,
    PoseHypothesis,
    SegmentationResult,
)

if TYPE_CHECKING:
    from osop_ros.core.config import OsopConfig, PipelineConfig
    from osop_ros.core.contour_refine import RgbContourRefine
    from osop_ros.core.depth_seg import DepthMaskRefiner
    from osop_ros.core.scale_search import RgbScaleSearch
    from osop_ros.core.symmetry import ColourSymmetrySearch
    from osop_ros.core.verify import ScoreCalibration, Verifier

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Refines the previous pose of an object in a new frame, or returns None to request the full pipeline."""

    def __call__(self, obs: Observation, obj: OnboardedObject, prev: PoseEstimate) -> PoseEstimate | None: ...


class Pipeline:
    """Chains the four stages in memory for every onboarded object.

    The stage objects are injected (learned networks, or oracles for ablations); ``objects`` are
    onboarded once and reused for every frame.

    With a ``verifier`` (:mod:`osop_ros.core.verify`), every hypothesis of the solver (instances x
    templates x initialisations) is rendered and compared with the observation, the
    ``refine_top_n`` best are refined by ICP and re-verified, and the best-verified one is returned
    with ``score`` = P(pose correct) from ``calibration`` (the raw verification score without one;
    ``diagnostics["score_calibrated"]`` says which). Assigning :attr:`config` (an :class:`OsopConfig`,
    as :func:`osop_ros.core.factory.build_pipeline` does) applies its ``pipeline`` verification keys.

    ``rgb_segmenter`` (optional) replaces ``segmenter`` for frames estimated without depth;
    ``scale_search`` (optional, with a verifier) moves the verified pose of such frames along its viewing
    ray to the best-verified distance (:mod:`osop_ros.core.scale_search`); ``contour_refine`` (optional, with
    a verifier) then pulls its rendered contour onto the image edges and keeps the refinement when it
    verifies better (:mod:`osop_ros.core.contour_refine`).
    """

    def __init__(
        self,
        objects: Sequence[OnboardedObject],
        segmenter: Segmenter,
        matcher: Matcher,
        correspondence: CorrespondenceEstimator,
        solver: PoseSolverStage,
        max_instances: int = 1,
        tracker: Tracker | None = None,
        modality: str = "auto",
        verifier: Verifier | None = None,
        calibration: ScoreCalibration | None = None,
        refine_top_n: int = 2,
        candidates: int = 1,
        depth_refiner: DepthMaskRefiner | None = None,
        symmetry_search: ColourSymmetrySearch | None = None,
        rgb_segmenter: Segmenter | None = None,
        scale_search: RgbScaleSearch | None = None,
        contour_refine: RgbContourRefine | None = None,
    ) -> None:
        if modality not in ("auto", "rgb", "rgbd"):
            raise InvalidInputError(f"modality must be auto|rgb|rgbd, got {modality!r}")
        self.modality = modality
        self.objects = list(objects)
        self.segmenter = segmenter
        self.rgb_segmenter = rgb_segmenter
        self.matcher = matcher
        self.correspondence = correspondence
        self.solver = solver
        self.max_instances = max_instances
        self.tracker = tracker
        self.verifier = verifier
        self.calibration = calibration
        self.refine_top_n = refine_top_n
        self.candidates = candidates
        self.depth_refiner = depth_refiner
        self.symmetry_search = symmetry_search
        self.scale_search = scale_search
        self.contour_refine = contour_refine
        self._config: OsopConfig | None = None
        self._last: dict[str, PoseEstimate] = {}

    @property
    def config(self) -> OsopConfig | None:
        """The configuration this pipeline was built from (None when assembled by hand)."""
        return self._config

    @config.setter
    def config(self, cfg: OsopConfig | None) -> None:
        self._config = cfg
        if cfg is not None:
            self.configure(cfg.pipeline, cfg.base_dir)

    def configure(self, p: PipelineConfig, base_dir: str = "") -> None:
        """Apply the verification keys of ``p`` (verify, verify_refine_top_n, verify_candidates, calibration,
        symmetry_search, rgb_scale_search, rgb_contour_refine) and ``depth_seg``."""
        from osop_ros.core.contour_refine import RgbContourRefine
        from osop_ros.core.depth_seg import DepthMaskRefiner
        from osop_ros.core.scale_search import RgbScaleSearch, ScaleSearchConfig
        from osop_ros.core.symmetry import ColourSymmetrySearch, SymmetrySearchConfig
        from osop_ros.core.verify import Verifier

        self.depth_refiner = DepthMaskRefiner() if p.depth_seg else None
        if p.verify:
            if self.verifier is None:
                self.verifier = Verifier()
            self.calibration = load_calibration(p.calibration, base_dir)
            self.symmetry_search = (
                ColourSymmetrySearch(self.verifier, SymmetrySearchConfig(
                    approx_tol_frac=p.symmetry_approx_tol, partial_quantile=p.symmetry_partial_quantile))
                if p.symmetry_search else None
            )
            if self.symmetry_search is not None:
                for obj in self.objects:
                    self.symmetry_search.prepare(obj)
            self.scale_search = (
                RgbScaleSearch(self.verifier, ScaleSearchConfig(p.rgb_scale_search, p.rgb_scale_steps))
                if p.rgb_scale_search > 0 else None
            )
            self.contour_refine = RgbContourRefine(self.verifier) if p.rgb_contour_refine else None
        else:
            if self.verifier is not None:
                self.verifier.release()
            self.verifier, self.calibration, self.symmetry_search, self.scale_search = None, None, None, None
            self.contour_refine = None
        self.refine_top_n = int(p.verify_refine_top_n)
        self.candidates = int(p.verify_candidates)

    def add_object(self, obj: OnboardedObject) -> None:
        """Register another onboarded object (replaces one with the same name)."""
        self.objects = [o for o in self.objects if o.name != obj.name] + [obj]
        if self.symmetry_search is not None:
            self.symmetry_search.prepare(obj)

    def __call__(self, obs: Observation, objects: Sequence[str] | None = None) -> list[PoseEstimate]:
        """Estimate poses of every (or the named) object in ``obs``; failures are logged, not raised."""
        obs.validate()
        if self.modality == "rgb" and obs.depth is not None:
            obs = Observation(obs.rgb, obs.camera, None)
        elif self.modality == "rgbd" and obs.depth is None:
            raise InvalidInputError("pipeline modality is rgbd but the observation has no depth image")
        out: list[PoseEstimate] = []
        for obj in self.objects:
            if objects is not None and obj.name not in objects:
                continue
            out.extend(self.estimate_object(obs, obj))
        return out

    def reset_tracking(self) -> None:
        """Forget previous poses (next frame runs the full pipeline)."""
        self._last.clear()

    def estimate_object(self, obs: Observation, obj: OnboardedObject) -> list[PoseEstimate]:
        """All instances of one object; each estimate carries per-stage diagnostics and timings.

        With a tracker and a previous pose, ICP-only tracking is tried first (single instance); when it
        fails the four stages run as usual.
        """
        if self.tracker is not None and obj.name in self._last:
            tracked = self.tracker(obs, obj, self._last[obj.name])
            if tracked is not None:
                self._last[obj.name] = tracked
                return [tracked]
            del self._last[obj.name]
        estimates = self._full(obs, obj)
        if self.tracker is not None and estimates:
            self._last[obj.name] = estimates[0]
        return estimates

    def _full(self, obs: Observation, obj: OnboardedObject) -> list[PoseEstimate]:
        t0 = time.perf_counter()
        segmenter = self.rgb_segmenter if obs.depth is None and self.rgb_segmenter is not None else self.segmenter
        segs = segmenter(obs, obj)
        t_seg = time.perf_counter() - t0
        n = self.max_instances if self.verifier is None else max(self.max_instances, self.candidates)
        shared = {"segment": t_seg}
        if self.depth_refiner is not None and obs.depth is not None:
            t0 = time.perf_counter()
            segs = self.depth_refiner(segs[: n + 1], obs.depth, obs.camera.K)
            shared["depth_seg"] = time.perf_counter() - t0
        estimates = [e for seg in segs[:n] if (e := self._instance(obs, obj, seg, shared)) is not None]
        if self.verifier is not None and len(estimates) > 1:
            estimates.sort(key=lambda e: -e.score)
            estimates = _drop_duplicates(estimates, float(obj.model.diameter))[: self.max_instances]
        return estimates

    def _instance(
        self, obs: Observation, obj: OnboardedObject, seg: SegmentationResult, shared: dict[str, float]
    ) -> PoseEstimate | None:
        """Stages 2-4 (+ verification) for one stage-1 instance; None when the solver finds no pose."""
        timings = dict(shared)
        diag: dict = {"mask_area": int(seg.mask.sum()), "seg_score": float(seg.score)}
        if seg.rank_score is not None:
            diag["seg_rank_score"] = float(seg.rank_score)
        if seg.rank_margin is not None:
            diag["seg_rank_margin"] = float(seg.rank_margin)
        t = time.perf_counter()
        match = self.matcher(obs, seg, obj)
        timings["match"] = time.perf_counter() - t
        diag["template_ids"] = [int(i) for i in match.template_ids]
        diag["match_scores"] = [float(s) for s in match.scores]
        t = time.perf_counter()
        corrs = self.correspondence(obs, seg, match, obj)
        timings["correspond"] = time.perf_counter() - t
        diag["n_correspondences"] = [len(c) for c in corrs]
        verify = self.verifier is not None
        propose = getattr(self.solver, "propose", None) if verify else None
        t = time.perf_counter()
        try:
            hyps = propose(obs, seg, corrs, obj) if propose is not None else self.solver(obs, seg, corrs, obj)
        except PoseFailure as exc:
            timings["solve"] = time.perf_counter() - t
            log.debug("%s: no pose (%s)", obj.name, exc.reason)
            return None
        timings["solve"] = time.perf_counter() - t
        if not hyps:
            return None
        best = hyps[0]
        score = float(best.score)
        if verify:
            best, score = self._verify(obs, seg, obj, match.scores, hyps, propose is not None, diag, timings)
        diag.update({"inliers": best.inliers, **best.info})
        timings["total"] = sum(timings.values())
        return PoseEstimate(obj.name, best.T_cam_obj, score, diagnostics=diag, timings=timings)

    def _verify(
        self,
        obs: Observation,
        seg: SegmentationResult,
        obj: OnboardedObject,
        match_scores: np.ndarray,
        hyps: list[PoseHypothesis],
        refine: bool,
        diag: dict[str, Any],
        timings: dict[str, float],
    ) -> tuple[PoseHypothesis, float]:
        """Verified best hypothesis (ICP-refined when the solver can) and its published score."""
        from osop_ros.core.verify import Selected, flip_margins, model_flips, nonsymmetric_flips, select_hypothesis

        assert self.verifier is not None
        t = time.perf_counter()
        t_refine = [0.0]
        solver_refine = getattr(self.solver, "refine", None) if refine else None

        def do_refine(h: PoseHypothesis) -> PoseHypothesis | None:
            t1 = time.perf_counter()
            try:
                return solver_refine(obs, seg, h, obj) if solver_refine is not None else None
            finally:
                t_refine[0] += time.perf_counter() - t1

        def extra(h: PoseHypothesis) -> dict[str, float]:
            i = int(h.info.get("corr_set", 0))
            ms = float(match_scores[i]) if 0 <= i < len(match_scores) else float("nan")
            return {"seg_score": float(seg.score), "match_score": ms, "seg_rank": _num(seg.rank_score),
                    "seg_margin": _num(seg.rank_margin)}

        uses_depth = getattr(self.solver, "uses_depth", None)
        depth_used = obs.depth is not None and (uses_depth is None or uses_depth(obs))
        vobs = obs if depth_used else Observation(obs.rgb, obs.camera, None)
        vc = self.verifier.config
        modality = "rgbd" if depth_used else "rgb"
        need_margin = self.calibration is not None and self.calibration.uses("flip_margin", modality)
        flips = model_flips(obj) if (vc.flip_top_n > 0 or vc.report_flips or need_margin) else []
        sel = select_hypothesis(self.verifier, vobs, seg, obj, hyps, do_refine if solver_refine else None,
                                self.refine_top_n, extra, flips=flips if vc.flip_top_n > 0 else ())
        assert sel is not None
        if self.scale_search is not None and not depth_used:
            t1 = time.perf_counter()
            sc = self.scale_search(vobs, seg, obj, sel.hypothesis.T_cam_obj, extra(sel.hypothesis))
            diag["rgb_scale"] = round(sc.scale, 4)
            if sc.scale != 1.0:
                h = PoseHypothesis(sc.T_cam_obj, sel.hypothesis.score, sel.hypothesis.inliers,
                                   {**sel.hypothesis.info, "rgb_scale": sc.scale})
                sel = Selected(h, sc.verification, sel.candidates, sel.refined)
            timings["scale"] = time.perf_counter() - t1
        if self.contour_refine is not None and not depth_used:
            t1 = time.perf_counter()
            cc = self.contour_refine(vobs, seg, obj, sel.hypothesis.T_cam_obj, extra(sel.hypothesis))
            diag["rgb_contour"] = {"refined": cc.verification is not None, "points": cc.result.n_points,
                                   "residual_px": None if cc.result.residual_px != cc.result.residual_px
                                   else round(cc.result.residual_px, 3)}
            if cc.verification is not None:
                hy = sel.hypothesis
                h = PoseHypothesis(cc.T_cam_obj, hy.score, hy.inliers, dict(hy.info))
                sel = Selected(h, cc.verification, sel.candidates, sel.refined)
            timings["contour"] = time.perf_counter() - t1
        if self.symmetry_search is not None:
            t1, refine_before = time.perf_counter(), t_refine[0]
            choice = self.symmetry_search(vobs, seg, obj, sel.hypothesis.T_cam_obj, depth_used)
            diag["symmetry_search"] = {"candidates": choice.n_candidates, "switched": choice.switched,
                                       "gain": None if choice.gain != choice.gain else round(choice.gain, 4)}
            if choice.switched:
                h = PoseHypothesis(choice.T_cam_obj, sel.hypothesis.score, sel.hypothesis.inliers,
                                   {**sel.hypothesis.info, "symmetry_switched": True})
                if choice.approximate:  # a near-symmetric twin: ICP first, kept only if it fits about as well
                    h = (do_refine(h) if solver_refine is not None else None) or h
                v = self.verifier.verify(vobs, seg, obj, h.T_cam_obj, depth_used, extra(h))
                cfg = self.symmetry_search.config
                if not choice.approximate or v.raw >= sel.verification.raw - cfg.approx_max_raw_drop:
                    sel = Selected(h, v, sel.candidates, sel.refined)
                else:
                    diag["symmetry_search"]["switched"] = False
                diag["symmetry_search"]["approximate"] = choice.approximate
            timings["symmetry"] = time.perf_counter() - t1 - (t_refine[0] - refine_before)
        feats = dict(sel.verification.features)
        if vc.report_flips or need_margin:
            # the chosen pose against its flips (all three reported as hard negatives for calibration fitting
            # in eval; only the non-symmetric ones are needed for flip_margin)
            T = sel.hypothesis.T_cam_obj
            nonsym = nonsymmetric_flips(obj)
            todo = range(len(flips)) if vc.report_flips else nonsym
            fver = {i: self.verifier.verify(vobs, seg, obj, T @ flips[i], depth_used, extra(sel.hypothesis))
                    for i in todo}
            raws = [sel.verification.raw] + [fver[i].raw if i in fver else float("nan") for i in range(len(flips))]
            margins = flip_margins(raws, nonsym)
            feats["flip_margin"] = margins[0]
            if vc.report_flips:
                diag["verify_flips"] = [
                    {"T_cam_obj": (T @ flips[i]).tolist(),
                     "features": {**fver[i].features, "flip_margin": margins[i + 1]}}
                    for i in range(len(flips))
                ]
        timings["refine"] = t_refine[0]
        timings["verify"] = (
            time.perf_counter() - t - t_refine[0] - timings.get("symmetry", 0.0) - timings.get("scale", 0.0)
            - timings.get("contour", 0.0)
        )
        p = self.calibration.probability(feats, modality) if self.calibration is not None else None
        diag.update({
            "verify": {k: (None if v != v else float(v)) for k, v in feats.items()},
            "verify_candidates": [round(v, 4) for v in sel.candidates],
            "verify_refined": sel.refined,
            "verify_modality": modality,
            "score_raw": float(sel.verification.raw),
            "score_solver": float(sel.hypothesis.score),
            "score_calibrated": p is not None,
        })
        return sel.hypothesis, float(sel.verification.raw if p is None else p)


def _num(v: float | None) -> float:
    """``v`` as a float, NaN for None (a feature the segmenter does not provide)."""
    return float("nan") if v is None else float(v)


def _drop_duplicates(estimates: list[PoseEstimate], diameter: float) -> list[PoseEstimate]:
    """Keep the best-scored of estimates whose positions are closer than half the diameter (sorted input)."""
    kept: list[PoseEstimate] = []
    for e in estimates:
        if all(np.linalg.norm(e.t - k.t) >= 0.5 * diameter for k in kept):
            kept.append(e)
    return kept


def default_calibration_path() -> Path:
    """The shipped ``config/score_calibration.yaml`` (source tree or ament share directory)."""
    from osop_ros.core.config import package_share_dir

    return package_share_dir() / "config" / "score_calibration.yaml"


def load_calibration(spec: str, base_dir: str = "") -> ScoreCalibration | None:
    """``pipeline.calibration``: "" = the shipped file (None, with a warning, when it is missing),
    "none" = no calibration, else a YAML/JSON path (InvalidInputError when unreadable)."""
    from osop_ros.core.config import resolve_path
    from osop_ros.core.verify import ScoreCalibration

    if spec.strip().lower() == "none":
        return None
    if not spec:
        path = default_calibration_path()
        if not path.is_file():
            log.warning("no score calibration at %s: published scores are uncalibrated verification scores", path)
            return None
        return ScoreCalibration.load(path)
    return ScoreCalibration.load(resolve_path(spec, Path(base_dir) if base_dir else None))
