"""``osop eval``: run the pipeline on a BOP dataset, write a BOP CSV + JSON summary, print BOP19 recalls."""

from __future__ import annotations

import argparse
from pathlib import Path

from osop_ros.core.types import InvalidInputError


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated object ids, got {text!r}") from exc


def _oracle_list(text: str) -> tuple[str, ...]:
    from osop_ros.eval.runner import ORACLE_CHOICES

    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in vals if v not in ORACLE_CHOICES]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown oracle mode(s) {bad}; choose from {','.join(ORACLE_CHOICES)}")
    return vals


def _weights_map(text: str) -> dict[str, str]:
    """``segment=PATH|SPEC,match=...`` -> {stage: path or training-free spec}."""
    out = {}
    for item in (v.strip() for v in text.split(",") if v.strip()):
        stage, sep, value = item.partition("=")
        if not sep or stage not in ("segment", "match", "correspond") or not value:
            raise argparse.ArgumentTypeError(f"expected stage=weights (stage: segment|match|correspond), got {item!r}")
        out[stage] = value
    return out


WEIGHTS_HELP = (
    "per-stage weights overriding --weights-dir: segment=FILE|cosine:BACKBONE, match=FILE|descriptor:BACKBONE, "
    "correspond=FILE (comma-separated)"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate on a BOP dataset (VSD/MSSD/MSPD recalls, AR)",
        description=(
            "Onboard the dataset's objects (template banks cached), estimate poses per image, write a BOP19 "
            "CSV and a JSON summary next to it, and print per-object and overall recalls. ORACLE stages "
            "(--oracle) read ground truth and are labelled as such in every output."
        ),
    )
    p.add_argument("--dataset", required=True, type=Path, help="BOP dataset directory (holds models/ and the split)")
    p.add_argument("--split", default="test", help="split folder (default: test)")
    p.add_argument(
        "--targets",
        type=Path,
        default=None,
        help="targets JSON (default: DATASET/test_targets_bop19.json, else all GT)",
    )
    p.add_argument("--objects", type=_int_list, default=None, help="comma-separated BOP object ids, e.g. 1,5")
    p.add_argument(
        "--modality",
        choices=("rgb", "rgbd"),
        default="rgb",
        help="rgb: PnP; rgbd: Kabsch/PnP + ICP on the frames that have depth (default: rgb)",
    )
    p.add_argument(
        "--oracle",
        type=_oracle_list,
        default=(),
        help="ORACLE stages: mask (GT visible masks), viewpoint (GT-nearest template), comma-separated",
    )
    p.add_argument(
        "--correspondence",
        choices=("transfer", "learned"),
        default="transfer",
        help="stage 3: template transfer (no learning) or the learned network (default: transfer)",
    )
    p.add_argument("--top-k", type=int, default=1, help="templates (hypotheses) per instance (default: 1)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument(
        "--results", type=Path, default=None, help="evaluate this existing BOP CSV instead of running the pipeline"
    )
    p.add_argument("--no-vsd", action="store_true", help="skip VSD (no depth rendering)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="template cache (default: $OSOP_CACHE_DIR or ~/.cache/osop/templates)",
    )
    p.add_argument("--out", type=Path, default=Path("results.csv"), help="BOP CSV to write (JSON summary next to it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (learned stages)")
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="directory with segment.pt, match.pt, correspond.pt (default: the shipped weights)",
    )
    p.set_defaults(func=handler)

    q = subparsers.add_parser(
        "eval-stages",
        help="measure stages 1-3 separately on a BOP dataset (mask IoU, template rotation error, coordinate error)",
    )
    q.add_argument("--dataset", type=Path, required=True)
    q.add_argument("--split", default="test")
    q.add_argument("--objects", type=_int_list, default=None)
    q.add_argument("--max-targets", type=int, default=200)
    q.add_argument("--device", default="auto")
    q.add_argument("--weights-dir", type=Path, default=None)
    q.add_argument("--weights", type=_weights_map, default={}, help=WEIGHTS_HELP)
    q.add_argument("--seg-input-width", type=int, default=320, help="stage 1 input width (default: 320)")
    q.add_argument("--cache-dir", type=Path, default=None)
    q.add_argument("--out", type=Path, default=None, help="write the JSON summary here too")
    q.set_defaults(func=stages_handler)


def stages_handler(args: argparse.Namespace) -> int:
    import json

    from osop_ros.eval.stages import StageEvalOptions, evaluate_stages

    summary = evaluate_stages(
        StageEvalOptions(
            dataset=args.dataset,
            split=args.split,
            objects=args.objects,
            max_targets=args.max_targets,
            device=args.device,
            weights_dir=args.weights_dir,
            weights=args.weights,
            seg_input_width=args.seg_input_width,
            cache_dir=args.cache_dir,
        )
    )
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


def handler(args: argparse.Namespace) -> int:
    from osop_ros.eval.runner import EvalOptions, default_stage_factory, run_eval

    if args.max_images is not None and args.max_images < 1:
        raise InvalidInputError(f"--max-images must be >= 1, got {args.max_images}")
    opts = EvalOptions(
        dataset=args.dataset,
        split=args.split,
        targets_file=args.targets,
        objects=args.objects,
        modality=args.modality,
        oracle=tuple(args.oracle),
        correspondence=args.correspondence,
        top_k=args.top_k,
        max_images=args.max_images,
        out=args.out,
        results_csv=args.results,
        cache_dir=args.cache_dir,
        vsd=not args.no_vsd,
        progress=not args.no_progress,
    )
    run_eval(opts, stage_factory=default_stage_factory(args.device, args.weights_dir))
    return 0
