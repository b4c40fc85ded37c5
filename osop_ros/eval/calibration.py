"""Fit and check the published score: P(pose correct | verification features), Platt / logistic.

Correct = MSSD error < 0.1 x object diameter (symmetry-aware, :data:`~osop_ros.eval.metrics.CORRECT_MSSD_FRAC`).
The records are those ``osop eval`` writes (``<out>.features.jsonl``, one per estimate: ``features``,
``modality``, ``correct``, ``absent``, ``score``); poses of absent objects are negatives, and with
``--hard-negatives`` the 180-degree flips of every estimate (``fit_only`` records, labelled by their MSSD)
teach the model that agreeing with depth and silhouette alone does not make a pose right. One model per
modality (``rgbd``, ``rgb``) on standardised features, fitted by Newton-IRLS with an L2 penalty, is
written to a YAML/JSON file read by :class:`osop_ros.core.verify.ScoreCalibration` (fitting is eval-only
code; loading and applying it is core).

Also: precision / recall of published poses versus the score threshold (table, threshold choice, and a
matplotlib PNG with the Agg backend).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from osop_ros.core.types import InvalidInputError
from osop_ros.core.verify import PlattModel, ScoreCalibration
from osop_ros.eval.metrics import CORRECT_MSSD_FRAC, published_stats

MODEL_FEATURES: dict[str, tuple[str, ...]] = {
    "rgbd": ("raw", "iou", "mask_recall", "mask_precision", "edge", "texture_edge", "color", "depth_inlier",
             "depth_behind", "occluded", "depth_valid", "seg_score", "match_score", "flip_margin"),
    "rgb": ("raw", "iou", "mask_recall", "mask_precision", "edge", "texture_edge", "color", "seg_score",
            "match_score"),
}
# ``seg_rank`` / ``seg_margin`` (proposal ranking, also verification features) are left out: fitted on
# two styles of our generator their coefficients were ~0 and heldout_b precision did not improve
# (docs/results.md, session 8). ``flip_margin`` (rgbd) is recorded only by ``osop eval --hard-negatives``
# runs (or runs with a calibration that reads it): fit on such runs; in others the column is missing
# (reported as ``missing_features``) and gets no weight. Left out of rgb: no correct RGB pose in the
# fit data so far, the RGB model is a constant (docs/results.md, session 13).
CRITERION = f"correct = MSSD < {CORRECT_MSSD_FRAC} x diameter (symmetry-aware); poses of absent objects are wrong"


def read_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Records of one or more ``*.features.jsonl`` files."""
    out = []
    for p in paths:
        with open(p, encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50.0, 50.0)))


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0, iterations: int = 100) -> tuple[np.ndarray, float]:
    """Coefficients (F,) and intercept minimising mean log-loss + ``l2`` / (2 N) |coef|^2 (Newton-IRLS).

    X (N, F) standardised features, y (N,) in {0, 1}; the intercept is not penalised.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, f = X.shape
    A = np.hstack([X, np.ones((n, 1))])
    w = np.zeros(f + 1)
    prior = np.clip(y.mean() if n else 0.5, 1e-3, 1 - 1e-3)
    w[-1] = math.log(prior / (1 - prior))
    reg = np.full(f + 1, l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = _sigmoid(A @ w)
        g = A.T @ (p - y) + reg * w
        Hm = (A * (p * (1 - p))[:, None]).T @ A + np.diag(reg + 1e-9)
        step = np.linalg.solve(Hm, g)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return w[:-1], float(w[-1])


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (rank statistic, ties counted half); None without both classes."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s):  # average ranks of ties
        tie = s == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    y = np.asarray(y, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))) if len(y) else float("nan")


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width probability bins, weighted by bin size."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(y[idx == b].mean() - p[idx == b].mean()) * (idx == b).mean() for b in range(bins)
                     if (idx == b).any()))


def _samples(records: Sequence[dict[str, Any]], modality: str) -> list[dict[str, Any]]:
    """Estimates (and fit-only hard negatives) of ``modality`` that carry verification features."""
    return [r for r in records if (r.get("score") is not None or r.get("fit_only"))
            and r.get("modality") == modality and r.get("features")]


def _model(X_raw: np.ndarray, y: np.ndarray, names: Sequence[str], l2: float) -> PlattModel:
    fin = np.isfinite(X_raw)
    n = np.maximum(fin.sum(axis=0), 1)
    mean = np.where(fin, X_raw, 0.0).sum(axis=0) / n
    std = np.sqrt(np.where(fin, (X_raw - mean) ** 2, 0.0).sum(axis=0) / n)
    std = np.where(std > 1e-6, std, 1.0)
    m = PlattModel(list(names), mean.tolist(), std.tolist(), [0.0] * len(names), 0.0)
    coef, b = fit_logistic(m.matrix_raw(X_raw), y, l2)
    m.coef, m.intercept = coef.tolist(), b
    return m


def fit_platt(
    records: Sequence[dict[str, Any]], modality: str, l2: float = 1.0, min_samples: int = 20
) -> tuple[PlattModel, dict[str, Any]] | None:
    """Platt model of one modality and its statistics (fit and leave-one-scene-out cross-validation);
    None with fewer than ``min_samples`` estimates. When every estimate has the same label (e.g. no
    correct pose at all) the model is the constant base rate ``(n_pos + 0.5) / (n + 1)``."""
    rows = _samples(records, modality)
    y = np.array([bool(r["correct"]) for r in rows], dtype=np.float64)
    if len(rows) < min_samples:
        return None
    if y.min() == y.max():
        rate = (y.sum() + 0.5) / (len(y) + 1.0)
        const = PlattModel([], [], [], [], float(math.log(rate / (1.0 - rate))))
        return const, {"n": len(rows), "n_pos": int(y.sum()), "n_absent": int(sum(bool(r["absent"]) for r in rows)),
                       "log_loss": log_loss(np.full(len(y), rate), y), "auc": None, "auc_raw_score": None,
                       "cv": None, "note": "a single class: constant base-rate model (no feature can be fitted)"}
    names = MODEL_FEATURES[modality]
    X = np.array([[_num(r["features"].get(f)) for f in names] for r in rows], dtype=np.float64)
    model = _model(X, y, names, l2)
    p_fit = np.array([model.probability(r["features"]) for r in rows])
    scenes = np.array([int(r["scene_id"]) for r in rows])
    p_cv = np.full(len(rows), np.nan)
    for s in np.unique(scenes):
        tr, te = scenes != s, scenes == s
        if len(np.unique(y[tr])) < 2:
            continue
        m = _model(X[tr], y[tr], names, l2)
        p_cv[te] = [m.probability(r["features"]) for r, t in zip(rows, te, strict=True) if t]
    ok = np.isfinite(p_cv)
    raw = np.array([_num(r["features"].get("raw")) for r in rows])
    stats = {
        "n": len(rows),
        "n_pos": int(y.sum()),
        "n_absent": int(sum(bool(r["absent"]) for r in rows)),
        "n_hard_negatives": int(sum(bool(r.get("fit_only")) for r in rows)),
        "log_loss": log_loss(p_fit, y),
        "auc": auc(p_fit, y.astype(bool)),
        "auc_raw_score": auc(np.nan_to_num(raw), y.astype(bool)),
        "cv": "leave-one-scene-out" if ok.any() else None,
        "cv_log_loss": log_loss(p_cv[ok], y[ok]) if ok.any() else None,
        "cv_auc": auc(p_cv[ok], y[ok].astype(bool)) if ok.any() else None,
        "cv_ece": expected_calibration_error(p_cv[ok], y[ok]) if ok.any() else None,
        "missing_features": [f for f, col in zip(names, X.T, strict=True) if not np.isfinite(col).any()],
    }
    return model, stats


def _num(v: Any) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return float("nan")
    return x


def fit_and_save(
    records: Sequence[dict[str, Any]], path: str | Path, provenance: dict[str, Any], l2: float = 1.0
) -> dict[str, Any]:
    """Fit every modality present in ``records`` and write ``path`` (models of other modalities already
    in the file are kept). Returns {"path", "models": {modality: stats}}."""
    path = Path(path)
    existing = ScoreCalibration.load(path) if path.is_file() else ScoreCalibration({}, {})
    fitted: dict[str, Any] = {}
    for modality in MODEL_FEATURES:
        res = fit_platt(records, modality, l2)
        if res is None:
            continue
        model, stats = res
        existing.models[modality] = model
        fitted[modality] = stats
    if not fitted:
        raise InvalidInputError("score calibration: not enough estimates to fit (at least 20 per modality)")
    meta = dict(existing.meta)
    meta["version"] = 1
    meta["criterion"] = CRITERION
    meta["model"] = "P(correct) = sigmoid(intercept + sum coef_i (x_i - mean_i) / scale_i); missing x_i -> mean_i"
    fits = dict(meta.get("fitted_on") or {})
    for modality, stats in fitted.items():
        fits[modality] = {**provenance, "l2": l2, **{k: _round(v) for k, v in stats.items()}}
    meta["fitted_on"] = fits
    existing.meta = meta
    existing.save(path)
    return {"path": str(path), "models": fitted}


def _round(v: Any) -> Any:
    return round(v, 4) if isinstance(v, float) and math.isfinite(v) else v


# ----------------------------------------------------------------------------------------------
# Precision / recall versus the threshold
# ----------------------------------------------------------------------------------------------


def curve(records: Sequence[dict[str, Any]], n_targets: int, thresholds: Sequence[float]) -> list[dict[str, Any]]:
    """:func:`~osop_ros.eval.metrics.published_stats` at each threshold."""
    return [published_stats(records, n_targets, float(t)) for t in thresholds]


def threshold_table(records: Sequence[dict[str, Any]], n_targets: int, step: float = 0.05) -> list[dict[str, Any]]:
    """Compact table (threshold, published, precision, recall, absent no-pose rate) every ``step``."""
    keys = ("threshold", "n_published", "n_correct", "precision", "recall", "absent_no_pose_rate",
            "precision_with_absent")
    ts = np.round(np.arange(0.0, 1.0 + 1e-9, step), 4)
    return [{k: _round(s[k]) for k in keys} for s in curve(records, n_targets, ts)]


def choose_threshold(
    records: Sequence[dict[str, Any]],
    n_targets: int,
    min_precision: float = 0.9,
    min_absent_no_pose: float = 0.95,
    step: float = 0.01,
    min_published: int = 5,
) -> float | None:
    """Lowest threshold (most recall) whose published precision >= ``min_precision`` (at least
    ``min_published`` poses) and absent-object no-pose rate >= ``min_absent_no_pose`` (when there are
    absent queries); None when no threshold qualifies."""
    for s in curve(records, n_targets, np.round(np.arange(0.0, 1.0 + 1e-9, step), 4)):
        if s["n_published"] < min_published or s["precision"] is None or s["precision"] < min_precision:
            continue
        if s["absent_queries"] and s["absent_no_pose_rate"] < min_absent_no_pose:
            continue
        return float(s["threshold"])
    return None


def plot_precision_recall(
    records: Sequence[dict[str, Any]],
    n_targets: int,
    png: str | Path,
    threshold: float | None = None,
    title: str = "",
    extra: Sequence[tuple[str, Sequence[dict[str, Any]], int]] = (),
) -> Path:
    """PNG: precision, recall and absent-object no-pose rate versus the score threshold (Agg backend).

    ``extra``: further (label, records, n_targets) curves drawn dashed (e.g. another dataset).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = np.round(np.arange(0.0, 1.0 + 1e-9, 0.01), 4)
    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=110)
    for k, (lab, recs, n) in enumerate([(title or "eval", records, n_targets), *extra]):
        c = curve(recs, n, ts)
        style = "-" if k == 0 else "--"
        prec = [np.nan if s["precision"] is None else s["precision"] for s in c]
        ax.plot(ts, prec, style, color="tab:blue", label=f"precision of published poses ({lab})")
        ax.plot(ts, [s["recall"] or 0.0 for s in c], style, color="tab:orange", label=f"recall of targets ({lab})")
        if any(s["absent_queries"] for s in c):
            ax.plot(ts, [s["absent_no_pose_rate"] for s in c], style, color="tab:green",
                    label=f"absent object: no pose ({lab})")
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.axhline(0.95, color="grey", lw=0.8, ls=":")
    if threshold is not None:
        ax.axvline(threshold, color="black", lw=1.0, ls="-.", label=f"score_threshold = {threshold:.2f}")
    ax.set_xlabel("score threshold (published = score >= threshold)")
    ax.set_ylabel("fraction")
    ax.set_ylim(0.0, 1.02)
    ax.set_xlim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.set_title(f"published poses vs threshold; correct = MSSD < {CORRECT_MSSD_FRAC} d")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------
# Several runs: fit on more than one dataset, check a calibration on runs it was not fitted on
# ----------------------------------------------------------------------------------------------


def load_run(summary_json: str | Path) -> tuple[list[dict[str, Any]], int, dict[str, Any]]:
    """(records, n_targets, summary) of one ``osop eval`` run from its JSON summary (the features
    JSONL it names, else the one next to it)."""
    path = Path(summary_json)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        feats = Path(summary.get("features_jsonl") or path.with_suffix(".features.jsonl"))
        if not feats.is_file():
            feats = path.with_suffix(".features.jsonl")
        records = read_records([feats])
        n_targets = int(summary["published"]["n_targets"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidInputError(f"{path}: not an `osop eval` summary with its features JSONL ({exc})") from exc
    return records, n_targets, summary


def merge_runs(runs: Sequence[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Records of several runs as one list; scene ids are made distinct per run (cross-validation
    leaves one scene of one run out)."""
    out = []
    for k, recs in enumerate(runs):
        out.extend({**r, "scene_id": k * 1_000_000 + int(r.get("scene_id", 0))} for r in recs)
    return out


def rescore(records: Sequence[dict[str, Any]], calibration: ScoreCalibration) -> list[dict[str, Any]]:
    """Records with ``score`` replaced by ``calibration``'s P(correct) of their features (estimates
    only; records without an estimate, fit-only ones and modalities without a model are unchanged)."""
    out = []
    for r in records:
        if r.get("score") is not None and r.get("features") and r.get("modality") in calibration.models:
            r = {**r, "score": calibration.probability(r["features"], r["modality"])}
        out.append(r)
    return out


def check_run(
    records: Sequence[dict[str, Any]], n_targets: int, calibration: ScoreCalibration, threshold: float
) -> dict[str, Any]:
    """Published precision / recall / absent no-pose rate at ``threshold`` and the AUC of the scores,
    with ``calibration`` applied offline to one run's estimates."""
    scored = rescore(records, calibration)
    pres = [r for r in scored if r.get("score") is not None and not r.get("fit_only")]
    stats = published_stats(scored, n_targets, threshold)
    keep = ("n_targets", "n_estimates", "n_published", "n_correct", "precision", "recall", "absent_no_pose_rate",
            "precision_with_absent")
    return {
        **{k: _round(stats[k]) for k in keep},
        "threshold": threshold,
        "auc": _round(auc([r["score"] for r in pres], [bool(r["correct"]) for r in pres])),
        "threshold_for_precision_0.9": choose_threshold(scored, n_targets),
    }
