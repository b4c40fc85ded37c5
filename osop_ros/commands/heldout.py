"""``osop data-heldout``: an independent held-out RGB-D BOP test set in a style unlike ``osop data synth``."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path("~/.cache/osop/data/heldout_b")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data-heldout",
        help="write a held-out BOP test set (procedural objects, own shading and sensor model) for evaluation",
        description="Procedural everyday objects (mm PLYs with vertex colours) resting on a textured ground plane, "
        "shaded in numpy (point light, Blinn-Phong, hemisphere ambient, hard shadows) with an RGB-D sensor model; "
        "BOP layout readable by `osop eval --dataset DIR`. Resumable: finished images are kept.",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dataset directory (default: {DEFAULT_OUT})")
    p.add_argument("--images", type=int, default=40, help="number of images (default 40)")
    p.add_argument("--objects", type=int, default=12, help="number of procedural objects (default 12)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--images-per-scene", type=int, default=10, help="views per static scene (default 10)")
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    from osop_ros.core.render import Renderer
    from osop_ros.eval.heldout import HeldoutConfig, HeldoutGenerator

    cfg = HeldoutConfig(width=args.width, height=args.height, images_per_scene=args.images_per_scene)
    out = args.out.expanduser()
    with Renderer() as renderer:
        stats = HeldoutGenerator(renderer, cfg)(out, args.images, args.objects, args.seed,
                                                progress=not args.no_progress)
    rate = stats["images_per_s"]
    print(f"held-out set: {out}/test — {stats['scenes']} scenes, {stats['images']} images "
          f"({stats['rendered_now']} rendered now in {stats['seconds']:.1f} s"
          f"{f', {rate:.2f} images/s' if rate else ''}), {stats['objects']} objects "
          f"({stats['symmetric_objects']} symmetric), {stats['instances']} instances, "
          f"{stats['test_targets']} test targets, mean visib_fract {stats['mean_visib_fract']}")
    return 0
