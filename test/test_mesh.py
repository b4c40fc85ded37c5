"""ObjectModel loading: formats, units, colours/textures, diameter, sampling, symmetries, bad meshes."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from osop_ros.core.mesh import ObjectModel, load_bop_models_info
from osop_ros.core.types import InvalidInputError, MeshLoadError, Symmetries

LMO_MODELS = Path("/work/shared/datasets/lmo-sample/models")
BOX_EXTENTS = (0.1, 0.2, 0.3)


@pytest.fixture
def box_ply(tmp_path: Path) -> Path:
    path = tmp_path / "box.ply"
    trimesh.creation.box(BOX_EXTENTS).export(path)
    return path


def _colored_box() -> trimesh.Trimesh:
    box = trimesh.creation.box(BOX_EXTENTS)
    colors = np.zeros((len(box.vertices), 4), dtype=np.uint8)
    colors[:, 0] = np.arange(len(box.vertices)) * 30
    colors[:, 1] = 200
    colors[:, 2] = 7
    colors[:, 3] = 255
    box.visual = trimesh.visual.ColorVisuals(box, vertex_colors=colors)
    return box


def test_box_geometry_and_diameter(box_ply: Path) -> None:
    m = ObjectModel.load(box_ply, units="m")
    assert m.name == "box" and m.path == box_ply
    assert m.vertices.dtype == np.float32 and m.vertices.shape == (8, 3)
    assert m.faces.dtype == np.int32 and m.faces.shape == (12, 3)
    assert m.diameter == pytest.approx(math.sqrt(0.1**2 + 0.2**2 + 0.3**2), rel=1e-6)
    np.testing.assert_allclose(m.bbox_min, [-0.05, -0.1, -0.15], atol=1e-7)
    np.testing.assert_allclose(m.bbox_max, [0.05, 0.1, 0.15], atol=1e-7)
    np.testing.assert_allclose(m.center, 0.0, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(m.normals, axis=1), 1.0, atol=1e-5)
    # corner normals of a box point outwards, along the corner's diagonal direction
    assert (np.sign(m.normals) == np.sign(m.vertices)).all()
    assert m.vertex_colors is None and m.uv is None and m.texture is None
    assert not m.symmetries.is_symmetric
    assert len(m.content_hash) == 64


def test_units_mm_m_auto(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "box_mm.ply"
    trimesh.creation.box((100.0, 200.0, 300.0)).export(path)
    m_mm = ObjectModel.load(path, units="mm")
    m_m = ObjectModel.load(path, units="m")
    np.testing.assert_allclose(m_mm.vertices * 1000.0, m_m.vertices, rtol=1e-6)
    assert m_mm.diameter == pytest.approx(m_m.diameter / 1000.0)
    assert m_mm.content_hash != m_m.content_hash
    with caplog.at_level(logging.INFO, logger="osop_ros.core.mesh"):
        m_auto = ObjectModel.load(path, units="auto")
    assert "'mm'" in caplog.text
    assert m_auto.diameter == pytest.approx(m_mm.diameter)
    assert m_auto.content_hash == m_mm.content_hash  # same bytes, same resolved scale
    small = tmp_path / "box_m.ply"
    trimesh.creation.box(BOX_EXTENTS).export(small)
    assert ObjectModel.load(small, units="auto").diameter == pytest.approx(0.374165, rel=1e-5)
    with pytest.raises(MeshLoadError, match="units"):
        ObjectModel.load(small, units="cm")  # type: ignore[arg-type]


def test_sphere_diameter_in_mm(tmp_path: Path) -> None:
    path = tmp_path / "sphere.stl"
    trimesh.creation.icosphere(subdivisions=2, radius=50.0).export(path)
    m = ObjectModel.load(path)  # auto -> mm
    assert m.diameter == pytest.approx(0.1, rel=1e-5)
    assert len(m.vertices) == 162  # STL triangle soup merged back into shared vertices
    np.testing.assert_allclose(np.linalg.norm(m.vertices, axis=1), 0.05, rtol=1e-5)
    # smooth normals of a sphere are radial
    np.testing.assert_allclose(m.normals, m.vertices / np.linalg.norm(m.vertices, axis=1, keepdims=True), atol=0.05)


def test_ply_vertex_colors(tmp_path: Path) -> None:
    box = _colored_box()
    path = tmp_path / "colored.ply"
    box.export(path)
    m = ObjectModel.load(path, units="m")
    assert m.vertex_colors is not None and m.vertex_colors.dtype == np.uint8 and m.vertex_colors.shape == (8, 3)
    # vertex order is kept (process=False), so colours match one to one
    np.testing.assert_allclose(m.vertices, box.vertices, atol=1e-7)
    np.testing.assert_array_equal(m.vertex_colors, box.visual.vertex_colors[:, :3])


def test_obj_with_texture(tmp_path: Path) -> None:
    box = trimesh.creation.box(BOX_EXTENTS)
    rng = np.random.default_rng(0)
    img = (rng.random((16, 8, 3)) * 255).astype(np.uint8)
    uv = rng.random((len(box.vertices), 2))
    box.visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(img))
    path = tmp_path / "tex.obj"
    box.export(path)
    m = ObjectModel.load(path, units="m")
    assert m.texture is not None and m.texture.dtype == np.uint8
    np.testing.assert_array_equal(m.texture, img)
    assert m.uv is not None and m.uv.shape == (len(m.vertices), 2) and m.uv.dtype == np.float32
    assert m.vertex_colors is None
    # uv stays attached to its vertex
    for v, t in zip(box.vertices, uv, strict=True):
        k = int(np.argmin(np.linalg.norm(m.vertices - v, axis=1)))
        np.testing.assert_allclose(m.uv[k], t, atol=1e-5)
    # the same through glTF binary (PBR base-colour texture)
    box.export(tmp_path / "tex.glb")
    g = ObjectModel.load(tmp_path / "tex.glb", units="m")
    assert g.texture is not None and g.uv is not None and g.vertex_colors is None
    np.testing.assert_array_equal(g.texture, img)


def test_obj_material_without_image_gives_uniform_colour(tmp_path: Path) -> None:
    (tmp_path / "red.mtl").write_text("newmtl red\nKd 1 0 0\n")
    (tmp_path / "red.obj").write_text(
        "mtllib red.mtl\nusemtl red\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n"
    )
    m = ObjectModel.load(tmp_path / "red.obj", units="m")
    assert m.texture is None
    assert m.vertex_colors is not None
    np.testing.assert_array_equal(m.vertex_colors, np.tile([255, 0, 0], (len(m.vertices), 1)))
    assert m.diameter == pytest.approx(math.sqrt(2.0))


def test_glb_scene_concatenated(tmp_path: Path) -> None:
    a = _colored_box()
    b = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    b.apply_translation([1.0, 0.0, 0.0])
    scene = trimesh.Scene([a, b])
    path = tmp_path / "scene.glb"
    scene.export(path)
    m = ObjectModel.load(path, units="m")
    assert len(m.faces) == len(a.faces) + len(b.faces)
    assert m.bbox_max[0] == pytest.approx(1.05, abs=1e-5)
    assert m.vertex_colors is not None  # one coloured part: colours kept, the other part grey


def test_sample_surface(box_ply: Path) -> None:
    m = ObjectModel.load(box_ply, units="m")
    pts, nrm = m.sample_surface(20000, seed=3)
    assert pts.shape == (20000, 3) and nrm.shape == (20000, 3) and pts.dtype == np.float64
    pts2, _ = m.sample_surface(20000, seed=3)
    np.testing.assert_array_equal(pts, pts2)
    half = np.array(BOX_EXTENTS) / 2
    on_face = np.isclose(np.abs(pts), half, atol=1e-6)  # (n, 3): which face plane each point lies on
    assert on_face.any(axis=1).all()
    assert (np.abs(pts) <= half + 1e-6).all()
    # area weighting: fraction of points on the two faces normal to x is area_x / total area
    areas = np.array([0.2 * 0.3, 0.1 * 0.3, 0.1 * 0.2])
    frac = on_face.mean(axis=0)
    np.testing.assert_allclose(frac, areas / areas.sum(), atol=0.015)
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1.0)
    # the normal of a point on the +x face is +x
    k = np.nonzero(np.isclose(pts[:, 0], half[0]) & ~on_face[:, 1] & ~on_face[:, 2])[0][0]
    np.testing.assert_allclose(nrm[k], [1, 0, 0], atol=1e-9)


def test_symmetries_argument_and_bop_dict(box_ply: Path) -> None:
    sym = Symmetries(discrete=[np.diag([-1.0, -1.0, 1.0, 1.0])])
    assert ObjectModel.load(box_ply, units="m", symmetries=sym).symmetries is sym
    info = {"symmetries_continuous": [{"axis": [0, 0, 2], "offset": [0, 0, 10.0]}]}
    m = ObjectModel.load(box_ply, units="mm", symmetries=info)
    (axis, offset), = m.symmetries.continuous
    np.testing.assert_allclose(axis, [0, 0, 1])
    np.testing.assert_allclose(offset, [0, 0, 0.01])


def test_load_bop_models_info(tmp_path: Path) -> None:
    path = tmp_path / "models_info.json"
    path.write_text(json.dumps({"1": {"diameter": 10.0}, "12": {"diameter": 3.0}}))
    info = load_bop_models_info(path)
    assert info == {1: {"diameter": 10.0}, 12: {"diameter": 3.0}}
    path.write_text("[1, 2]")
    with pytest.raises(InvalidInputError, match="models_info"):
        load_bop_models_info(path)
    with pytest.raises(InvalidInputError, match="nope.json"):
        load_bop_models_info(tmp_path / "nope.json")


@pytest.mark.skipif(not (LMO_MODELS / "obj_000001.ply").exists(), reason="LM-O sample not available")
def test_bop_ply_model() -> None:
    infos = load_bop_models_info(LMO_MODELS / "models_info.json")
    m = ObjectModel.load(LMO_MODELS / "obj_000001.ply", units="mm", symmetries=infos[1])
    assert m.vertex_colors is not None and m.vertex_colors.shape == (len(m.vertices), 3)
    assert m.vertex_colors.std() > 5  # real colours, not a constant fill
    assert m.diameter * 1000 == pytest.approx(infos[1]["diameter"], abs=0.05)
    np.testing.assert_allclose(m.bbox_min * 1000, [infos[1]["min_x"], infos[1]["min_y"], infos[1]["min_z"]], atol=1e-3)
    m10 = ObjectModel.load(LMO_MODELS / "obj_000010.ply", units="mm", symmetries=infos[10])
    assert len(m10.symmetries.discrete) == 1
    assert abs(m10.symmetries.discrete[0][0, 3]) < 0.01  # translation converted to metres


def test_from_trimesh_hash_and_scale() -> None:
    box = trimesh.creation.box((100.0, 100.0, 100.0))
    m = ObjectModel.from_trimesh(box, name="gen", units_scale=0.001)
    assert m.path is None and m.name == "gen"
    assert m.diameter == pytest.approx(math.sqrt(3) * 0.1)
    assert m.content_hash == ObjectModel.from_trimesh(box.copy(), name="other", units_scale=0.001).content_hash
    assert m.content_hash != ObjectModel.from_trimesh(trimesh.creation.box((1, 1, 2)), name="x").content_hash


# ------------------------------------------------------------------------------------------- bad meshes


def _ascii_ply(path: Path, verts: list[list[float]], faces: list[list[int]]) -> Path:
    lines = ["ply", "format ascii 1.0", f"element vertex {len(verts)}", "property float x", "property float y",
             "property float z", f"element face {len(faces)}", "property list uchar int vertex_indices", "end_header"]
    lines += [" ".join(str(c) for c in v) for v in verts]
    lines += [f"3 {f[0]} {f[1]} {f[2]}" for f in faces]
    path.write_text("\n".join(lines) + "\n")
    return path


TETRA_FACES = [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("missing", "not found"),
        ("empty", "empty"),
        ("blank", "empty"),
        ("nan", "NaN/inf"),
        ("inf", "NaN/inf"),
        ("zero_extent", "zero extent"),
        ("degenerate", "degenerate"),
        ("no_faces", "no triangle"),
        ("unsupported", "unsupported"),
        ("no_extension", "unsupported"),
        ("garbage_ply", "unreadable"),
        ("garbage_glb", "unreadable"),
        ("bad_index", "out of range|unreadable"),
    ],
)
def test_bad_meshes_raise_mesh_load_error(tmp_path: Path, case: str, reason: str) -> None:
    name = {"unsupported": "model.xyz", "no_extension": "model", "garbage_glb": "model.glb"}.get(case, "model.ply")
    path = tmp_path / name
    tetra = [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    if case == "empty":
        path.write_bytes(b"")
    elif case == "blank":
        path.write_text("   \n\n")
    elif case == "nan":
        _ascii_ply(path, [*tetra[:3], ["nan", 0, 1]], TETRA_FACES)
    elif case == "inf":
        _ascii_ply(path, [*tetra[:3], ["inf", 0, 1]], TETRA_FACES)
    elif case == "zero_extent":
        _ascii_ply(path, [[1, 2, 3]] * 4, TETRA_FACES)
    elif case == "degenerate":
        _ascii_ply(path, [[0, 0, 0], [1, 0, 0], [2, 0, 0], [3, 0, 0]], TETRA_FACES)
    elif case == "no_faces":
        _ascii_ply(path, tetra, [])
    elif case in ("unsupported", "no_extension"):
        path.write_text("1 2 3\n")
    elif case in ("garbage_ply", "garbage_glb"):
        path.write_bytes(b"\x00\xff this is not a mesh \x13\x37" * 10)
    elif case == "bad_index":
        _ascii_ply(path, tetra, [[0, 1, 7], *TETRA_FACES])
    with pytest.raises(MeshLoadError, match=reason) as err:
        ObjectModel.load(path, units="m")
    assert str(path) in str(err.value)
