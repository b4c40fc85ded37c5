"""Synthetic BOP scenes: layout, ground-truth consistency (poses / masks / xyz / depth), resume, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import trimesh
from scipy.spatial import cKDTree

from osop_ros.core.geometry import project_points, transform_points
from osop_ros.core.mesh import ObjectModel
from osop_ros.data.meshes import MeshLibraryBuilder, MeshLibraryConfig
from osop_ros.data.synth import (
    DEPTH_SCALE,
    MeshLibrary,
    SynthConfig,
    SynthGenerator,
    _upright_rotation,
    background_plane_depth,
    sample_image_spec,
)

W, H = 128, 96
CFG = SynthConfig(width=W, height=H, images_per_scene=3, objects_per_image=(2, 4), distractors_per_image=(0, 1),
                  depth_range=(0.35, 0.7))


@pytest.fixture(scope="module")
def mesh_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    shapes = [
        trimesh.creation.box(extents=(2.0, 1.0, 0.6)),
        trimesh.creation.cylinder(radius=0.3, height=1.0, sections=32),
        trimesh.creation.icosphere(subdivisions=2, radius=0.5),
        trimesh.creation.capsule(height=1.0, radius=0.25),
        trimesh.creation.cone(radius=0.5, height=0.8),
        trimesh.creation.box(extents=(1.0, 1.0, 0.2)),
    ]
    for i, m in enumerate(shapes):
        p = src / f"random_urdfs/{i:03d}/{i:03d}.obj"
        p.parent.mkdir(parents=True)
        m.export(str(p))
    out = tmp_path_factory.mktemp("lib")
    cfg = MeshLibraryConfig(min_faces=300, max_faces=1500, min_diameter=0.08, max_diameter=0.2, detect_symmetry=False)
    MeshLibraryBuilder(cfg)(src, out, val_fraction=0.34, seed=1, progress=False)
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


@pytest.fixture(scope="module")
def synth_out(tmp_path_factory: pytest.TempPathFactory, mesh_lib: Path, renderer) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    gen = SynthGenerator(MeshLibrary(mesh_lib), renderer, CFG)
    stats = gen(out, "train", 2, seed=5, progress=False)
    return out, stats


def test_sample_image_spec() -> None:
    rng = np.random.default_rng(0)
    pool = [3, 5, 8, 9, 11, 12, 20]
    diam = {i: 0.1 for i in pool}
    for _ in range(20):
        spec = sample_image_spec(rng, pool, diam, CFG)
        assert 1 <= len(spec.obj_ids) <= 5 and len(set(spec.obj_ids)) == len(spec.obj_ids)
        assert set(spec.obj_ids) <= set(pool)
        for T in spec.poses:
            assert CFG.depth_range[0] - 1e-9 <= T[2, 3] <= CFG.depth_range[1] + 1e-9
            np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-9)
            assert np.linalg.det(T[:3, :3]) > 0.999
        fx = spec.K[0, 0]
        assert 570 * W / 640 <= fx <= 620 * W / 640
    # small annotated objects are kept close enough to be >= min_projected_diameter px wide
    small = {i: 0.03 for i in pool}
    cfg_big = SynthConfig(depth_range=(0.35, 1.5))
    for _ in range(10):
        spec = sample_image_spec(rng, pool, small, cfg_big)
        for T, dis in zip(spec.poses, spec.distractor, strict=True):
            if not dis:
                assert spec.K[0, 0] * 0.03 / T[2, 3] >= cfg_big.min_projected_diameter - 1e-6
    cfg0 = SynthConfig(upright_tilt_deg=0.0)
    for _ in range(10):
        R = _upright_rotation(rng, cfg0)
        assert R[1, 2] < -0.15  # model +z points up in the image (camera -y)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)


def test_background_plane() -> None:
    K = np.array([[100.0, 0, 63.5], [0, 100.0, 47.5], [0, 0, 1]])
    z = background_plane_depth(np.random.default_rng(0), K, W, H, 1.2)
    assert z.shape == (H, W) and z.dtype == np.float32
    # at the principal point the plane is at z_behind (bilinear over the 4 neighbours)
    assert abs(float(z[47:49, 63:65].mean()) - 1.2) < 0.02
    assert (z >= 0).all() and (z <= 6.5).all()


@pytest.mark.gl
def test_layout(synth_out: tuple[Path, dict]) -> None:
    out, stats = synth_out
    assert stats["images"] == 6 and stats["rendered_now"] == 6
    for name in ("camera.json", "test_targets_bop19.json", "synth_info.json", "models/models_info.json"):
        assert (out / name).is_file(), name
    for s in range(2):
        sd = out / "train_synth" / f"{s:06d}"
        assert not (sd / ".partial").exists()
        gt = json.loads((sd / "scene_gt.json").read_text())
        cam = json.loads((sd / "scene_camera.json").read_text())
        info = json.loads((sd / "scene_gt_info.json").read_text())
        assert sorted(gt, key=int) == ["0", "1", "2"] and gt.keys() == cam.keys() == info.keys()
        for im in gt:
            i = int(im)
            assert (sd / "rgb" / f"{i:06d}.jpg").is_file()
            d = cv2.imread(str(sd / "depth" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED)
            assert d.dtype == np.uint16 and d.shape == (H, W)
            assert cam[im]["depth_scale"] == DEPTH_SCALE
            for k in range(len(gt[im])):
                assert (sd / "mask" / f"{i:06d}_{k:06d}.png").is_file()
                assert (sd / "mask_visib" / f"{i:06d}_{k:06d}.png").is_file()
    # readable by the project's BOP reader
    from osop_ros.data.bop import BopDataset

    ds = BopDataset(out, split="train_synth")
    assert ds.scene_ids == [0, 1] and ds.image_ids(1) == [0, 1, 2]
    frame = ds.load_frame(1, 2)
    assert frame.obs.rgb.shape == (H, W, 3) and frame.obs.depth is not None and frame.obs.depth.max() < 6.6
    assert frame.gts and all(g.obj_id in ds.obj_ids for g in frame.gts)
    assert ds.mask_visib(1, 2, 0) is not None
    models = json.loads((out / "models" / "models_info.json").read_text())
    manifest = json.loads((Path(json.loads((out / "synth_info.json").read_text())["mesh_dir"]) / "manifest.json")
                          .read_text())
    train_ids = {o["obj_id"] for o in manifest["objects"] if o["split"] == "train"}
    assert {int(k) for k in models} == train_ids


@pytest.mark.gl
def test_gt_consistency(synth_out: tuple[Path, dict]) -> None:
    out, _ = synth_out
    models: dict[int, ObjectModel] = {}
    n_checked = 0
    targets = json.loads((out / "test_targets_bop19.json").read_text())
    for s in range(2):
        sd = out / "train_synth" / f"{s:06d}"
        gt = json.loads((sd / "scene_gt.json").read_text())
        cam = json.loads((sd / "scene_camera.json").read_text())
        info = json.loads((sd / "scene_gt_info.json").read_text())
        for im in gt:
            i = int(im)
            K = np.array(cam[im]["cam_K"]).reshape(3, 3)
            depth_m = cv2.imread(str(sd / "depth" / f"{i:06d}.png"), cv2.IMREAD_UNCHANGED) * DEPTH_SCALE / 1000.0
            with np.load(sd / "xyz" / f"{i:06d}.npz", allow_pickle=False) as z:
                xyz = z["xyz"].astype(np.float64)
                inst = z["inst"]
            assert xyz.shape == (H, W, 3) and inst.shape == (H, W) and inst.max() <= len(gt[im])
            for k, (g, inf) in enumerate(zip(gt[im], info[im], strict=True)):
                oid = g["obj_id"]
                if oid not in models:
                    models[oid] = ObjectModel.load(out / "models" / f"obj_{oid:06d}.ply", units="mm")
                model = models[oid]
                T = np.eye(4)
                T[:3, :3] = np.array(g["cam_R_m2c"]).reshape(3, 3)
                T[:3, 3] = np.array(g["cam_t_m2c"]) / 1000.0
                mv = cv2.imread(str(sd / "mask_visib" / f"{i:06d}_{k:06d}.png"), cv2.IMREAD_GRAYSCALE) > 0
                mf = cv2.imread(str(sd / "mask" / f"{i:06d}_{k:06d}.png"), cv2.IMREAD_GRAYSCALE) > 0
                np.testing.assert_array_equal(mv, inst == k + 1)  # instance map == visible masks
                assert not (mv & ~mf).any()  # visible part inside the full silhouette
                assert 0.0 <= inf["visib_fract"] <= 1.0
                assert inf["px_count_visib"] == int(mv.sum())
                assert inf["px_count_all"] >= int(mf.sum())
                # the model projected with the GT pose covers the full mask's box (bbox_obj)
                uv = project_points(K, T, model.vertices.astype(np.float64))
                if inf["bbox_obj"][0] != -1:
                    x, y, w, h = inf["bbox_obj"]
                    assert abs(uv[:, 0].min() - x) <= 1.5 and abs(uv[:, 0].max() - (x + w - 1)) <= 1.5
                    assert abs(uv[:, 1].min() - y) <= 1.5 and abs(uv[:, 1].max() - (y + h - 1)) <= 1.5
                if not mv.any():
                    continue
                # xyz at visible pixels: on the model surface, projects back to its pixel, depth agrees
                vs, us = np.nonzero(mv)
                p_obj = xyz[vs, us]
                tree = cKDTree(model.sample_surface(20000, seed=0)[0])
                assert np.percentile(tree.query(p_obj)[0], 95) < 0.003
                p_cam = transform_points(T, p_obj)
                uv_p = p_cam[:, :2] / p_cam[:, 2:3] * [K[0, 0], K[1, 1]] + K[:2, 2]
                err = np.linalg.norm(uv_p - np.stack([us, vs], 1), axis=1)
                assert np.percentile(err, 95) < 0.75 and err.max() < 1.5
                dz = np.abs(p_cam[:, 2] - depth_m[vs, us])  # float16 xyz + 0.1 mm depth steps: ~0.1 mm
                assert dz.mean() < 6e-5 and dz.max() < 2e-4, (dz.mean(), dz.max())
                # projected vertices fall on the full mask (pixel-rounded, 1 px slack for edges)
                u_r, v_r = np.rint(uv[:, 0]).astype(int), np.rint(uv[:, 1]).astype(int)
                inside = (u_r >= 1) & (u_r < W - 1) & (v_r >= 1) & (v_r < H - 1)
                dil = cv2.dilate(mf.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
                assert dil[v_r[inside], u_r[inside]].mean() > 0.99
                if inf["visib_fract"] >= 0.1:
                    assert any(t["scene_id"] == s and t["im_id"] == i and t["obj_id"] == oid for t in targets)
                n_checked += 1
    assert n_checked >= 4
    assert all({"im_id", "inst_count", "obj_id", "scene_id"} == set(t) for t in targets)


@pytest.mark.gl
def test_resume_and_determinism(tmp_path: Path, mesh_lib: Path, renderer, synth_out: tuple[Path, dict],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    ref, _ = synth_out
    gen = SynthGenerator(MeshLibrary(mesh_lib), renderer, CFG)
    # interrupted while finishing scene 0: its images are done, the scene files are not
    calls = {"n": 0}
    orig = SynthGenerator.finish_scene

    def boom(self, scene_dir, n):  # noqa: ANN001
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(SynthGenerator, "finish_scene", boom)
    with pytest.raises(KeyboardInterrupt):
        gen(tmp_path, "train", 2, seed=5, progress=False)
    sd0 = tmp_path / "train_synth" / "000000"
    assert (sd0 / ".partial" / "000002.json").is_file() and not SynthGenerator.scene_complete(sd0)
    monkeypatch.setattr(SynthGenerator, "finish_scene", orig)
    stats = gen(tmp_path, "train", 2, seed=5, progress=False)
    assert stats["rendered_now"] == 3  # only scene 1
    again = gen(tmp_path, "train", 2, seed=5, progress=False)
    assert again["rendered_now"] == 0
    # seeded per image: identical to the reference run
    for s in range(2):
        for name in ("scene_gt.json", "scene_gt_info.json", "scene_camera.json"):
            a = json.loads((ref / "train_synth" / f"{s:06d}" / name).read_text())
            b = json.loads((tmp_path / "train_synth" / f"{s:06d}" / name).read_text())
            assert a == b
        for i in range(3):
            a = (ref / "train_synth" / f"{s:06d}" / "rgb" / f"{i:06d}.jpg").read_bytes()
            b = (tmp_path / "train_synth" / f"{s:06d}" / "rgb" / f"{i:06d}.jpg").read_bytes()
            assert a == b
    # a different split never uses training objects; a mismatching re-run into the same dir is refused
    val = gen(tmp_path / "val", "val", 1, seed=5, progress=False)
    gt = json.loads((tmp_path / "val" / "test" / "000000" / "scene_gt.json").read_text())
    val_ids = set(MeshLibrary(mesh_lib).object_ids("val"))
    assert {g["obj_id"] for im in gt.values() for g in im} <= val_ids and val["rendered_now"] == 3
    from osop_ros.data.bop import BopDataset

    ds = BopDataset(tmp_path / "val")  # default split "test" + test_targets_bop19.json
    assert ds.targets_file is not None and ds.scene_ids == [0]
    from osop_ros.core.types import InvalidInputError

    with pytest.raises(InvalidInputError):
        gen(tmp_path, "train", 2, seed=6, progress=False)
