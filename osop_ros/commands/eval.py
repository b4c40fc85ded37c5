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


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc


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


def _max_instances(text: str) -> int | str:
    if text == "targets":
        return text
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1 or 'targets', got {text!r}")
    return v


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate on a BOP dataset (VSD/MSSD/MSPD recalls, AR, published-pose precision)",
        description=(
            "Onboard the dataset's objects (template banks cached), estimate poses per image with the pipeline "
            "the node runs (the `pipeline` section of --config, default config/osop.yaml; flags deviate from "
            "it), write a BOP19 CSV, a JSON summary and a features JSONL next to it, and print per-object and "
            "overall recalls, AR and the precision/recall of published poses (score >= threshold). ORACLE "
            "stages (--oracle) read ground truth and are labelled as such in every output."
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
        "--config",
        type=Path,
        default=None,
        help="node parameter file (/**/osop_node: ros__parameters: ...) or plain core YAML whose weights, "
        "templates and pipeline sections define the evaluated pipeline (default: the package's config/osop.yaml)",
    )
    p.add_argument(
        "--modality",
        choices=("rgb", "rgbd", "auto"),
        default=None,
        help="rgb: PnP; rgbd: Kabsch/PnP + ICP, frames without depth skipped; auto: depth where the frame has it "
        "(default: the config's pipeline.modality)",
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
        default=None,
        help="stage 3: the learned network (default, what the node runs) or template transfer (no learning)",
    )
    p.add_argument("--top-k", type=int, default=None, help="templates per instance (default: pipeline.top_k_templates)")
    p.add_argument("--no-icp", dest="icp", action="store_const", const=False, default=None, help="ICP off")
    p.add_argument("--no-verify", dest="verify", action="store_const", const=False, default=None,
                   help="no render-and-compare verification (score = the solver's mask/depth agreement)")
    p.add_argument("--depth-seg", dest="depth_seg", action=argparse.BooleanOptionalAction, default=None,
                   help="RGB-D clean-up of stage-1 masks with depth (default: pipeline.depth_seg)")
    p.add_argument("--symmetry-search", dest="symmetry_search", action=argparse.BooleanOptionalAction, default=None,
                   help="colour search over the shape's symmetries after ICP (default: pipeline.symmetry_search)")
    p.add_argument("--score-threshold", type=float, default=None,
                   help="published = score >= this (default: pipeline.score_threshold)")
    p.add_argument("--calibration", default=None,
                   help="score calibration file, or 'none' (default: pipeline.calibration)")
    p.add_argument("--seg-input-width", type=int, default=None, help="stage 1 input width (default: the config's)")
    p.add_argument("--segmenter", choices=("head", "proposals"), default=None,
                   help="stage 1 of every frame: OSOP head or MobileSAM proposals (default: pipeline.segmenter, "
                        "and pipeline.segmenter_rgb for frames without depth)")
    p.add_argument("--segmenter-rgb", choices=("same", "head", "proposals"), default=None,
                   help="stage 1 of frames without depth (default: pipeline.segmenter_rgb; same = --segmenter)")
    p.add_argument("--seg-ranking", choices=("descriptor", "head"), default=None,
                   help="order of the head's components (default: pipeline.seg_ranking)")
    p.add_argument("--verify-candidates", type=int, default=None,
                   help="stage-1 candidates verified per object (default: pipeline.verify_candidates)")
    p.add_argument("--max-instances", type=_max_instances, default=None,
                   help="instances per object and image: N, or 'targets' = the BOP inst_count (default: the config's)")
    p.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    p.add_argument("--absent", type=int, default=0,
                   help="per image, also query N evaluated objects that are NOT in the image (absent-object rate)")
    p.add_argument("--jobs", type=int, default=1, help="worker processes (each builds its own pipeline)")
    p.add_argument(
        "--results", type=Path, default=None, help="evaluate this existing BOP CSV instead of running the pipeline"
    )
    p.add_argument("--no-vsd", action="store_true", help="skip VSD (no depth rendering)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="template cache (default: templates.cache_dir of the config, else ~/.cache/osop/templates)",
    )
    p.add_argument("--out", type=Path, default=Path("results.csv"), help="BOP CSV to write (JSON summary next to it)")
    p.add_argument("--fit-calibration", type=Path, default=None, metavar="FILE",
                   help="fit the score calibration (P(MSSD < 0.1 d)) on this run's estimates and write FILE "
                   "(YAML/JSON; models of other modalities in FILE are kept)")
    p.add_argument("--hard-negatives", action="store_true",
                   help="with --fit-calibration: also fit on the 180-degree flips of every estimate (labelled by "
                   "their MSSD), poses that fit depth and silhouette but are wrong")
    p.add_argument("--pr-plot", type=Path, default=None, metavar="PNG",
                   help="plot precision/recall of published poses versus the score threshold")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N (default: the config's device)")
    p.add_argument(
        "--weights-dir",
        type=Path,
        default=None,
        help="directory with segment.pt, match.pt, correspond.pt (default: the config's weights)",
    )
    p.add_argument("--weights", type=_weights_map, default={}, help=WEIGHTS_HELP)
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
    q.add_argument("--inplane", choices=("query", "templates"), default="query", help="stage 2 in-plane search")
    q.add_argument("--cache-dir", type=Path, default=None)
    q.add_argument("--absent-from", type=Path, default=None, metavar="DIR",
                   help="also query, on every image, objects of this other BOP dataset (absent by construction)")
    q.add_argument("--stage1-only", action="store_true", help="measure stage 1 only (skips stages 2-3)")
    q.add_argument("--segmenter", choices=("head", "proposals"), default="head",
                   help="stage 1: the OSOP head (mask prob >= 0.5) or MobileSAM proposals ranked by descriptors")
    q.add_argument("--seg-ranking", choices=("descriptor", "head"), default=None,
                   help="order of the head's components for the top-component IoU (default: pipeline.seg_ranking)")
    q.add_argument("--proposal-grid", type=_int_list, default=None, metavar="GX,GY",
                   help="proposals: grid of point prompts (default 4,3)")
    q.add_argument("--proposal-peaks", type=int, default=None, help="proposals: head-peak prompts (default 4)")
    q.add_argument(
        "--proposal-image-size", type=int, default=None, help="proposals: MobileSAM input side (default 640)"
    )
    q.add_argument("--proposal-weights", type=_float_list, default=None, metavar="HEAD,COVER,COLOUR",
                   help="proposals: ranking weights (default: the fitted ones; session 19's rule: 0.2,0,0)")
    q.add_argument("--out", type=Path, default=None, help="write the JSON summary here too")
    q.set_defaults(func=stages_handler)


def _proposal_config(args: argparse.Namespace):  # noqa: ANN202 - ProposalConfig (lazy import)
    from osop_ros.core.proposals import ProposalConfig

    kw: dict = {}
    if args.proposal_grid is not None:
        if len(args.proposal_grid) != 2:
            raise SystemExit("--proposal-grid takes GX,GY")
        kw["grid"] = tuple(args.proposal_grid)
    if args.proposal_peaks is not None:
        kw["head_peaks"] = args.proposal_peaks
    if args.proposal_image_size is not None:
        kw["image_size"] = args.proposal_image_size
    if args.proposal_weights is not None:
        if len(args.proposal_weights) != 3:
            raise SystemExit("--proposal-weights takes HEAD,COVER,COLOUR")
        kw["head_weight"], kw["cover_weight"], kw["colour_weight"] = args.proposal_weights
    return ProposalConfig(**kw)


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
            inplane=args.inplane,
            cache_dir=args.cache_dir,
            absent_from=args.absent_from,
            stage1_only=args.stage1_only,
            segmenter=args.segmenter,
            seg_ranking=args.seg_ranking,
            proposal=_proposal_config(args),
        )
    )
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1))
    return 0


def handler(args: argparse.Namespace) -> int:
    import dataclasses

    from osop_ros.eval.runner import EvalOptions, load_eval_config, run_eval

    if args.max_images is not None and args.max_images < 1:
        raise InvalidInputError(f"--max-images must be >= 1, got {args.max_images}")
    cfg = load_eval_config(args.config)
    weights = dataclasses.asdict(cfg.weights)
    if args.weights_dir is not None:
        weights.update({s: str(args.weights_dir / f"{s}.pt") for s in ("segment", "match", "correspond")})
    weights.update(args.weights)
    cfg = dataclasses.replace(cfg, weights=dataclasses.replace(cfg.weights, **weights))
    opts = EvalOptions(
        dataset=args.dataset,
        split=args.split,
        targets_file=args.targets,
        objects=args.objects,
        config=cfg,
        modality=args.modality,
        oracle=tuple(args.oracle),
        correspondence=args.correspondence,
        top_k=args.top_k,
        icp=args.icp,
        verify=args.verify,
        score_threshold=args.score_threshold,
        calibration=args.calibration,
        depth_seg=args.depth_seg,
        symmetry_search=args.symmetry_search,
        seg_input_width=args.seg_input_width,
        segmenter=args.segmenter,
        segmenter_rgb=args.segmenter_rgb,
        seg_ranking=args.seg_ranking,
        verify_candidates=args.verify_candidates,
        device=args.device,
        max_instances=args.max_instances,
        max_images=args.max_images,
        absent=args.absent,
        jobs=args.jobs,
        out=args.out,
        results_csv=args.results,
        cache_dir=args.cache_dir,
        vsd=not args.no_vsd,
        progress=not args.no_progress,
        fit_calibration=args.fit_calibration,
        hard_negatives=args.hard_negatives,
        pr_plot=args.pr_plot,
    )
    run_eval(opts)
    return 0
