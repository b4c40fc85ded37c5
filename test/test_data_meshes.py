"""Training mesh library: discovery filters, normalisation, colours, symmetries, BOP output (no pybullet needed)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import trimesh
from trimesh.transformations import translation_matrix

from osop_ros.core.geometry import rotation_about_axis, rotation_angle_deg
from osop_ros.core.mesh import ObjectModel
from osop_ros.data.meshes import (
    MeshLibraryBuilder,
    MeshLibraryConfig,
    blocklist_reason,
    dedupe_by_signature,
    detect_symmetries,
    discover_meshes,
    load_manifest,
    shape_signature,
    skip_reason,
    split_object_ids,
)


def _export(mesh: trimesh.Trimesh, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(str(path))


@pytest.fixture(scope="module")
def fake_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pybullet_data-like tree: 4 usable shapes plus every kind of file that must be skipped."""
    root = tmp_path_factory.mktemp("pbdata")
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    _export(box, root / "random_urdfs/000/000.obj")
    _export(trimesh.creation.cylinder(radius=0.3, height=1.0, sections=48), root / "random_urdfs/001/001.obj")
    big = box.copy()
    big.apply_scale(3.0)
    _export(big, root / "random_urdfs/002/002.obj")  # same shape in other units -> near-duplicate
    ico = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    ico.vertices[:, 0] *= 1.6
    ico.vertices[:, 1] += 0.2 * (ico.vertices[:, 0] > 0.2)
    _export(ico, root / "toys/thing.obj")
    _export(ico.convex_hull, root / "toys/thing_vhacd.obj")  # collision proxy of thing.obj
    widget = trimesh.util.concatenate([trimesh.creation.box(extents=(40, 30, 20)),
                                       trimesh.creation.box(extents=(10, 10, 60),
                                                            transform=translation_matrix((15, 5, 10)))])
    _export(widget, root / "parts/widget.stl")
    _export(trimesh.creation.cylinder(radius=0.4, height=1.0), root / "objects/mug.obj")  # YCB-V object name
    plane = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], [[0, 1, 2], [0, 2, 3]])
    _export(plane, root / "plane.obj")
    _export(trimesh.creation.box(), root / "robot/meshes/collision/link1.obj")
    (root / "broken").mkdir()
    (root / "broken/empty.obj").write_text("")
    flat = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0], [0.5, 0.5, 0.0001]],
                           [[0, 1, 4], [1, 2, 4], [2, 3, 4], [3, 0, 4]])
    _export(flat, root / "broken/sheet.stl")
    return root


@pytest.fixture(scope="module")
def textures(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("tex")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        img = (rng.random((64, 96, 3)) * 255).astype(np.uint8)
        p = d / f"t{i}.png"
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


SMALL = MeshLibraryConfig(min_faces=400, max_faces=2000)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, fake_tree: Path, textures: list[Path]) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("lib")
    manifest = MeshLibraryBuilder(SMALL, texture_images=textures)(fake_tree, out, val_fraction=0.25, seed=3,
                                                                   progress=False)
    return out, manifest


def test_blocklist_names() -> None:
    assert blocklist_reason("ycb/025_mug/textured.obj")
    assert blocklist_reason("lm/models/duck.ply")
    assert blocklist_reason("T-LESS/obj_01.ply")
    assert blocklist_reason("objects/power_drill.stl")
    assert blocklist_reason("random_urdfs/000/000.obj") is None
    assert blocklist_reason("roboschool/models_outdoor/part0.obj") is None  # 'schoolmodels' must not hit 'lmo'
    assert blocklist_reason("differential/diff_carrier.stl") is None


def test_skip_rules() -> None:
    assert skip_reason("duck_vhacd.obj", {"duck", "duck_vhacd"})  # also blocklisted
    assert skip_reason("lego/lego_vhacd.obj", {"lego", "lego_vhacd"})
    assert skip_reason("teddy2_VHACD_CHs.obj", {"teddy2_vhacd_chs"}) is None  # no visual sibling: keep
    assert skip_reason("laikago/hip_motor_lores.obj", {"hip_motor", "hip_motor_lores"})
    assert skip_reason("franka/meshes/collision/link0.obj", {"link0"})
    assert skip_reason("plane100.obj", {"plane100"})
    assert skip_reason("samurai_monastry.obj", {"samurai_monastry"})
    assert skip_reason("cloth_z_up.obj", {"cloth_z_up"})
    assert skip_reason("toys/cylinder.obj", {"cylinder"}) is None


def test_discover(fake_tree: Path) -> None:
    keep, skipped = discover_meshes(fake_tree)
    rels = {c.rel for c in keep}
    assert "toys/thing.obj" in rels and "toys/thing_vhacd.obj" not in rels
    assert "objects/mug.obj" not in rels and "plane.obj" not in rels
    assert "robot/meshes/collision/link1.obj" not in rels
    reasons = {s["path"]: s["reason"] for s in skipped}
    assert "blocklist" in reasons["objects/mug.obj"]


def test_signature_invariance_and_dedupe() -> None:
    a = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    b = a.copy()
    b.apply_transform(trimesh.transformations.rotation_matrix(np.pi / 2, (0, 0, 1)))
    b.apply_scale(7.0)
    b.apply_translation((3, -2, 1))
    c = trimesh.creation.box(extents=(2.0, 1.5, 0.5))
    sa, sb, sc = shape_signature(a), shape_signature(b), shape_signature(c)
    np.testing.assert_allclose(sa, sb, atol=1e-9)
    assert dedupe_by_signature([sa, sb, sc]) == [0, 2]


def test_symmetry_detection() -> None:
    box = trimesh.creation.box(extents=(0.2, 0.1, 0.05))
    box = box.subdivide().subdivide()
    sym = detect_symmetries(box.vertices, box.faces)
    assert not sym.continuous
    assert len(sym.discrete) == 3  # three 180 deg flips about the box axes
    for R in sym.discrete:
        assert abs(rotation_angle_deg(R, np.eye(3)) - 180.0) < 1.0

    cyl = trimesh.creation.cylinder(radius=0.05, height=0.2, sections=64)
    sym = detect_symmetries(cyl.vertices, cyl.faces)
    assert len(sym.continuous) >= 1
    assert abs(abs(sym.continuous[0][2]) - 1.0) < 1e-3  # axis along z
    assert len(sym.discrete) == 1  # the flip

    lshape = trimesh.util.concatenate([trimesh.creation.box(extents=(0.2, 0.05, 0.05)),
                                       trimesh.creation.box(extents=(0.05, 0.12, 0.05),
                                                            transform=translation_matrix((0.075, 0.06, 0)))])
    lshape.vertices -= (lshape.vertices.max(0) + lshape.vertices.min(0)) / 2
    sym = detect_symmetries(lshape.vertices, lshape.faces)
    assert not sym.continuous and not sym.discrete
    # sanity: a rotation that is clearly not a symmetry of the box is not reported
    assert all(rotation_angle_deg(R, rotation_about_axis((0, 0, 1), np.pi / 2)) > 1 for R in
               detect_symmetries(box.vertices, box.faces).discrete)


def test_library_output(library: tuple[Path, dict], fake_tree: Path) -> None:
    out, manifest = library
    objs = manifest["objects"]
    assert [o["source_path"] for o in objs] == ["parts/widget.stl", "random_urdfs/000/000.obj",
                                                "random_urdfs/001/001.obj", "toys/thing.obj"]
    assert manifest["counts"]["objects"] == 4 and manifest["counts"]["val"] == 1 and manifest["counts"]["train"] == 3
    assert manifest["blocklist_check"]["passed"] is True
    assert "LM-O" in manifest["blocklist"]["datasets"]
    skipped = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert "near-duplicate" in skipped["random_urdfs/002/002.obj"]
    assert "degenerate" in skipped["broken/empty.obj"] and "degenerate" in skipped["broken/sheet.stl"]
    info = json.loads((out / "models" / "models_info.json").read_text())
    for o in objs:
        assert o["licence"] == "zlib (Bullet Physics / pybullet_data)"
        assert o["split"] in ("train", "val")
        assert blocklist_reason(o["source_path"]) is None
        path = out / "models" / f"obj_{o['obj_id']:06d}.ply"
        model = ObjectModel.load(path, units="mm")
        assert model.vertex_colors is not None and model.vertex_colors.shape == (len(model.vertices), 3)
        assert 0.03 - 1e-6 <= model.diameter <= 0.30 + 1e-6
        e = info[str(o["obj_id"])]
        assert abs(e["diameter"] - model.diameter * 1000) < 0.05
        np.testing.assert_allclose(model.center, 0.0, atol=1e-5)  # centred at the bbox centre
        np.testing.assert_allclose([e["min_x"], e["size_x"]], [model.bbox_min[0] * 1000, model.extent[0] * 1000],
                                   atol=0.01)
        assert SMALL.min_faces <= len(model.faces) <= SMALL.max_faces * 1.2
        assert o["faces"] == len(model.faces)
    box = next(o for o in objs if o["source_path"] == "random_urdfs/000/000.obj")
    cyl = next(o for o in objs if o["source_path"] == "random_urdfs/001/001.obj")
    assert box["shape_symmetric"] and cyl["shape_symmetric"]
    for o, key in ((box, "symmetries_discrete"), (cyl, "symmetries_continuous")):
        # models_info declares the appearance's symmetries: the shape's only under a uniform colouring
        uniform = o["colour_mode"] == "uniform"
        assert (key in info[str(o["obj_id"])]) == uniform == o["symmetric"]
    # the box keeps its orientation: longest side stays along x
    m = ObjectModel.load(out / "models" / f"obj_{box['obj_id']:06d}.ply", units="mm")
    assert np.argmax(m.extent) == 0 and np.argmin(m.extent) == 2
    assert load_manifest(out)["counts"] == manifest["counts"]
    assert len(split_object_ids(manifest, "train")) == 3 and len(split_object_ids(manifest, "val")) == 1


def test_library_deterministic(
    library: tuple[Path, dict], fake_tree: Path, textures: list[Path], tmp_path: Path
) -> None:
    out, manifest = library
    m2 = MeshLibraryBuilder(SMALL, texture_images=textures)(fake_tree, tmp_path, val_fraction=0.25, seed=3,
                                                           progress=False)
    assert m2["objects"] == manifest["objects"]
    a = (out / "models" / "obj_000002.ply").read_bytes()
    b = (tmp_path / "models" / "obj_000002.ply").read_bytes()
    assert a == b


def test_max_objects(fake_tree: Path, tmp_path: Path) -> None:
    m = MeshLibraryBuilder(SMALL)(fake_tree, tmp_path, max_objects=2, val_fraction=0.5, seed=0, progress=False)
    assert m["counts"]["objects"] == 2 and m["counts"]["val"] == 1
    assert {o["colour_mode"] for o in m["objects"]} <= {"uniform", "patches"}  # no texture images given
