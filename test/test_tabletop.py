"""Tabletop scenes (``osop data synth --layout tabletop``): resting objects, camera, shadows, sensor effects."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import trimesh

from osop_ros.core.geometry import invert_T
from osop_ros.core.types import InvalidInputError
from osop_ros.data.meshes import MeshLibraryBuilder, MeshLibraryConfig
from osop_ros.data.synth import MeshLibrary, SynthConfig, SynthGenerator, _same_config
from osop_ros.data.tabletop import (
    TabletopConfig,
    kelvin_tint,
    look_at,
    resting_rotation,
    sample_tabletop,
    shadow_factor,
    vignette,
)

W, H = 160, 120


def test_resting_rotation_puts_a_box_on_its_broad_face() -> None:
    box = trimesh.creation.box(extents=(0.2, 0.1, 0.06)).vertices
    rng = np.random.default_rng(0)
    broad = 0
    for _ in range(200):
        R = resting_rotation(box, rng)
        p = box @ R.T
        bottom = np.abs(p[:, 2] - p[:, 2].min()) < 1e-9
        assert bottom.sum() == 4  # a whole face down, not an edge or a corner
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-9) and np.linalg.det(R) == pytest.approx(1.0)
        broad += np.ptp(p[:, 2]) == pytest.approx(0.06)
    assert broad > 0.7 * 200  # area / h^2: the 20 x 10 cm face wins (~80 %)


def test_look_at_projects_the_target_to_the_principal_point() -> None:
    target, cam = np.array([0.1, -0.2, 0.05]), np.array([0.6, 0.3, 0.7])
    T_cam_world = invert_T(look_at(cam, target))
    p = T_cam_world[:3, :3] @ target + T_cam_world[:3, 3]
    assert p[:2] == pytest.approx([0, 0], abs=1e-12) and p[2] == pytest.approx(np.linalg.norm(target - cam))
    assert (T_cam_world[:3, :3] @ np.array([0.0, 0.0, 1.0]))[1] < 0  # world up points up in the image (-y)


@pytest.fixture(scope="module")
def mesh_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    shapes = [
        trimesh.creation.box(extents=(2.0, 1.0, 0.6)),
        trimesh.creation.cylinder(radius=0.3, height=1.0, sections=32),
        trimesh.creation.icosphere(subdivisions=2, radius=0.5),
        trimesh.creation.cone(radius=0.5, height=0.8),
        trimesh.creation.box(extents=(1.0, 1.0, 0.2)),
    ]
    for i, m in enumerate(shapes):
        p = src / f"random_urdfs/{i:03d}/{i:03d}.obj"
        p.parent.mkdir(parents=True)
        m.export(str(p))
    out = tmp_path_factory.mktemp("lib")
    cfg = MeshLibraryConfig(min_faces=300, max_faces=1500, min_diameter=0.08, max_diameter=0.2, detect_symmetry=False)
    MeshLibraryBuilder(cfg)(src, out, val_fraction=0.0, seed=1, progress=False)
    return out


@pytest.fixture(scope="module")
def renderer():
    from osop_ros.core.render import Renderer, RendererError

    try:
        r = Renderer()
    except RendererError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no headless GL: {exc}")
    yield r
    r.release()


def test_objects_rest_on_the_table_without_overlap(mesh_lib: Path, renderer) -> None:
    lib = MeshLibrary(mesh_lib)
    gen = SynthGenerator(lib, renderer, SynthConfig(width=W, height=H, layout="tabletop"))
    pool = lib.object_ids("train")
    diam = {i: lib.diameter(i) for i in pool}
    cfg = TabletopConfig()
    for seed in range(5):
        sc = sample_tabletop(np.random.default_rng(seed), pool, 4, 1, diam, gen._ensure, W, H, cfg)
        assert sc.obj_ids and len(sc.poses) == len(sc.obj_ids) == len(sc.distractor)
        T_world_cam = invert_T(sc.T_cam_world)
        cam, axis = T_world_cam[:3, 3], T_world_cam[:3, 2]
        el = np.degrees(np.arcsin(-axis[2]))  # the optical axis points down at the table
        assert cam[2] > 0.05 and cfg.elevation_range_deg[0] - 3 < el < cfg.elevation_range_deg[1] + 3
        boxes = []
        for oid, T in zip(sc.obj_ids, sc.poses, strict=True):
            p = gen._ensure(oid) @ (T_world_cam @ T)[:3, :3].T + (T_world_cam @ T)[:3, 3]
            assert p[:, 2].min() == pytest.approx(0.0, abs=1e-6)  # resting on z = 0, not floating or sunk
            boxes.append((p[:, :2].mean(0), np.linalg.norm(p[:, :2] - p[:, :2].mean(0), axis=1).max()))
        for i in range(len(boxes)):
            for j in range(i):  # footprint circles (about the footprint box centre) do not intersect
                assert np.linalg.norm(boxes[i][0] - boxes[j][0]) > 0.5 * (boxes[i][1] + boxes[j][1])


def test_tabletop_images_are_consistent(mesh_lib: Path, renderer) -> None:
    lib = MeshLibrary(mesh_lib)
    gen = SynthGenerator(lib, renderer, SynthConfig(width=W, height=H, layout="tabletop", objects_per_image=(2, 4)))
    pool = lib.object_ids("train")
    for seed in range(3):
        d = gen.render_image(np.random.default_rng([seed, 3]), pool)
        inst, depth, xyz = d["inst"], d["depth"], d["xyz"]
        assert d["rgb"].shape == (H, W, 3) and d["rgb"].dtype == np.uint8
        assert inst.max() <= len(d["gt"]) and len(d["masks"]) == len(d["gt"])
        for k, mv in enumerate(d["masks_visib"]):
            np.testing.assert_array_equal(mv, inst == k + 1)  # table/wall pixels are not instances
            assert not (mv & ~d["masks"][k]).any()
        assert not xyz[inst == 0].any()  # model coordinates only on objects
        assert (depth > 0).mean() > 0.5  # the table is in the depth image, not only the objects
        on = inst > 0
        if on.any():  # depth noise: holes along edges, but most object pixels keep a value
            assert (depth[on] > 0).mean() > 0.6


def test_shadow_falls_away_from_the_light(mesh_lib: Path, renderer) -> None:
    lib = MeshLibrary(mesh_lib)
    gen = SynthGenerator(lib, renderer, SynthConfig(width=W, height=H, layout="tabletop"))
    oid = lib.object_ids("train")[1]  # the cylinder, standing
    hull = gen._ensure(oid)
    cfg = TabletopConfig(shadow_strength=(0.6, 0.6), shadow_blur_px=(0.0, 0.0))
    T_world_obj = np.eye(4)
    T_world_obj[2, 3] = -hull[:, 2].min()
    T_world_cam = look_at(np.array([0.0, -0.35, 0.45]), np.array([0.0, 0.0, 0.03]))
    T_cam_world = invert_T(T_world_cam)
    K = np.array([[150.0, 0, (W - 1) / 2], [0, 150.0, (H - 1) / 2], [0, 0, 1]])
    from osop_ros.data.tabletop import TabletopScene, add_environment

    light_w = np.array([1.0, 0.0, -1.0]) / np.sqrt(2)  # travels towards +x, down at 45 degrees
    sc = TabletopScene(K, T_cam_world, [oid], [T_cam_world @ T_world_obj], [False], T_cam_world[:3, :3] @ light_w,
                       light_w, wall=False)
    env = add_environment(renderer, sc, np.random.default_rng(0), (), cfg)
    out = renderer.render(K, W, H, env + [(str(oid), sc.poses[0])])
    lit = shadow_factor(renderer, sc, [(str(oid), sc.poses[0])], out.depth, np.random.default_rng(0), cfg)
    shadow = (lit < 0.9) & (out.inst == 1)  # on the table (render index 1)
    assert shadow.sum() > 20
    vs, us = np.nonzero(shadow)
    z = out.depth[vs, us]
    pc = np.stack([(us - K[0, 2]) / K[0, 0] * z, (vs - K[1, 2]) / K[1, 1] * z, z], axis=1)
    pw = pc @ T_world_cam[:3, :3].T + T_world_cam[:3, 3]
    assert pw[:, 0].mean() > 0.02 and abs(pw[:, 1].mean()) < 0.03  # cast along +x from the object at the origin
    assert np.allclose(lit[out.inst == 0], 1.0)  # nothing rendered: no shadow


def test_sensor_effects_and_config() -> None:
    img = np.full((40, 60, 3), 200, np.uint8)
    v = vignette(img, 0.4)
    assert v[20, 30].mean() > v[0, 0].mean() + 50 and v[0, 0].mean() == pytest.approx(120, abs=2)
    warm, cool = kelvin_tint(2800.0), kelvin_tint(7500.0)
    assert warm[0] > warm[2] and cool[2] > cool[0] and warm.mean() == pytest.approx(1.0)
    with pytest.raises(InvalidInputError, match="layout"):
        SynthConfig(layout="hovering")
    old = json.loads(json.dumps(asdict(SynthConfig())))
    for k in ("layout", "tabletop"):
        old.pop(k)
    assert _same_config(old, json.loads(json.dumps(asdict(SynthConfig()))))  # runs from before the layouts resume
    assert not _same_config(old, json.loads(json.dumps(asdict(SynthConfig(layout="tabletop")))))
