"""``osop demo``: the whole pipeline on the embedded example object in a synthetic RGB-D scene.

No ROS, no downloads: the scene (procedural background, coloured clutter, a tilted table plane
in depth, sensor noise) is rendered on the fly with a known ground truth; the shipped weights
run all four stages; errors against ground truth and per-stage timings are printed and an
overlay PNG is written.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import trimesh

from osop_ros.core.geometry import (
    look_at,
    make_T,
    random_rotation,
    rotation_about_axis,
    rotation_error_sym_deg,
    transform_points,
)
from osop_ros.core.types import CameraIntrinsics, Observation

log = logging.getLogger(__name__)


@dataclass
class DemoScene:
    """A rendered scene with ground truth. T_cam_obj (4, 4) of the example object, metres."""

    obs: Observation
    T_cam_obj: np.ndarray
    visib_fract: float


def _distractors(rng: np.random.Generator) -> list[trimesh.Trimesh]:
    shapes = [
        trimesh.creation.cylinder(radius=0.03, height=0.1, sections=32),
        trimesh.creation.icosphere(subdivisions=3, radius=0.035),
        trimesh.creation.box((0.06, 0.08, 0.04)),
        trimesh.creation.torus(0.04, 0.012),
        trimesh.creation.capsule(height=0.06, radius=0.02),
    ]
    out = []
    for m in shapes:
        col = np.r_[rng.integers(30, 230, 3), 255].astype(np.uint8)
        m.visual = trimesh.visual.ColorVisuals(m, vertex_colors=np.tile(col, (len(m.vertices), 1)))
        out.append(m)
    return out


def tabletop_rotation(
    rng: np.random.Generator, el_deg: tuple[float, float] = (10.0, 75.0), roll_deg: float = 30.0
) -> np.ndarray:
    """R_cam_obj of a camera looking down at an upright object (model +z up): random azimuth,
    elevation in ``el_deg``, roll within +-``roll_deg`` — the views a tabletop robot sees."""
    el, az = np.radians(rng.uniform(*el_deg)), rng.uniform(0, 2 * np.pi)
    T = look_at(np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)]))
    return rotation_about_axis(np.array([0.0, 0.0, 1.0]), np.radians(rng.uniform(-roll_deg, roll_deg))) @ T[:3, :3]


def make_demo_scene(seed: int = 0, width: int = 640, height: int = 480, n_distractors: int = 4) -> DemoScene:
    """Render the example object among distractors with a known pose (deterministic for a seed)."""
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer
    from osop_ros.data.augment import add_noise, depth_noise, procedural_background
    from osop_ros.data.example import EXAMPLE_PATH

    rng = np.random.default_rng(seed)
    cam = CameraIntrinsics(600.0, 600.0, (width - 1) / 2 + 4.0, (height - 1) / 2 - 3.0, width, height)
    K = cam.K
    target = ObjectModel.load(EXAMPLE_PATH, units="m", name="example_object")
    T_gt = make_T(
        tabletop_rotation(rng), np.array([rng.uniform(-0.05, 0.05), rng.uniform(-0.04, 0.04), rng.uniform(0.5, 0.7)])
    )
    objects = [("target", T_gt)]
    with Renderer() as r:
        r.add_object("target", target)
        for i, m in enumerate(_distractors(rng)[:n_distractors]):
            key = f"d{i}"
            r.add_object(key, ObjectModel.from_trimesh(m, name=key))
            ang = 2 * np.pi * i / n_distractors + rng.uniform(-0.3, 0.3)
            rad = rng.uniform(0.08, 0.16)
            t = T_gt[:3, 3] + np.array([rad * np.cos(ang), 0.8 * rad * np.sin(ang), rng.uniform(-0.12, 0.1)])
            objects.append((key, make_T(random_rotation(rng), t)))
        full = r.render(K, width, height, objects[:1])
        out = r.render(
            K, width, height, objects, ambient=0.45, diffuse=0.6, specular=0.1, light_dir_cam=np.array([0.3, 0.5, 1.0])
        )
    visib = float((out.inst == 1).sum() / max(1, full.mask.sum()))
    bg = procedural_background(rng, height, width)
    rgb = np.where(out.mask[..., None], out.rgb, bg)
    rgb = add_noise(rgb, rng)
    # table plane behind the objects, tilted: z = z0 + a * v
    v = np.arange(height, dtype=np.float32)[:, None] * np.ones((1, width), np.float32)
    plane = (T_gt[2, 3] + 0.25 - 0.0004 * (v - height / 2)).astype(np.float32)
    depth = np.where(out.mask, out.depth, plane).astype(np.float32)
    depth = depth_noise(depth, rng)
    return DemoScene(Observation(rgb=rgb, camera=cam, depth=depth), T_gt, visib)


def demo_config(cache_dir: str = "") -> dict:
    """Config of the demo: the embedded example object with the shipped weights."""
    return {
        "objects": [{"name": "example_object", "mesh": "package://osop_ros/assets/example_object.ply", "units": "m"}],
        "templates": {"cache_dir": cache_dir},
        "pipeline": {"max_instances": 1},
    }


def run_demo(out_dir: Path, seed: int = 0, n_frames: int = 3, modality: str = "rgbd") -> dict:
    """Build/reuse the bank, run the pipeline on ``n_frames`` scenes, print errors + timings, write overlays."""
    import cv2

    from osop_ros.core.config import load_config
    from osop_ros.core.factory import build_pipeline
    from osop_ros.core.overlay import draw_estimates, draw_pose

    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pipe = build_pipeline(load_config(demo_config()))
    if not pipe.objects:
        raise RuntimeError("the example object could not be onboarded (see the log)")
    t_ready = time.perf_counter() - t0
    obj = pipe.objects[0]
    samples = obj.model.sample_surface(2000, seed=0)[0]
    diam = obj.model.diameter
    print(f"pipeline ready in {t_ready:.1f} s ({len(obj.bank)} templates, device {pipe.networks.device})")
    rows = []
    for f in range(n_frames):
        scene = make_demo_scene(seed + f)
        obs = scene.obs if modality == "rgbd" else Observation(scene.obs.rgb, scene.obs.camera, None)
        t = time.perf_counter()
        ests = pipe(obs)
        dt = time.perf_counter() - t
        row = {"frame": f, "visib_fract": round(scene.visib_fract, 3), "latency_s": round(dt, 3)}
        if ests:
            e = ests[0]
            row.update(
                found=True,
                score=round(e.score, 3),
                rot_err_deg=round(rotation_error_sym_deg(e.R, scene.T_cam_obj[:3, :3], obj.sym_Ts), 2),
                trans_err_mm=round(float(np.linalg.norm(e.t - scene.T_cam_obj[:3, 3]) * 1000), 1),
                add_pct_diam=round(
                    float(
                        np.linalg.norm(
                            transform_points(e.T_cam_obj, samples) - transform_points(scene.T_cam_obj, samples), axis=1
                        ).mean()
                        / diam
                        * 100
                    ),
                    1,
                ),
                timings={k: round(v, 3) for k, v in e.timings.items()},
            )
        else:
            row.update(found=False)
        rows.append(row)
        gt_overlay = np.ascontiguousarray(obs.rgb.copy())
        draw_pose(gt_overlay, obs.camera.K, scene.T_cam_obj, samples, "", (255, 255, 255), 0.5 * diam)
        cv2.putText(
            gt_overlay, "white: ground truth", (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA
        )
        img = draw_estimates(gt_overlay, obs.camera.K, ests, {obj.name: samples}, {obj.name: diam})
        cv2.imwrite(str(out_dir / f"demo_overlay_{f}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    print(
        f"\n{'frame':>5} {'visib':>6} {'found':>6} {'score':>6} {'rot_err':>8} "
        f"{'t_err_mm':>9} {'ADD%d':>6} {'latency':>8}"
    )
    for r in rows:
        if r["found"]:
            print(
                f"{r['frame']:>5} {r['visib_fract']:>6.2f} {'yes':>6} {r['score']:>6.2f} {r['rot_err_deg']:>8.1f} "
                f"{r['trans_err_mm']:>9.1f} {r['add_pct_diam']:>6.1f} {r['latency_s']:>7.2f}s"
            )
        else:
            print(
                f"{r['frame']:>5} {r['visib_fract']:>6.2f} {'no':>6} {'-':>6} {'-':>8} {'-':>9} {'-':>6} "
                f"{r['latency_s']:>7.2f}s"
            )
    found = [r for r in rows if r["found"]]
    if found:
        stages = sorted({k for r in found for k in r["timings"]})
        print(
            "\nstage timings (mean s): "
            + ", ".join(f"{k} {np.mean([r['timings'].get(k, 0) for r in found]):.3f}" for k in stages)
        )
    summary = {
        "ready_s": round(t_ready, 2),
        "modality": modality,
        "frames": rows,
        "overlays": [str(out_dir / f"demo_overlay_{f}.png") for f in range(n_frames)],
    }
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\noverlays and summary written to {out_dir}/")
    return summary
