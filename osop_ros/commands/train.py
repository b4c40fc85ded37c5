"""``osop train {prepare,segment,match,correspond}``: shard preparation and resumable training."""

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

    cfg = PrepareConfig(crop_size=args.crop_size, seed=args.seed)
    print(
        json.dumps(
            prepare(Path(args.synth).expanduser(), Path(args.meshes).expanduser(), Path(args.out).expanduser(), cfg)
        )
    )
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
    pp.set_defaults(func=_prepare)
    for stage in TASKS:
        t = s.add_parser(stage, help=f"train the stage network '{stage}' (resumable)")
        t.add_argument("--config", required=True, help="training YAML (see config/train/)")
        t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
        t.set_defaults(func=_train, stage=stage)
