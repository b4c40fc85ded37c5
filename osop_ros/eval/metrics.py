"""BOP19 pose-error functions and recall scores (VSD, MSSD, MSPD -> AR), plus ADD / ADD-S.

Definitions follow the BOP toolkit (Hodan et al., ECCV'18 / BOP Challenge 2019), in metres:

* VSD: depth images rendered in the estimated and GT poses are converted to *distance* images; visibility
  masks use the test distance image with tolerance ``delta`` (15 mm), "bop19" mode (pixels without test
  depth count as visible); error per tau = (#inter pixels with |d_est - d_gt| >= tau*diameter
  + #union-not-inter pixels) / #union; 1 when the union is empty or the projected bounding spheres do not
  overlap. taus = 0.05..0.5 x diameter; correct when error < theta, theta = 0.05..0.5.
* MSSD: max over model vertices of the 3D distance, min over symmetries; correct if < th x diameter
  (th = 0.05..0.5); infinite when the translations differ by >= diameter.
* MSPD: max 2D distance of projected vertices, min over symmetries, times 640 / image width; correct if
  < 5..50 px.
* Matching (per image and object): the ``inst_count`` highest-scored estimates are greedily matched in
  order of decreasing score to the not-yet-matched valid GT instance with the lowest error below the
  threshold. Valid GT instances: the ``inst_count`` most visible instances of each target object
  (visib_gt_min = -1, as in BOP19) or those with visib_fract >= visib_gt_min. Recall = matched / targets;
  the average recall of a metric is the mean over its thresholds (and taus for VSD); AR = mean of the three.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from osop_ros.core.types import InvalidInputError

RenderDepthFn = Callable[[int, np.ndarray, np.ndarray, int, int], np.ndarray]
"""``render_depth(obj_id, T_cam_obj (4, 4) m, K (3, 3), width, height) -> depth (H, W) float metres, 0 = empty``."""

VSD_DELTA = 0.015
FRACTION_THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 11))  # 0.05 .. 0.5
MSPD_THRESHOLDS_PX = tuple(float(5 * i) for i in range(1, 11))  # 5 .. 50 px
ADD_THRESHOLD = 0.1


# --------------------------------------------------------------------------------------------------
# Error functions
# --------------------------------------------------------------------------------------------------


def depth_to_distance(depth: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(H, W) depth (z) -> distance from the camera centre, same units; 0 stays 0."""
    h, w = depth.shape
    xs = (np.arange(w, dtype=np.float64) - K[0, 2]) / K[0, 0]
    ys = (np.arange(h, dtype=np.float64) - K[1, 2]) / K[1, 1]
    scale = np.sqrt(1.0 + xs[None, :] ** 2 + ys[:, None] ** 2)
    return depth.astype(np.float64) * scale


def spheres_projections_overlap(radius: float, c1: np.ndarray, c2: np.ndarray) -> bool:
    """Approximate test whether the image projections of two spheres (centres c1, c2 in camera) overlap."""
    if c1[2] == 0 or c2[2] == 0:
        return False
    d = np.linalg.norm(c1[:2] / c1[2] - c2[:2] / c2[2])
    return bool(d < radius * (1.0 / c1[2] + 1.0 / c2[2]))


def vsd_from_depths(
    depth_est: np.ndarray,
    depth_gt: np.ndarray,
    depth_test: np.ndarray,
    K: np.ndarray,
    diameter: float,
    delta: float = VSD_DELTA,
    taus: Sequence[float] = FRACTION_THRESHOLDS,
    normalized_by_diameter: bool = True,
) -> np.ndarray:
    """VSD errors (len(taus),) from rendered depths of the estimate/GT and the test depth (all metres)."""
    dist_test = depth_to_distance(depth_test, K)
    dist_gt = depth_to_distance(depth_gt, K)
    dist_est = depth_to_distance(depth_est, K)
    visib_gt = ((dist_gt - dist_test <= delta) | (dist_test == 0)) & (dist_gt > 0)
    visib_est = ((dist_est - dist_test <= delta) | (dist_test == 0)) & (dist_est > 0)
    visib_est |= visib_gt & (dist_est > 0)
    inter = visib_gt & visib_est
    union_count = int((visib_gt | visib_est).sum())
    if union_count == 0:
        return np.ones(len(taus))
    comp_count = union_count - int(inter.sum())
    dists = np.abs(dist_gt[inter] - dist_est[inter])
    if normalized_by_diameter:
        dists = dists / diameter
    return np.array([(np.count_nonzero(dists >= tau) + comp_count) / float(union_count) for tau in taus])


def vsd(
    T_est: np.ndarray,
    T_gt: np.ndarray,
    depth_test: np.ndarray,
    K: np.ndarray,
    render_depth: RenderDepthFn,
    obj_id: int,
    diameter: float,
    delta: float = VSD_DELTA,
    taus: Sequence[float] = FRACTION_THRESHOLDS,
    normalized_by_diameter: bool = True,
) -> np.ndarray:
    """Visible Surface Discrepancy for each tau (see module doc). depth_test (H, W) metres."""
    if not spheres_projections_overlap(0.5 * diameter, T_est[:3, 3], T_gt[:3, 3]):
        return np.ones(len(taus))
    h, w = depth_test.shape
    d_est = render_depth(obj_id, T_est, K, w, h)
    d_gt = render_depth(obj_id, T_gt, K, w, h)
    return vsd_from_depths(d_est, d_gt, depth_test, K, diameter, delta, taus, normalized_by_diameter)


def _transform(T: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ T[:3, :3].T + T[:3, 3]


def _project(K: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p[:, :2] / p[:, 2:3] * np.array([K[0, 0], K[1, 1]]) + np.array([K[0, 2], K[1, 2]])


def mssd(T_est: np.ndarray, T_gt: np.ndarray, pts: np.ndarray, sym_Ts: Sequence[np.ndarray]) -> float:
    """Maximum Symmetry-aware Surface Distance (metres). ``sym_Ts`` include the identity."""
    p_est = _transform(T_est, pts)
    return float(min(np.linalg.norm(p_est - _transform(T_gt @ S, pts), axis=1).max() for S in sym_Ts))


def mspd(
    T_est: np.ndarray, T_gt: np.ndarray, K: np.ndarray, pts: np.ndarray, sym_Ts: Sequence[np.ndarray]
) -> float:
    """Maximum Symmetry-aware Projection Distance (pixels, not normalised by image width)."""
    uv_est = _project(K, _transform(T_est, pts))
    return float(min(np.linalg.norm(uv_est - _project(K, _transform(T_gt @ S, pts)), axis=1).max() for S in sym_Ts))


def add(T_est: np.ndarray, T_gt: np.ndarray, pts: np.ndarray) -> float:
    """Average Distance of model points (metres)."""
    return float(np.linalg.norm(_transform(T_est, pts) - _transform(T_gt, pts), axis=1).mean())


def adds(T_est: np.ndarray, T_gt: np.ndarray, pts: np.ndarray) -> float:
    """ADD-S / ADI: mean distance from each GT-posed point to the closest estimated-posed point (metres)."""
    from scipy.spatial import cKDTree

    d, _ = cKDTree(_transform(T_est, pts)).query(_transform(T_gt, pts), k=1)
    return float(np.mean(d))


# --------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------


def match_greedy(
    scores: Sequence[float],
    errors: np.ndarray,
    threshold: float,
    gt_valid: Sequence[bool] | None = None,
    max_ests: int = 0,
) -> list[tuple[int, int]]:
    """Greedy matching of estimates to GT instances (BOP toolkit ``match_poses``).

    scores (E,), errors (E, G) (inf = not comparable), gt_valid (G,) bool. Estimates are visited by
    decreasing score (stable for ties); each takes the unmatched valid GT with the lowest error
    ``< threshold``. Returns [(est_index, gt_index)] of the matches.
    """
    errors = np.asarray(errors, dtype=np.float64).reshape(len(scores), -1)
    n_gt = errors.shape[1]
    valid = np.ones(n_gt, dtype=bool) if gt_valid is None else np.asarray(gt_valid, dtype=bool)
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
    if max_ests > 0:
        order = order[:max_ests]
    matched: set[int] = set()
    out = []
    for e in order:
        best_g, best_err = -1, threshold
        for g in range(n_gt):
            if not valid[g] or g in matched:
                continue
            if errors[e, g] < best_err:
                best_g, best_err = g, errors[e, g]
        if best_g >= 0:
            matched.add(best_g)
            out.append((e, best_g))
    return out


def valid_gt_mask(
    gt_obj_ids: Sequence[int],
    gt_visib: Sequence[float],
    target_counts: Mapping[int, int],
    visib_gt_min: float = -1.0,
) -> np.ndarray:
    """(G,) bool: which GT instances of one image are evaluation targets (see module doc)."""
    n = len(gt_obj_ids)
    valid = np.zeros(n, dtype=bool)
    if visib_gt_min >= 0:
        for g in range(n):
            valid[g] = gt_obj_ids[g] in target_counts and gt_visib[g] >= visib_gt_min
        return valid
    todo = dict(target_counts)
    for g in sorted(range(n), key=lambda g: -float(gt_visib[g])):
        o = gt_obj_ids[g]
        if todo.get(o, 0) > 0:
            valid[g] = True
            todo[o] -= 1
    return valid


# --------------------------------------------------------------------------------------------------
# Evaluation over a set of frames
# --------------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Thresholds (BOP19 defaults)."""

    vsd_delta: float = VSD_DELTA
    vsd_taus: tuple[float, ...] = FRACTION_THRESHOLDS
    vsd_thetas: tuple[float, ...] = FRACTION_THRESHOLDS
    mssd_thresholds: tuple[float, ...] = FRACTION_THRESHOLDS
    mspd_thresholds_px: tuple[float, ...] = MSPD_THRESHOLDS_PX
    add_threshold: float = ADD_THRESHOLD
    visib_gt_min: float = -1.0


@dataclass
class EvalObject:
    """What the metrics need about one object: model points (N, 3) metres (mesh vertices), symmetry
    transforms incl. identity, diameter (metres, from models_info)."""

    pts: np.ndarray
    sym_Ts: list[np.ndarray]  # noqa: N815 (frame-style name used project-wide)
    diameter: float


@dataclass
class EvalGt:
    obj_id: int
    T_cam_obj: np.ndarray
    visib_fract: float = 1.0


@dataclass
class EvalFrame:
    """One image: intrinsics, size, test depth (metres) or None, all GT instances, targets {obj_id: inst_count}."""

    scene_id: int
    im_id: int
    K: np.ndarray
    width: int
    height: int
    depth: np.ndarray | None
    gts: list[EvalGt]
    targets: dict[int, int]


@dataclass
class EvalEstimate:
    scene_id: int
    im_id: int
    obj_id: int
    score: float
    T_cam_obj: np.ndarray


@dataclass
class _Acc:
    """True-positive counters: per metric an array over thresholds (VSD: taus x thetas)."""

    n: int = 0
    tp: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, name: str, v: np.ndarray) -> None:
        self.tp[name] = self.tp.get(name, np.zeros_like(v, dtype=np.float64)) + v


@dataclass
class EvalReport:
    """Recalls (fractions) of one evaluation.

    recall:        metric -> average recall over all targets (VSD: over targets in frames with depth).
    recall_depth:  metric -> average recall over the targets in frames with depth only.
    per_object:    obj_id -> {metric: recall, "n_targets", "n_targets_depth"}.
    ar_rgb:        mean(MSSD, MSPD) over all targets (labelled "RGB AR", not the BOP AR).
    ar_bop:        mean(VSD, MSSD, MSPD) over the targets in frames with depth (None if no depth).
    curves:        metric -> recall per threshold (VSD: (taus, thetas)).
    """

    n_targets: int
    n_targets_depth: int
    n_estimates: int
    recall: dict[str, float | None]
    recall_depth: dict[str, float | None]
    per_object: dict[int, dict[str, Any]]
    ar_rgb: float
    ar_bop: float | None
    curves: dict[str, list]

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_targets": self.n_targets,
            "n_targets_depth": self.n_targets_depth,
            "n_estimates": self.n_estimates,
            "recall": self.recall,
            "recall_depth": self.recall_depth,
            "per_object": {str(k): v for k, v in self.per_object.items()},
            "ar_rgb": self.ar_rgb,
            "ar_rgb_definition": "mean(MSSD recall, MSPD recall) over all targets (not the BOP AR)",
            "ar_bop": self.ar_bop,
            "ar_bop_definition": "mean(VSD, MSSD, MSPD recalls) over the targets in frames with depth",
            "ar_bop_covers_all_targets": self.n_targets_depth == self.n_targets,
            "curves": self.curves,
        }


class PoseEvaluator:
    """Computes BOP19 recalls of pose estimates against GT frames.

    objects:      obj_id -> :class:`EvalObject`.
    render_depth: depth renderer for VSD (None: VSD skipped everywhere).
    """

    METRICS = ("vsd", "mssd", "mspd", "add", "adds", "add_s")

    def __init__(
        self,
        objects: Mapping[int, EvalObject],
        render_depth: RenderDepthFn | None = None,
        config: EvalConfig | None = None,
    ) -> None:
        self.objects = dict(objects)
        self.render_depth = render_depth
        self.config = config or EvalConfig()

    def _errors(
        self, frame: EvalFrame, obj_id: int, ests: list[EvalEstimate], gt_idx: list[int]
    ) -> dict[str, np.ndarray]:
        """Error matrices (E, G) per metric (VSD: (E, G, n_taus)); normalised as the thresholds expect."""
        c = self.config
        ob = self.objects[obj_id]
        E, G = len(ests), len(gt_idx)
        out = {
            "mssd": np.full((E, G), np.inf),
            "mspd": np.full((E, G), np.inf),
            "add": np.full((E, G), np.inf),
            "adds": np.full((E, G), np.inf),
        }
        do_vsd = frame.depth is not None and self.render_depth is not None
        if do_vsd:
            out["vsd"] = np.ones((E, G, len(c.vsd_taus)))
        gt_depth: dict[int, np.ndarray] = {}
        for e, est in enumerate(ests):
            Te = est.T_cam_obj
            est_depth = None
            for j, g in enumerate(gt_idx):
                Tg = frame.gts[g].T_cam_obj
                if np.linalg.norm(Te[:3, 3] - Tg[:3, 3]) < ob.diameter:  # spheres overlap (as the toolkit)
                    out["mssd"][e, j] = mssd(Te, Tg, ob.pts, ob.sym_Ts) / ob.diameter
                    out["add"][e, j] = add(Te, Tg, ob.pts) / ob.diameter
                    out["adds"][e, j] = adds(Te, Tg, ob.pts) / ob.diameter
                if Te[2, 3] > 0:
                    out["mspd"][e, j] = mspd(Te, Tg, frame.K, ob.pts, ob.sym_Ts) * 640.0 / frame.width
                if do_vsd and spheres_projections_overlap(0.5 * ob.diameter, Te[:3, 3], Tg[:3, 3]):
                    assert self.render_depth is not None and frame.depth is not None
                    if est_depth is None:
                        est_depth = self.render_depth(obj_id, Te, frame.K, frame.width, frame.height)
                    if g not in gt_depth:
                        gt_depth[g] = self.render_depth(obj_id, Tg, frame.K, frame.width, frame.height)
                    out["vsd"][e, j] = vsd_from_depths(
                        est_depth, gt_depth[g], frame.depth, frame.K, ob.diameter, c.vsd_delta, c.vsd_taus
                    )
        sym = len(ob.sym_Ts) > 1
        out["add_s"] = out["adds"] if sym else out["add"]
        return out

    def evaluate(self, frames: Iterable[EvalFrame], estimates: Sequence[EvalEstimate]) -> EvalReport:
        """Match ``estimates`` to the targets of ``frames`` and compute recalls (see module doc)."""
        c = self.config
        by_im: dict[tuple[int, int, int], list[EvalEstimate]] = {}
        for est in estimates:
            by_im.setdefault((est.scene_id, est.im_id, est.obj_id), []).append(est)
        acc_all: dict[int, _Acc] = {}  # per object, all targets
        acc_dep: dict[int, _Acc] = {}  # per object, targets in frames with depth
        n_est_used = 0
        for frame in frames:
            gt_obj = [g.obj_id for g in frame.gts]
            valid = valid_gt_mask(gt_obj, [g.visib_fract for g in frame.gts], frame.targets, c.visib_gt_min)
            for obj_id, inst_count in sorted(frame.targets.items()):
                if obj_id not in self.objects:
                    raise InvalidInputError(f"no evaluation model for object {obj_id}")
                gt_idx = [g for g in range(len(frame.gts)) if gt_obj[g] == obj_id]
                n_tar = int(valid[gt_idx].sum()) if gt_idx else 0
                ests = sorted(by_im.get((frame.scene_id, frame.im_id, obj_id), []), key=lambda e: -e.score)
                ests = ests[:inst_count]
                n_est_used += len(ests)
                accs = [acc_all.setdefault(obj_id, _Acc())]
                if frame.depth is not None:
                    accs.append(acc_dep.setdefault(obj_id, _Acc()))
                for a in accs:
                    a.n += n_tar
                if n_tar == 0:
                    continue
                gvalid = valid[gt_idx]
                tps: dict[str, np.ndarray] = {}
                if ests:
                    errs = self._errors(frame, obj_id, ests, gt_idx)
                    scores = [e.score for e in ests]

                    def count(err: np.ndarray, ths: Sequence[float], scores=scores, gvalid=gvalid) -> np.ndarray:
                        return np.array([len(match_greedy(scores, err, th, gvalid)) for th in ths], dtype=np.float64)

                    tps["mssd"] = count(errs["mssd"], c.mssd_thresholds)
                    tps["mspd"] = count(errs["mspd"], c.mspd_thresholds_px)
                    for k in ("add", "adds", "add_s"):
                        tps[k] = count(errs[k], [c.add_threshold])
                    if "vsd" in errs:
                        vsd_err = errs["vsd"]
                        tps["vsd"] = np.stack([count(vsd_err[:, :, i], c.vsd_thetas) for i in range(len(c.vsd_taus))])
                else:
                    tps = {
                        "mssd": np.zeros(len(c.mssd_thresholds)),
                        "mspd": np.zeros(len(c.mspd_thresholds_px)),
                        "add": np.zeros(1),
                        "adds": np.zeros(1),
                        "add_s": np.zeros(1),
                    }
                    if frame.depth is not None:
                        tps["vsd"] = np.zeros((len(c.vsd_taus), len(c.vsd_thetas)))
                for a in accs:
                    for k, v in tps.items():
                        a.add(k, v)
        return self._report(acc_all, acc_dep, n_est_used)

    def _report(self, acc_all: dict[int, _Acc], acc_dep: dict[int, _Acc], n_est: int) -> EvalReport:
        vsd_on = self.render_depth is not None

        def recalls(accs: Iterable[_Acc], with_vsd: bool) -> tuple[dict[str, float | None], dict[str, list]]:
            accs = list(accs)
            n = sum(a.n for a in accs)
            rec: dict[str, float | None] = {}
            curves: dict[str, list] = {}
            for k in ("mssd", "mspd", "add", "adds", "add_s", "vsd"):
                if k == "vsd" and not with_vsd:
                    rec[k] = None
                    continue
                tp = [a.tp[k] for a in accs if k in a.tp]
                if n == 0:
                    rec[k] = None
                    continue
                if not tp:
                    rec[k] = 0.0
                    continue
                curve = np.sum(tp, axis=0) / n
                rec[k] = float(np.mean(curve))
                curves[k] = curve.tolist()
            return rec, curves

        n_all = sum(a.n for a in acc_all.values())
        n_dep = sum(a.n for a in acc_dep.values())
        rec_dep, curves_dep = recalls(acc_dep.values(), vsd_on)
        rec_all, curves = recalls(acc_all.values(), False)
        rec_all["vsd"] = rec_dep["vsd"]  # VSD only exists where there is depth
        if "vsd" in curves_dep:
            curves["vsd"] = curves_dep["vsd"]
        per_obj: dict[int, dict[str, Any]] = {}
        for obj_id in sorted(acc_all):
            r, _ = recalls([acc_all[obj_id]], False)
            rd, _ = recalls([acc_dep[obj_id]], vsd_on) if obj_id in acc_dep else ({"vsd": None}, {})
            r["vsd"] = rd["vsd"]
            r["n_targets"] = acc_all[obj_id].n
            r["n_targets_depth"] = acc_dep[obj_id].n if obj_id in acc_dep else 0
            per_obj[obj_id] = r
        ar_rgb = float(np.mean([rec_all["mssd"] or 0.0, rec_all["mspd"] or 0.0]))
        ar_bop = None
        if n_dep > 0 and rec_dep["vsd"] is not None:
            ar_bop = float(np.mean([rec_dep["vsd"], rec_dep["mssd"] or 0.0, rec_dep["mspd"] or 0.0]))
        return EvalReport(n_all, n_dep, n_est, rec_all, rec_dep, per_obj, ar_rgb, ar_bop, curves)


def make_render_depth(renderer: Any, keys: Mapping[int, str]) -> RenderDepthFn:
    """A :data:`RenderDepthFn` backed by a :class:`~osop_ros.core.render.Renderer` with objects added
    under ``keys[obj_id]``."""

    def render_depth(obj_id: int, T_cam_obj: np.ndarray, K: np.ndarray, width: int, height: int) -> np.ndarray:
        out = renderer.render(K, width, height, [(keys[obj_id], T_cam_obj)])
        return out.depth

    return render_depth


def format_recall(v: float | None) -> str:
    """'0.123' or 'n/a'."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


# --------------------------------------------------------------------------------------------------
# Correct / wrong per estimate, and published-pose precision at a score threshold
# --------------------------------------------------------------------------------------------------

CORRECT_MSSD_FRAC = 0.1
"""A pose is *correct* when its MSSD error (symmetry-aware) is below this fraction of the object diameter."""


def label_estimates(
    frame: EvalFrame,
    obj_id: int,
    Ts: Sequence[np.ndarray],
    scores: Sequence[float],
    obj: EvalObject,
    frac: float = CORRECT_MSSD_FRAC,
) -> list[tuple[float | None, bool]]:
    """Per estimate of ``obj_id`` in ``frame``: (MSSD / diameter to the closest GT instance of the object,
    None when none is within a diameter; correct). Estimates take GT instances one-to-one, greedily by
    decreasing score (:func:`match_greedy`), so a duplicate of a correct pose is wrong."""
    gt_idx = [g for g, gt in enumerate(frame.gts) if gt.obj_id == obj_id]
    errs = np.full((len(Ts), len(gt_idx)), np.inf)
    for e, T in enumerate(Ts):
        for j, g in enumerate(gt_idx):
            Tg = frame.gts[g].T_cam_obj
            if np.linalg.norm(T[:3, 3] - Tg[:3, 3]) < obj.diameter:
                errs[e, j] = mssd(T, Tg, obj.pts, obj.sym_Ts) / obj.diameter
    ok = {e for e, _ in match_greedy(list(scores), errs, frac)} if gt_idx and len(Ts) else set()
    out: list[tuple[float | None, bool]] = []
    for e in range(len(Ts)):
        best = float(errs[e].min()) if gt_idx else math.inf
        out.append((best if math.isfinite(best) else None, e in ok))
    return out


def published_stats(records: Sequence[Mapping[str, Any]], n_targets: int, threshold: float) -> dict[str, Any]:
    """Precision / recall of the poses a node would publish (``score >= threshold``).

    ``records``: one mapping per estimate with ``score`` (None = no estimate), ``correct`` and ``absent``
    (the object is not in the image), plus the (scene_id, im_id, obj_id) of the query. Precision counts
    poses of present targets; ``precision_with_absent`` also counts every published pose of an absent
    object as wrong; ``absent_no_pose_rate`` = share of absent-object queries without a published pose.
    """
    pres = [r for r in records if not r["absent"] and r["score"] is not None]
    pub = [r for r in pres if r["score"] >= threshold]
    n_ok = int(sum(bool(r["correct"]) for r in pub))
    absent_q: dict[tuple[int, int, int], bool] = {}
    for r in records:
        if r["absent"]:
            k = (int(r["scene_id"]), int(r["im_id"]), int(r["obj_id"]))
            absent_q[k] = absent_q.get(k, False) or (r["score"] is not None and r["score"] >= threshold)
    n_abs_pub = int(sum(absent_q.values()))
    n_pub = len(pub)
    return {
        "threshold": float(threshold),
        "n_targets": int(n_targets),
        "n_estimates": len(pres),
        "n_published": n_pub,
        "n_correct": n_ok,
        "n_correct_all_estimates": int(sum(bool(r["correct"]) for r in pres)),
        "precision": n_ok / n_pub if n_pub else None,
        "recall": n_ok / n_targets if n_targets else None,
        "absent_queries": len(absent_q),
        "absent_published": n_abs_pub,
        "absent_no_pose_rate": 1.0 - n_abs_pub / len(absent_q) if absent_q else None,
        "precision_with_absent": n_ok / (n_pub + n_abs_pub) if n_pub + n_abs_pub else None,
    }
