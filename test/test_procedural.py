"""Procedural everyday-object meshes, printed-label textures and a purely procedural mesh library."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from osop_ros.core.mesh import ObjectModel
from osop_ros.data.meshes import (
    MeshLibraryBuilder,
    MeshLibraryConfig,
    blocklist_reason,
    detect_symmetries,
    normalise,
    vertex_normals,
)
from osop_ros.data.procedural import KINDS, LabelColorizer, ProceduralShapeGenerator

GEN = ProceduralShapeGenerator()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_family_valid_and_deterministic(kind: str) -> None:
    for seed in (0, 1):
        shape = GEN(np.random.default_rng([seed, 11]), kind=kind)
        m = shape.mesh
        assert shape.kind == kind and shape.projection in ("cylindrical", "box")
        assert blocklist_reason(f"procedural/{shape.group}_000000") is None and blocklist_reason(kind) is None
        v = np.asarray(m.vertices)
        assert np.isfinite(v).all()
        assert 3000 <= len(m.faces) <= 20000
        ext = np.asarray(m.extents)
        assert ext.min() > 0.005 * ext.max()  # not flat
        assert float(m.volume) > 0  # outward winding
        edges, counts = np.unique(m.edges_sorted, axis=0, return_counts=True)
        assert (counts != 2).mean() < 0.01  # watertight-ish
        again = GEN(np.random.default_rng([seed, 11]), kind=kind).mesh
        np.testing.assert_array_equal(again.faces, m.faces)
        np.testing.assert_allclose(again.vertices, m.vertices)


@pytest.mark.parametrize("kind", ["bottle", "cylinder", "jar"])
def test_revolved_shapes_symmetric(kind: str) -> None:
    mesh, _ = normalise(GEN(np.random.default_rng(3), kind=kind).mesh, 0.1)
    sym = detect_symmetries(mesh.vertices, mesh.faces, n_ref=12000, n_test=800)
    assert sym.continuous and abs(abs(sym.continuous[0][2]) - 1.0) < 1e-2


def test_label_texture_changes_colours(tmp_path: Path) -> None:
    img = np.zeros((80, 120, 3), np.uint8)
    img[:, :60] = (30, 160, 220)
    cv2.imwrite(str(tmp_path / "t.png"), img)
    labels = LabelColorizer([tmp_path / "t.png"], p_photo=0.0)
    for kind in ("bottle", "box"):
        shape = GEN(np.random.default_rng(5), kind=kind)
        mesh, _ = normalise(shape.mesh, 0.15)
        v, f = np.asarray(mesh.vertices), np.asarray(mesh.faces)
        v_axis = v  # bottles are centred on their axis, so the revolution axis is x = y = 0
        cols, base = labels(v_axis, vertex_normals(v, f), shape.projection, np.random.default_rng(0))
        assert cols.shape == (len(v), 3) and cols.dtype == np.uint8 and base == "solid"
        distinct = len(np.unique(cols // 16, axis=0))
        assert distinct >= 3, f"{kind}: label print should add colours ({distinct})"
        again, _ = labels(v_axis, vertex_normals(v, f), shape.projection, np.random.default_rng(0))
        np.testing.assert_array_equal(again, cols)


def test_procedural_library(tmp_path: Path) -> None:
    cfg = MeshLibraryConfig(min_faces=3000, max_faces=20000)
    manifest = MeshLibraryBuilder(cfg)(None, tmp_path, procedural=6, val_fraction=0.2, seed=2, progress=False)
    c = manifest["counts"]
    assert c["objects"] == 6 and c["procedural"] == 6 and c["val"] == 1 and c["train"] == 5
    assert c["procedural_objects_per_s"] > 0 and c["objects_per_s"] > 0
    assert manifest["blocklist_check"]["passed"] is True and manifest["source_root"] is None
    info = json.loads((tmp_path / "models" / "models_info.json").read_text())
    for k, o in enumerate(manifest["objects"]):
        assert o["obj_id"] == k + 1
        assert o["source_package"] == "osop_ros.procedural" and o["licence"] == "generated (project code)"
        assert o["procedural_kind"] in KINDS and o["finish"] in ("matte", "glossy")
        assert o["source_path"].startswith("procedural/") and blocklist_reason(o["source_path"]) is None
        assert o["colour_mode"] in ("label", "uniform", "patches")
        model = ObjectModel.load(tmp_path / "models" / f"obj_{o['obj_id']:06d}.ply", units="mm")
        assert model.vertex_colors is not None and len(model.faces) == o["faces"]
        assert 0.03 - 1e-6 <= model.diameter <= 0.30 + 1e-6
        assert abs(info[str(o["obj_id"])]["diameter"] - model.diameter * 1000) < 0.05
        declared = "symmetries_continuous" in info[str(o["obj_id"])] or "symmetries_discrete" in info[str(o["obj_id"])]
        if o["procedural_kind"] in ("bottle", "cylinder", "jar", "lathe"):
            assert o["shape_symmetric"]
        # models_info declares appearance symmetries: a label or patches breaks the shape's
        assert declared == o["symmetric"] == (o["shape_symmetric"] and o["colour_mode"] == "uniform")
    (tmp_path / "again").mkdir()
    m2 = MeshLibraryBuilder(cfg)(None, tmp_path / "again", procedural=6, val_fraction=0.2, seed=2, progress=False)
    assert m2["objects"] == manifest["objects"]
