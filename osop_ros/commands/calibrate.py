"""``osop calibrate``: fit the score calibration on several ``osop eval`` runs and check it on others."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="fit P(pose correct) on the estimates of several eval runs, check it offline on other runs",
        description="Reads the JSON summaries `osop eval --out X.csv` writes (X.json, with X.features.jsonl "
        "beside it). --fit: one Platt model per modality on the pooled estimates (hard negatives included when "
        "the runs were made with --hard-negatives), written to --out. --check: the calibration (--out, or "
        "--calibration) applied offline to each run's estimates: published precision, recall and absent "
        "no-pose rate at --threshold. Fit on one set of styles, check on another.",
    )
    p.add_argument("--fit", nargs="+", type=Path, default=[], metavar="RUN.json", help="runs to fit on")
    p.add_argument("--out", type=Path, default=None, help="calibration file to write (YAML/JSON) with --fit")
    p.add_argument("--calibration", type=Path, default=None, help="existing calibration to check (without --fit)")
    p.add_argument("--check", nargs="*", type=Path, default=[], metavar="RUN.json", help="runs to check it on")
    p.add_argument("--threshold", type=float, default=0.9, help="published = P(correct) >= this (default 0.9)")
    p.add_argument("--l2", type=float, default=1.0, help="L2 penalty of the logistic fit (default 1.0)")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from osop_ros.core.verify import ScoreCalibration
    from osop_ros.eval.calibration import check_run, fit_and_save, load_run, merge_runs

    if bool(args.fit) == bool(args.calibration):
        raise SystemExit("calibrate: give either --fit RUN.json ... --out FILE, or --calibration FILE --check ...")
    if not 0.0 <= args.threshold <= 1.0:
        raise SystemExit("calibrate: --threshold must be in [0, 1]")
    report: dict = {}
    if args.fit:
        if args.out is None:
            raise SystemExit("calibrate: --fit needs --out FILE")
        runs = [load_run(p) for p in args.fit]
        prov = {
            "runs": [str(p) for p in args.fit],
            "datasets": [r[2].get("dataset", {}).get("root") for r in runs],
            "weights_digest": sorted({str(r[2].get("weights_digest")) for r in runs}),
            "segmenter": sorted({str(r[2].get("pipeline", {}).get("segmenter", "head")) for r in runs}),
            "command": "osop calibrate --fit " + " ".join(str(p) for p in args.fit) + f" --out {args.out}",
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        res = fit_and_save(merge_runs([r[0] for r in runs]), args.out, prov, args.l2)
        report["fit"] = res
        for modality, st in res["models"].items():
            print(f"fit {modality}: n={st['n']} correct={st['n_pos']} absent={st['n_absent']} "
                  f"hard-neg={st.get('n_hard_negatives')} auc={_f(st['auc'])} cv_auc={_f(st.get('cv_auc'))} "
                  f"cv_ece={_f(st.get('cv_ece'))}")
            if st.get("missing_features"):
                print(f"  {modality}: no values for {', '.join(st['missing_features'])} in these runs (no weight; "
                      "flip_margin needs runs made with --hard-negatives)")
        print(f"wrote {args.out}")
    cal = ScoreCalibration.load(args.out if args.fit else args.calibration)
    report["check"] = {}
    for p in args.check:
        records, n_targets, summary = load_run(p)
        c = check_run(records, n_targets, cal, args.threshold)
        report["check"][str(p)] = c
        name = Path(str(summary.get("dataset", {}).get("root") or p)).name
        print(f"check {name} ({summary.get('modality')}): published {c['n_published']} precision {_f(c['precision'])} "
              f"recall {_f(c['recall'])} of {c['n_targets']} absent no-pose {_f(c['absent_no_pose_rate'])} "
              f"auc {_f(c['auc'])} threshold for precision 0.9: {c['threshold_for_precision_0.9']}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    return 0


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
