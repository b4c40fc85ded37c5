"""``osop train {prepare,segment,match,correspond,export,proposal-rank}``: shards, resumable training, the
proposal ranking fit."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

TASKS = {
    "segment": ("osop_ros.train.segment", "SegmentTask"),
    "match": ("osop_ros.train.match", "MatchTask"),
    "correspond": ("osop_ros.train.correspond", "CorrespondTask"),
}


def _parse_set(items: list[str]) -> dict:
    out = {}
    for it in items:
        k, _, v = it.partition("=")
        out[k] = yaml.safe_load(v)
    return out


def _train(args: argparse.Namespace) -> int:
    import importlib

    from osop_ros.train.common import TrainConfig, run_training

    cfg = TrainConfig.from_yaml(args.config, _parse_set(args.set))
    if cfg.stage != args.stage:
        raise SystemExit(f"config {args.config} is for stage {cfg.stage!r}, not {args.stage!r}")
    mod, cls = TASKS[args.stage]
    task_cls = getattr(importlib.import_module(mod), cls)
    task = task_cls(
        cfg.path("train_dir"), cfg.path("val_dir"), cfg.batch_size, cfg.model, {"seed": cfg.seed, **cfg.task}
    )
    print(json.dumps(run_training(task, cfg), indent=1))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from osop_ros.train.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(crop_size=args.crop_size, seed=args.seed, instances=not args.images_only)
    print(
        json.dumps(
            prepare(Path(args.synth).expanduser(), Path(args.meshes).expanduser(), Path(args.out).expanduser(), cfg)
        )
    )
    return 0


def _dataset_spec(spec: str) -> tuple[Path, list[int] | None]:
    """``DIR`` or ``DIR:ID,ID,...`` -> (path, object ids or None = all)."""
    path, sep, ids = spec.rpartition(":")
    if not sep or not ids.replace(",", "").isdigit():
        return Path(spec).expanduser(), None
    return Path(path).expanduser(), [int(x) for x in ids.split(",") if x]


def _proposal_rank(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from osop_ros.core.config import ObjectConfig
    from osop_ros.core.factory import Networks, build_segmenter, onboard_object
    from osop_ros.core.matching import TemplateMatcher
    from osop_ros.data.bop import BopDataset
    from osop_ros.eval.runner import _bop_symmetries_m, load_eval_config, object_name
    from osop_ros.train.proposal_rank import collect, fit_ranking, report, top1

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_eval_config(args.config)
    nets = Networks.load(cfg)
    matcher = TemplateMatcher(nets.matchnet, nets.device, top_k=cfg.pipeline.top_k_templates)
    seg = build_segmenter(cfg, nets, matcher, "proposals")
    queries, per_set = [], {}
    for spec in args.dataset:
        path, ids = _dataset_spec(spec)
        ds = BopDataset(path, args.split)
        wanted = sorted({t.obj_id for t in ds.targets} & set(ids if ids is not None else ds.obj_ids))
        objects = {}
        for oid in wanted:
            oc = ObjectConfig(object_name(oid), str(ds.model_path(oid)), "mm", oid,
                              _bop_symmetries_m(ds.models_info[oid]))
            objects[oid] = onboard_object(oc, cfg, nets)
        bar = tqdm(desc=f"proposals {path.name}", disable=not args.progress)

        def tick(done: int, total: int, bar=bar) -> None:  # noqa: ANN001
            bar.total = total
            bar.update(done - bar.n)

        per_set[str(path)] = collect(ds, objects, seg, max_images=args.max_images, progress=tick)
        bar.close()
        queries += per_set[str(path)]
    w = fit_ranking(queries, l2=args.l2, min_target_iou=args.min_target_iou)
    out = {
        "pipeline": {"proposal_head_weight": round(float(w[1]), 3), "proposal_cover_weight": round(float(w[2]), 3),
                     "proposal_colour_weight": round(float(w[3]), 3)},
        **report(queries, w, seg.cfg.weights()),
        "per_dataset": {k: {"fitted": top1(q, w), "current": top1(q, seg.cfg.weights())} for k, q in per_set.items()},
        "fitted_on": [str(_dataset_spec(s)[0]) for s in args.dataset],
        "weights_digest": nets.digest,
        "command": "osop train proposal-rank " + " ".join(f"--dataset {s}" for s in args.dataset)
        + (f" --max-images {args.max_images}" if args.max_images else "") + f" --l2 {args.l2}",
    }
    text = yaml.safe_dump(out, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


CARD = """# {stage} network ({arch}) — model card

- **File**: `weights/{stage}.pt` ({size_mb:.1f} MB, {dtype}), loaded with `osop_ros.nets.checkpoint.from_checkpoint`.
- **Architecture**: `{arch}`, {params:.2f} M parameters; config in the checkpoint (`config` key):
  `{config}`
- **Training data**: synthetic BOP scenes rendered by `osop data synth` from `osop data meshes`
  (pybullet_data meshes, zlib licence; no LINEMOD/LM-O, YCB-V or T-LESS object — the manifest's
  blocklist check passed), shards from `osop train prepare`: {data}.
- **Validation**: held-out objects (the `val` split of the mesh library, never in training scenes).
- **Steps**: {step} (batch {batch}), Adam lr {lr}; **wall time** {wall_h:.2f} h on {hardware}.
- **Validation metrics at the kept checkpoint** (step {step}): {val}
- **Command**:
  ```
  {command}
  osop train export --stage {stage} --run-dir {run_dir} --out weights/
  ```
- Curves: `{run_dir}/curves.png` (not shipped).
"""


def _export(args: argparse.Namespace) -> int:
    import json as _json
    import platform

    import torch

    from osop_ros.nets.checkpoint import from_checkpoint, save_checkpoint

    run = Path(args.run_dir).expanduser()
    net = from_checkpoint(run / "best.pt", "cpu")
    meta = dict(getattr(net, "meta", {}))
    cfg = meta.get("config", {})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dst = out / f"{args.stage}.pt"
    save_checkpoint(dst, net, meta={k: v for k, v in meta.items() if k != "config"} | {"train_config": cfg}, half=True)
    data = "?"
    done = Path(str(cfg.get("train_dir", ""))).expanduser() / "done.json"
    if done.exists():
        data = _json.loads(done.read_text())
    card = CARD.format(
        stage=args.stage,
        arch=net.arch,
        size_mb=dst.stat().st_size / 1e6,
        dtype="fp16 weights",
        params=sum(p.numel() for p in net.parameters() if p.requires_grad) / 1e6,  # frozen backbones excluded
        config=_json.dumps(net.cfg.to_dict()),
        data=_json.dumps(data),
        step=meta.get("step"),
        batch=cfg.get("batch_size"),
        lr=cfg.get("lr"),
        wall_h=float(meta.get("wall_s", 0)) / 3600,
        hardware=args.hardware or f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} torch threads",
        val=_json.dumps(meta.get("val", {})),
        command=f"osop train {args.stage} --config config/train/{args.stage}.yaml",
        run_dir=args.run_dir,
    )
    (out / f"{args.stage}.md").write_text(card)
    print(f"wrote {dst} ({dst.stat().st_size / 1e6:.1f} MB) and {out / (args.stage + '.md')}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="prepare training shards and train the stage networks")
    s = p.add_subparsers(dest="train_cmd", required=True)
    pp = s.add_parser("prepare", help="synthetic BOP scenes -> training shards")
    pp.add_argument("--synth", required=True, help="output dir of `osop data synth`")
    pp.add_argument("--meshes", required=True, help="output dir of `osop data meshes`")
    pp.add_argument("--out", required=True)
    pp.add_argument("--crop-size", type=int, default=64)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--images-only", action="store_true",
                    help="stage-1 shards only (images + object mini banks): no per-instance crops and paired "
                    "templates for stages 2-3 (the slow part on cluttered tabletop scenes)")
    pp.set_defaults(func=_prepare)
    pe = s.add_parser("export", help="best checkpoint of a run -> weights/<stage>.pt (fp16) + model card")
    pe.add_argument("--stage", required=True, choices=sorted(TASKS))
    pe.add_argument("--run-dir", required=True, help="training out_dir (holds best.pt)")
    pe.add_argument("--out", default="weights")
    pe.add_argument("--hardware", default="", help="text for the model card, e.g. '2-core CPU, no GPU'")
    pe.set_defaults(func=_export)
    pr = s.add_parser("proposal-rank", help="fit the stage-1 proposal ranking weights on scenes with visible masks")
    pr.add_argument("--dataset", action="append", required=True, metavar="DIR[:ID,ID]",
                    help="BOP dataset with mask_visib (e.g. `osop data synth --split val` output), optionally "
                    "restricted to some object ids; repeat for several")
    pr.add_argument("--split", default="test", help="split folder of the datasets")
    pr.add_argument("--config", default=None, help="node or core config (default: the node's config/osop.yaml)")
    pr.add_argument("--max-images", type=int, default=None, help="first N images of each dataset")
    pr.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the raw logit weights")
    pr.add_argument("--min-target-iou", type=float, default=0.3,
                    help="queries whose best proposal has a lower IoU are left out of the fit")
    pr.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    pr.add_argument("--out", default="", help="write the result (YAML) here too")
    pr.add_argument("--progress", action="store_true")
    pr.set_defaults(func=_proposal_rank)
    for stage in TASKS:
        t = s.add_parser(stage, help=f"train the stage network '{stage}' (resumable)")
        t.add_argument("--config", required=True, help="training YAML (see config/train/)")
        t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
        t.set_defaults(func=_train, stage=stage)
