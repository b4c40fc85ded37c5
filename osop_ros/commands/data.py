"""``osop data meshes|synth``: the training mesh library and synthetic BOP scenes rendered from it."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_BACKGROUNDS = Path("/work/shared/backgrounds/imagenet-samples")


def _range(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.split("-")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or parts[0] < 1 or parts[1] < parts[0]:
        raise argparse.ArgumentTypeError(f"expected N or LO-HI with 1 <= LO <= HI, got {text!r}")
    return parts[0], parts[1]


def _default_backgrounds() -> Path | None:
    return DEFAULT_BACKGROUNDS if DEFAULT_BACKGROUNDS.is_dir() else None


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="training data (mesh library, synthetic scenes)")
    sub = parser.add_subparsers(dest="data_command", required=True)

    m = sub.add_parser(
        "meshes",
        help="build the training mesh library (BOP models) from pybullet_data",
        description="Collect object meshes (default: the pybullet_data package), drop scene-scale, collision and "
        "BOP-test-object meshes, normalise to 3-30 cm, colour them and write DIR/models/obj_%%06d.ply (mm), "
        "models_info.json and manifest.json (split train|val by object).",
    )
    m.add_argument("--out", required=True, type=Path, help="output directory")
    m.add_argument("--source", type=Path, default=None, help="mesh tree (default: the pybullet_data package)")
    m.add_argument("--max", type=int, default=None, help="at most N objects (seeded random subset)")
    m.add_argument("--val-fraction", type=float, default=0.1, help="fraction of objects held out (default 0.1)")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--textures", type=Path, default=None,
                   help=f"photo directory for textures (default: {DEFAULT_BACKGROUNDS} when present)")
    m.add_argument("--no-symmetry", action="store_true", help="skip symmetry detection")
    m.add_argument("--procedural", type=int, default=0, metavar="N",
                   help="add N procedural everyday objects (boxes, tins, bottles, vessels, tools, ...) with printed "
                   "label textures after the discovered meshes (default 0)")
    m.add_argument("--no-pybullet", action="store_true",
                   help="no mesh source: a purely procedural library (needs --procedural N)")
    m.set_defaults(func=_meshes_handler)

    s = sub.add_parser(
        "synth",
        help="render synthetic BOP scenes from the mesh library",
        description="Render BOP-format scenes (rgb, depth, masks, xyz maps, scene_gt/camera/gt_info) with objects "
        "of one split of the mesh library. Resumable: finished images and scenes are skipped.",
    )
    s.add_argument("--meshes", required=True, type=Path, help="mesh library directory (osop data meshes --out)")
    s.add_argument("--out", required=True, type=Path, help="output dataset directory")
    s.add_argument("--scenes", required=True, type=int, help="number of scene directories")
    s.add_argument("--split", choices=("train", "val"), default="train")
    s.add_argument("--split-dir", default=None, help="scene folder name (default: train_synth for train, test for val)")
    s.add_argument("--images-per-scene", type=int, default=25)
    s.add_argument("--backgrounds", type=Path, default=None,
                   help=f"background photos (default: {DEFAULT_BACKGROUNDS} when present; else procedural only)")
    s.add_argument("--width", type=int, default=640)
    s.add_argument("--height", type=int, default=480)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--objects-per-scene", type=_range, default=(3, 8), metavar="LO-HI",
                   help="annotated objects per image (default 3-8), plus 0-3 distractors")
    s.add_argument("--layout", choices=("floating", "tabletop"), default="floating",
                   help="floating: objects in front of a photo (default); tabletop: objects resting on a textured "
                   "table with walls, cast shadows, light colour, vignetting and depth sensor noise")
    s.set_defaults(func=_synth_handler)


def _meshes_handler(args: argparse.Namespace) -> int:
    from osop_ros.core.types import InvalidInputError
    from osop_ros.data.meshes import MeshLibraryBuilder, MeshLibraryConfig, list_images, pybullet_data_root

    if args.no_pybullet and args.source is not None:
        raise InvalidInputError("--no-pybullet and --source exclude each other")
    if args.no_pybullet and args.procedural <= 0:
        raise InvalidInputError("--no-pybullet needs --procedural N with N > 0")
    source = None if args.no_pybullet else args.source if args.source is not None else pybullet_data_root()
    textures = list_images(args.textures if args.textures is not None else _default_backgrounds())
    cfg = MeshLibraryConfig(detect_symmetry=not args.no_symmetry)
    package = "pybullet_data" if args.source is None else str(args.source)
    t0 = time.perf_counter()
    manifest = MeshLibraryBuilder(cfg, texture_images=textures, source_package=package)(
        source, args.out, max_objects=args.max, val_fraction=args.val_fraction, seed=args.seed,
        procedural=args.procedural,
    )
    c = manifest["counts"]
    reasons: dict[str, int] = {}
    for sk in manifest["skipped"]:
        key = sk["reason"].split(":")[0].split(" (")[0].split(" '")[0]
        reasons[key] = reasons.get(key, 0) + 1
    print(f"mesh library: {args.out} ({time.perf_counter() - t0:.0f} s)")
    print(f"objects: {c['objects']} (train {c['train']}, val {c['val']}), symmetric {c['symmetric']}, "
          f"colours {json.dumps(c['colour_modes'])}")
    print(f"skipped: {c['skipped']} " + json.dumps(reasons))
    if c.get("procedural"):
        print(f"procedural: {c['procedural']} {json.dumps(c['procedural_kinds'])}, "
              f"{c['procedural_objects_per_s']:.2f} objects/s")
    print(f"throughput: {c['objects_per_s']:.2f} objects/s")
    print(f"blocklist check: {'passed' if manifest['blocklist_check']['passed'] else 'FAILED'}")
    return 0


def _synth_handler(args: argparse.Namespace) -> int:
    from osop_ros.core.render import Renderer
    from osop_ros.data.synth import SynthConfig, make_generator

    cfg = SynthConfig(width=args.width, height=args.height, images_per_scene=args.images_per_scene,
                      objects_per_image=args.objects_per_scene, layout=args.layout)
    bgs = args.backgrounds if args.backgrounds is not None else _default_backgrounds()
    with Renderer() as renderer:
        gen = make_generator(args.meshes, renderer, cfg, bgs)
        stats = gen(args.out, args.split, args.scenes, seed=args.seed, split_dir=args.split_dir)
    rate = stats["images_per_s"]
    print(f"synthetic {stats['split']} data: {args.out}/{stats['split_dir']} — {stats['scenes']} scenes, "
          f"{stats['images']} images ({stats['rendered_now']} rendered now in {stats['seconds']:.0f} s"
          f"{f', {rate:.2f} images/s' if rate else ''}), {stats['objects_in_split']} objects in split, "
          f"{stats['test_targets']} test targets")
    return 0
