"""``osop demo``: the README's main job (whole pipeline on the embedded example, no ROS needed)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from osop_ros.demo import run_demo

    run_demo(Path(args.out), seed=args.seed, n_frames=args.frames, modality=args.modality)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the full pipeline on the embedded example object (synthetic RGB-D scene)")
    p.add_argument("--out", default="out/demo", help="where overlays and the JSON summary go")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--modality", choices=("rgbd", "rgb"), default="rgbd")
    p.set_defaults(func=_run)
