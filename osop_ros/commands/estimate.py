"""``osop estimate``: poses of configured objects in one RGB(-D) image, as JSON + an overlay PNG."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from osop_ros.core.types import CameraIntrinsics, InvalidInputError


def read_camera(path: str | None, k: str | None, width: int, height: int) -> CameraIntrinsics:
    """``--camera`` BOP ``camera.json`` ({fx, fy, cx, cy} or {cam_K}) or ``--K fx,fy,cx,cy``."""
    if k:
        vals = [float(v) for v in k.split(",")]
        if len(vals) != 4:
            raise InvalidInputError("--K needs fx,fy,cx,cy")
        return CameraIntrinsics(*vals, width, height)
    if not path:
        raise InvalidInputError("give --camera JSON or --K fx,fy,cx,cy")
    data = json.loads(Path(path).read_text())
    if "cam_K" in data:
        return CameraIntrinsics.from_K(data["cam_K"], width, height)
    return CameraIntrinsics(float(data["fx"]), float(data["fy"]), float(data["cx"]), float(data["cy"]), width, height)


def read_image_rgb(path: str) -> np.ndarray:
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise InvalidInputError(f"cannot read image {path}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_depth_m(path: str, depth_scale: float) -> np.ndarray:
    """16-bit PNG whose values x ``depth_scale`` are millimetres (BOP convention) -> float32 metres."""
    import cv2

    d = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if d is None or d.ndim != 2:
        raise InvalidInputError(f"cannot read a single-channel depth image from {path}")
    return (d.astype(np.float32) * depth_scale / 1000.0).astype(np.float32)


def _run(args: argparse.Namespace) -> int:
    import cv2

    from osop_ros.core.config import WeightsConfig, load_config
    from osop_ros.core.factory import build_pipeline
    from osop_ros.core.overlay import draw_estimates
    from osop_ros.core.types import Observation

    extra: dict = {}
    if args.weights_dir:
        extra["weights"] = {s: str(Path(args.weights_dir) / f"{s}.pt") for s in ("segment", "match", "correspond")}
    if args.cache_dir:
        extra["templates"] = {"cache_dir": str(args.cache_dir)}
    if args.config:
        cfg = load_config(args.config)
        if "weights" in extra:
            cfg.weights = WeightsConfig(**extra["weights"])
        if args.cache_dir:
            cfg.templates.cache_dir = str(args.cache_dir)
    elif args.mesh:
        cfg = load_config(
            {
                "objects": [
                    {
                        "name": args.name or Path(args.mesh).stem.replace("-", "_"),
                        "mesh": str(Path(args.mesh).resolve()),
                        "units": args.units,
                    }
                ],
                "device": args.device,
                **extra,
            }
        )
    else:
        raise InvalidInputError("give --mesh PATH or --config YAML")
    rgb = read_image_rgb(args.rgb)
    h, w = rgb.shape[:2]
    cam = read_camera(args.camera, args.K, w, h)
    depth = read_depth_m(args.depth, args.depth_scale) if args.depth else None
    pipe = build_pipeline(cfg)
    ests = pipe(Observation(rgb, cam, depth))
    ests = [e for e in ests if e.score >= cfg.pipeline.score_threshold]
    result = [
        {
            "object": e.object_name,
            "score": round(e.score, 4),
            "T_cam_obj": np.round(e.T_cam_obj, 6).tolist(),
            "timings_s": {k: round(v, 4) for k, v in e.timings.items()},
        }
        for e in ests
    ]
    print(json.dumps(result, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = {o.name: o.model.sample_surface(2000, seed=0)[0] for o in pipe.objects}
    diam = {o.name: o.model.diameter for o in pipe.objects}
    img = draw_estimates(rgb, cam.K, ests, samples, diam)
    cv2.imwrite(str(out / "overlay.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    (out / "poses.json").write_text(json.dumps(result, indent=1))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("estimate", help="estimate object poses in one image")
    p.add_argument("--rgb", required=True)
    p.add_argument("--depth", help="16-bit depth PNG (value x depth-scale = mm)")
    p.add_argument("--depth-scale", type=float, default=1.0)
    p.add_argument("--camera", help="camera JSON (BOP camera.json style)")
    p.add_argument("--K", help="fx,fy,cx,cy")
    p.add_argument("--mesh", help="object mesh (alternative to --config)")
    p.add_argument("--units", default="auto", choices=("mm", "m", "auto"))
    p.add_argument("--name", help="object name (default: mesh file stem)")
    p.add_argument("--config", help="osop YAML config")
    p.add_argument("--device", default="auto")
    p.add_argument("--weights-dir", help="directory with segment.pt, match.pt, correspond.pt (default: shipped)")
    p.add_argument("--cache-dir", help="template cache directory (default: ~/.cache/osop/templates)")
    p.add_argument("--out", default="out/estimate")
    p.set_defaults(func=_run)
