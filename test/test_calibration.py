"""Score calibration fitting, published-pose precision/recall, correctness labels (no GL)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from osop_ros.core.geometry import make_T, rotation_about_axis
from osop_ros.core.verify import ScoreCalibration
from osop_ros.eval.calibration import (
    auc,
    choose_threshold,
    expected_calibration_error,
    fit_and_save,
    fit_logistic,
    fit_platt,
    plot_precision_recall,
    threshold_table,
)
from osop_ros.eval.metrics import EvalFrame, EvalGt, EvalObject, label_estimates, published_stats


def test_fit_logistic_recovers_coefficients() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20000, 2))
    w_true, b_true = np.array([2.0, -1.0]), 0.5
    y = rng.random(20000) < 1.0 / (1.0 + np.exp(-(X @ w_true + b_true)))
    w, b = fit_logistic(X, y.astype(float), l2=1e-3)
    assert np.allclose(w, w_true, atol=0.1) and b == pytest.approx(b_true, abs=0.1)
    w_reg, _ = fit_logistic(X, y.astype(float), l2=1e5)  # a strong penalty shrinks towards 0
    assert np.all(np.abs(w_reg) < 0.5 * np.abs(w_true))


def test_auc_and_ece() -> None:
    assert auc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [False, False, True, True]) == 0.0
    assert auc([0.5, 0.5], [False, True]) == 0.5
    assert auc([0.1, 0.2], [True, True]) is None
    assert expected_calibration_error(np.array([0.25] * 4), np.array([1, 0, 0, 0])) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([0.9] * 4), np.array([0, 0, 0, 0])) == pytest.approx(0.9)


def _records(n: int = 400, seed: int = 1) -> list[dict]:
    """Synthetic estimates: correctness depends on 'raw' and 'depth_inlier' through a known logistic."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        raw, di = rng.random(), rng.random()
        p = 1.0 / (1.0 + math.exp(-(8.0 * raw + 4.0 * di - 7.0)))
        absent = k % 5 == 0
        ok = (not absent) and rng.random() < p
        out.append({"scene_id": k % 4, "im_id": k, "obj_id": 1 + k % 3, "absent": absent, "modality": "rgbd",
                    "score": raw, "correct": bool(ok),
                    "features": {"raw": raw, "depth_inlier": di, "iou": rng.random(), "edge": None}})
    return out


def test_fit_platt_is_calibrated_and_saved(tmp_path) -> None:
    recs = _records(2000)
    model, stats = fit_platt(recs, "rgbd")
    assert stats["n"] == 2000 and stats["n_pos"] == sum(r["correct"] for r in recs)
    assert stats["cv"] == "leave-one-scene-out" and stats["cv_ece"] < 0.05
    assert stats["auc"] > stats["auc_raw_score"] > 0.5  # depth_inlier adds information over raw alone
    p = np.array([model.probability(r["features"]) for r in recs])
    y = np.array([r["correct"] for r in recs], float)
    for lo in (0.0, 0.3, 0.6):  # predicted probability matches the observed frequency per bin
        sel = (p >= lo) & (p < lo + 0.3)
        assert abs(p[sel].mean() - y[sel].mean()) < 0.08
    assert fit_platt(recs, "rgb") is None  # no rgb estimates
    wrong = [{**r, "modality": "rgb", "correct": False} for r in recs[:99]]
    const, st = fit_platt(wrong, "rgb")  # no correct pose at all: the (smoothed) base rate, whatever the features
    assert const.features == [] and st["n_pos"] == 0 and "constant" in st["note"]
    assert const.probability(recs[0]["features"]) == pytest.approx(0.5 / 100.0)
    out = tmp_path / "cal.yaml"
    ScoreCalibration({"rgb": model}, {"note": "kept"}).save(out)  # an existing rgb model is kept
    res = fit_and_save(recs, out, {"dataset": "synth"})
    assert set(res["models"]) == {"rgbd"}
    cal = ScoreCalibration.load(out)
    assert set(cal.models) == {"rgbd", "rgb"} and cal.meta["note"] == "kept"
    assert "MSSD" in cal.meta["criterion"] and cal.meta["fitted_on"]["rgbd"]["dataset"] == "synth"
    assert cal.probability(recs[3]["features"], "rgbd") == pytest.approx(model.probability(recs[3]["features"]))


def test_published_stats_and_threshold_choice(tmp_path) -> None:
    def rec(score, correct, absent=False, im=0, obj=1):
        return {"scene_id": 0, "im_id": im, "obj_id": obj, "absent": absent, "score": score, "correct": correct}

    recs = [rec(0.95, True, im=0), rec(0.9, True, im=1), rec(0.8, False, im=2), rec(0.6, True, im=3),
            rec(0.3, False, im=4), rec(None, False, im=5),
            rec(0.85, False, absent=True, im=0, obj=2), rec(None, False, absent=True, im=1, obj=2),
            rec(0.2, False, absent=True, im=2, obj=2), rec(0.1, False, absent=True, im=3, obj=2)]
    s = published_stats(recs, n_targets=6, threshold=0.5)
    assert (s["n_published"], s["n_correct"]) == (4, 3)
    assert s["precision"] == pytest.approx(0.75) and s["recall"] == pytest.approx(0.5)
    assert s["absent_queries"] == 4 and s["absent_published"] == 1
    assert s["absent_no_pose_rate"] == pytest.approx(0.75) and s["precision_with_absent"] == pytest.approx(0.6)
    assert published_stats(recs, 6, 0.99)["precision"] is None
    # precision 1.0 from 0.81 up, and the absent pose (0.85) must be rejected for >= 95 % no-pose
    assert choose_threshold(recs, 6, min_precision=0.9, min_published=2) == pytest.approx(0.86)
    assert choose_threshold(recs, 6, min_precision=0.9, min_absent_no_pose=0.5, min_published=2) == pytest.approx(0.81)
    assert choose_threshold(recs, 6, min_published=10) is None
    table = threshold_table(recs, 6, step=0.5)
    assert [t["threshold"] for t in table] == [0.0, 0.5, 1.0] and table[0]["n_published"] == 5
    png = plot_precision_recall(recs, 6, tmp_path / "pr.png", threshold=0.86, title="t",
                                extra=[("other", recs[:5], 5)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_label_estimates_one_to_one_and_symmetric() -> None:
    pts = np.array([[x, y, z] for x in (-0.05, 0.05) for y in (-0.02, 0.02) for z in (-0.01, 0.01)])
    sym = make_T(rotation_about_axis([0, 0, 1], np.pi), np.zeros(3))
    obj = EvalObject(pts, [np.eye(4), sym], 0.11)
    T = make_T(np.eye(3), (0.0, 0.0, 0.5))
    frame = EvalFrame(0, 0, np.eye(3), 640, 480, None, [EvalGt(1, T), EvalGt(2, T)], {1: 1})
    flipped = T @ sym  # equal up to the symmetry
    off = make_T(np.eye(3), (0.02, 0.0, 0.5))  # 2 cm = 0.18 d
    labels = label_estimates(frame, 1, [flipped, T, off], [0.5, 0.9, 0.7], obj)
    assert labels[1] == (pytest.approx(0.0), True)  # highest score takes the GT instance
    assert labels[0][0] == pytest.approx(0.0, abs=1e-9) and not labels[0][1]  # a duplicate is wrong
    assert labels[2][0] == pytest.approx(0.02 / 0.11) and not labels[2][1]
    assert label_estimates(frame, 1, [make_T(np.eye(3), (1.0, 0, 0.5))], [1.0], obj) == [(None, False)]
    assert label_estimates(frame, 3, [T], [1.0], obj) == [(None, False)]  # no GT of that object


def _write_run(tmp_path, name: str, recs: list[dict], n_targets: int):
    import json

    feats = tmp_path / f"{name}.features.jsonl"
    feats.write_text("".join(json.dumps(r) + "\n" for r in recs))
    summ = tmp_path / f"{name}.json"
    summ.write_text(json.dumps({"dataset": {"root": str(tmp_path / name)}, "modality": "rgbd",
                                "features_jsonl": str(feats), "published": {"n_targets": n_targets},
                                "pipeline": {"segmenter": "proposals"}, "weights_digest": "x"}))
    return summ


def test_calibrate_command_fits_on_several_runs_and_checks_another(tmp_path, capsys) -> None:
    from osop_ros.cli import main

    a = _write_run(tmp_path, "style_a", _records(600, seed=1), 600)
    b = _write_run(tmp_path, "style_b", _records(600, seed=2), 600)
    c = _write_run(tmp_path, "style_c", _records(400, seed=3), 400)
    out = tmp_path / "cal.yaml"
    assert main(["calibrate", "--fit", str(a), str(b), "--out", str(out), "--check", str(c),
                 "--threshold", "0.5", "--json", str(tmp_path / "rep.json")]) == 0
    text = capsys.readouterr().out
    assert "fit rgbd: n=1200" in text and "check style_c" in text
    missing = text.split("no values for ")[1].split(" in these runs")[0].split(", ")
    assert "flip_margin" in missing and "raw" not in missing  # no flip renders in these runs (no --hard-negatives)
    cal = ScoreCalibration.load(out)
    assert cal.meta["fitted_on"]["rgbd"]["segmenter"] == ["proposals"]
    import json

    rep = json.loads((tmp_path / "rep.json").read_text())["check"][str(c)]
    # the records follow a known logistic: at P >= 0.5 most published poses are right, absent ones are not
    assert rep["precision"] > 0.7 and rep["auc"] > 0.8 and rep["n_published"] > 50
    # checking the saved file alone gives the same numbers
    assert main(["calibrate", "--calibration", str(out), "--check", str(c), "--threshold", "0.5"]) == 0
    assert f"published {rep['n_published']} " in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["calibrate", "--check", str(c)])  # neither --fit nor --calibration
