"""``osop bench``: per-stage latency (p50/p95) at 640x480, peak RSS, template bank build time/size.

Writes ``bench.json`` and ``bench.md`` (a markdown table) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run(args: argparse.Namespace) -> int:
    import torch

    from osop_ros.commands.templates import benchmark_template_bank
    from osop_ros.core.config import load_config
    from osop_ros.core.factory import build_pipeline
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.templates import TemplateConfig
    from osop_ros.demo import demo_config, make_demo_scene

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": args.device, "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    # 1. template bank of the example object, from scratch
    from osop_ros.data.example import EXAMPLE_PATH

    model = ObjectModel.load(EXAMPLE_PATH, units="m", name="example_object")
    with tempfile.TemporaryDirectory() as tmp:
        report["template_bank"] = {
            k: round(float(v), 3) for k, v in benchmark_template_bank(model, TemplateConfig(), tmp).items()
        }
    # 2. pipeline latency per stage on N synthetic 640x480 frames
    cfg = demo_config()
    cfg["device"] = args.device
    cfg["pipeline"]["icp"] = not args.no_icp
    if args.segmenter:
        cfg["pipeline"].update(segmenter=args.segmenter, segmenter_rgb="same")
    if args.proposal_grid:
        gx, gy = (int(v) for v in args.proposal_grid.split(","))
        cfg["pipeline"].update(proposal_grid_x=gx, proposal_grid_y=gy)
    if args.proposal_peaks is not None:
        cfg["pipeline"]["proposal_head_peaks"] = args.proposal_peaks
    if args.proposal_image_size is not None:
        cfg["pipeline"]["proposal_image_size"] = args.proposal_image_size
    if args.segment_weights:
        cfg["weights"] = {"segment": args.segment_weights}
    report["segmenter"] = args.segmenter or "config default"
    t0 = time.perf_counter()
    pipe = build_pipeline(load_config(cfg))
    report["pipeline_ready_s"] = round(time.perf_counter() - t0, 2)
    report["device_resolved"] = str(pipe.networks.device)
    scenes = [make_demo_scene(seed=100 + i) for i in range(min(args.frames, 8))]
    per_stage: dict[str, list[float]] = {}
    totals = []
    pipe(scenes[0].obs)  # warm-up
    for i in range(args.frames):
        obs = scenes[i % len(scenes)].obs
        if args.modality == "rgb":
            obs = type(obs)(obs.rgb, obs.camera, None)
        t = time.perf_counter()
        ests = pipe(obs)
        totals.append(time.perf_counter() - t)
        for e in ests:
            for k, v in e.timings.items():
                per_stage.setdefault(k, []).append(v)
    stats = {
        k: {"p50": round(float(np.percentile(v, 50)), 4), "p95": round(float(np.percentile(v, 95)), 4)}
        for k, v in per_stage.items()
    }
    stats["frame_total"] = {
        "p50": round(float(np.percentile(totals, 50)), 4),
        "p95": round(float(np.percentile(totals, 95)), 4),
    }
    report["symmetry_search_can"] = _bench_symmetry_search(pipe)
    report.update(
        frames=args.frames,
        modality=args.modality,
        icp=not args.no_icp,
        latency_s=stats,
        peak_rss_mb=round(_peak_rss_mb(), 1),
    )
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    lines = ["| stage | p50 (s) | p95 (s) |", "|---|---|---|"]
    for k in ("segment", "depth_seg", "match", "correspond", "solve", "refine", "verify", "scale", "contour",
              "symmetry", "total", "frame_total"):
        if k in stats:
            lines.append(f"| {k} | {stats[k]['p50']:.3f} | {stats[k]['p95']:.3f} |")
    tb = report["template_bank"]
    lines += [
        "",
        f"- device: {report['device_resolved']}, torch threads: {report['torch_threads']}, "
        f"frames: {args.frames} at 640x480 ({args.modality}, icp={not args.no_icp}, segmenter: {report['segmenter']})",
        f"- peak RSS: {report['peak_rss_mb']} MB; pipeline ready in {report['pipeline_ready_s']} s",
        f"- template bank ({tb['n_views']:.0f} views): build {tb['build_s']:.1f} s, {tb['size_mb']:.1f} MB on disk, "
        f"reload {tb['reload_s']:.2f} s",
    ]
    sc = report["symmetry_search_can"]
    if sc:
        lines.append(f"- symmetry search on a labelled can (a solid of revolution, {sc['twins']} twins rendered; the "
                     f"frames above: the example object's own): p50 {sc['p50_s']:.3f} s, p95 {sc['p95_s']:.3f} s per "
                     "instance")
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _bench_symmetry_search(pipe: object, n: int = 10) -> dict:
    """Seconds per call of the pipeline's colour search over the symmetries of a two-tone can at 0.5 m
    (47 exact twins + near-symmetries): the cost a solid of revolution adds per instance; {} when off."""
    import trimesh

    from osop_ros.core.geometry import make_T, mask_to_box, rotation_about_axis
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer
    from osop_ros.core.stages import OnboardedObject
    from osop_ros.core.symmetry import approximate_symmetries, shape_symmetries
    from osop_ros.core.types import CameraIntrinsics, Observation, SegmentationResult

    search = getattr(pipe, "symmetry_search", None)
    if search is None:
        return {}
    mesh = trimesh.creation.cylinder(0.035, 0.11, sections=72)
    v = np.asarray(mesh.vertices)
    mesh.visual.vertex_colors = np.where((np.arctan2(v[:, 1], v[:, 0]) > 0)[:, None], [200, 40, 30, 255],
                                         [30, 60, 200, 255]).astype(np.uint8)
    obj = OnboardedObject("can", ObjectModel.from_trimesh(mesh, name="can"), bank=None, sym_Ts=[np.eye(4)])  # type: ignore[arg-type]
    cam = CameraIntrinsics(600.0, 600.0, 319.5, 239.5, 640, 480)
    T = make_T(rotation_about_axis(np.array([1.0, 0.2, 0.1]), 1.1), np.array([0.0, 0.0, 0.5]))
    with Renderer() as r:
        r.add_object("m", obj.model)
        out = r.render(cam.K, cam.width, cam.height, [("m", T)])
    obs = Observation(np.where(out.mask[..., None], out.rgb, np.uint8(90)), cam,
                      np.where(out.mask, out.depth, 0.9).astype(np.float32))
    seg = SegmentationResult(out.mask, out.mask.astype(np.float32), mask_to_box(out.mask), 0.9)
    twins = len(shape_symmetries(obj, search.config)) + len(approximate_symmetries(obj, search.config))
    search(obs, seg, obj, T)  # warm-up (renderer, mesh upload)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        search(obs, seg, obj, T)
        ts.append(time.perf_counter() - t)
    return {"twins": twins, "p50_s": round(float(np.percentile(ts, 50)), 4),
            "p95_s": round(float(np.percentile(ts, 95)), 4)}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency / memory / template-bank benchmark (prints numbers)")
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    p.add_argument("--modality", choices=("rgbd", "rgb"), default="rgbd")
    p.add_argument("--no-icp", action="store_true")
    p.add_argument("--segmenter", choices=("head", "proposals"), default=None,
                   help="stage 1 of every frame (default: the demo config's pipeline.segmenter, and its "
                        "segmenter_rgb for --modality rgb)")
    p.add_argument("--proposal-grid", default="", metavar="GX,GY", help="proposals: point-prompt grid (default 4,3)")
    p.add_argument("--proposal-peaks", type=int, default=None, help="proposals: head-peak prompts (default 4)")
    p.add_argument("--proposal-image-size", type=int, default=None,
                   help="proposals: MobileSAM input side in pixels (default: the config's, 640)")
    p.add_argument("--segment-weights", default="", help="stage-1 head checkpoint (default: the shipped one)")
    p.add_argument("--out", default="out/bench")
    p.set_defaults(func=_run)
