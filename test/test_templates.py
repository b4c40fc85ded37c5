"""Template banks: crop framing, geometry consistency, save/load, features, cache, CLI."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from osop_ros.core.geometry import mask_to_box, project_points, transform_points
from osop_ros.core.mesh import ObjectModel
from osop_ros.core.templates import (
    TemplateBank,
    TemplateBankError,
    TemplateCache,
    TemplateConfig,
    bank_cache_key,
    make_contact_sheet,
)
from osop_ros.core.views import ViewGrid, ViewGridConfig

pytestmark = pytest.mark.gl

LMO_OBJ1 = Path("/work/shared/datasets/lmo-sample/models/obj_000001.ply")
SMALL = TemplateConfig(views=ViewGridConfig(4, 6, 2), crop_size=48)
OFFSET = np.array([0.02, -0.01, 0.03])


@pytest.fixture(scope="module")
def renderer() -> Iterator[object]:
    from osop_ros.core.render import Renderer, RendererError

    try:
        r = Renderer()
    except RendererError as exc:
        pytest.skip(f"no headless GL: {exc}")
    yield r
    r.release()


@pytest.fixture(scope="module")
def box_model(tmp_path_factory: pytest.TempPathFactory) -> ObjectModel:
    """An off-centre 10 x 6 x 4 cm box with vertex colours, loaded from a PLY file."""
    box = trimesh.creation.box((0.10, 0.06, 0.04))
    box.apply_translation(OFFSET)
    colors = np.tile([200, 120, 40, 255], (len(box.vertices), 1)).astype(np.uint8)
    box.visual = trimesh.visual.ColorVisuals(box, vertex_colors=colors)
    path = tmp_path_factory.mktemp("mesh") / "box.ply"
    box.export(path)
    return ObjectModel.load(path, units="m")


@pytest.fixture(scope="module")
def small_bank(box_model: ObjectModel, renderer: object) -> TemplateBank:
    return TemplateBank.build(box_model, renderer, SMALL, progress=False)  # type: ignore[arg-type]


def test_bank_arrays(small_bank: TemplateBank, box_model: ObjectModel) -> None:
    b, S = small_bank, 48
    assert len(b) == 48 and b.crop_size == S
    assert b.rgb.shape == (48, S, S, 3) and b.rgb.dtype == np.uint8
    assert b.mask.shape == (48, S, S) and b.mask.dtype == bool
    assert b.xyz.shape == (48, S, S, 3) and b.xyz.dtype == np.float16
    assert b.poses.shape == (48, 4, 4) and b.K.shape == (48, 3, 3)
    np.testing.assert_array_equal(b.view_index, ViewGrid(SMALL.views).index)
    assert b.key == bank_cache_key(box_model, SMALL)
    assert b.meta["mesh"]["content_hash"] == box_model.content_hash
    assert TemplateConfig.from_dict(b.meta["config"]) == SMALL
    # colour only on the object, the object's own colour (vertex colours x shading)
    assert (b.rgb[~b.mask] == 0).all()
    fg = b.rgb[b.mask].astype(float)
    assert (fg[:, 0] > fg[:, 1]).all() and (fg[:, 1] > fg[:, 2]).all()
    assert (b.xyz[~b.mask] == 0).all()
    # camera 5 diameters from the bbox centre
    for T in b.poses:
        assert np.linalg.norm(transform_points(T, box_model.center[None])[0]) == pytest.approx(5 * box_model.diameter)


def test_crop_framing_matches_projection(small_bank: TemplateBank, box_model: ObjectModel) -> None:
    b, S = small_bank, small_bank.crop_size
    for i in range(len(b)):
        uv = project_points(b.K[i], b.poses[i], box_model.vertices.astype(np.float64))
        assert (uv >= -0.5).all() and (uv <= S - 0.5).all(), f"template {i}: model leaves the crop"
        box = mask_to_box(b.mask[i])
        assert box is not None, f"template {i}: empty mask"
        proj = (np.floor(uv.min(0) + 0.5), np.floor(uv.max(0) + 0.5) + 1)
        np.testing.assert_allclose(box, [proj[0][0], proj[0][1], proj[1][0], proj[1][1]], atol=1.0)
        # tight square crop: the larger side of the projected box is crop_size / pad
        side = max(uv.max(0) - uv.min(0))
        assert side == pytest.approx(S / SMALL.pad, abs=1.5)
        # the projected box is centred in the crop
        np.testing.assert_allclose((uv.min(0) + uv.max(0)) / 2, (S - 1) / 2, atol=1.0)


def test_xyz_backprojection_consistency(small_bank: TemplateBank, box_model: ObjectModel) -> None:
    b = small_bank
    half = np.array([0.05, 0.03, 0.02])
    for i in range(0, len(b), 5):
        v, u = np.nonzero(b.mask[i])
        pts = b.xyz[i][v, u].astype(np.float64)
        # surface points of the box (one coordinate on a face plane), float16 precision
        rel = np.abs(pts - OFFSET)
        assert (rel <= half + 1e-4).all()
        assert (np.abs(rel - half) < 1e-4).any(axis=1).all()
        # reprojecting each stored model point lands on its own pixel
        uv = project_points(b.K[i], b.poses[i], pts)
        err = np.linalg.norm(uv - np.stack([u, v], axis=1), axis=1)
        assert np.median(err) < 0.1 and err.max() < 0.75


def test_save_load_round_trip(small_bank: TemplateBank, tmp_path: Path) -> None:
    path = small_bank.save(tmp_path / "sub" / "bank.npz")
    assert sorted(p.name for p in path.parent.iterdir()) == ["bank.npz"]  # no temporary files left
    loaded = TemplateBank.load(path, expected_key=small_bank.key)
    for name in ("poses", "K", "rgb", "mask", "xyz", "view_index"):
        a, b = getattr(small_bank, name), getattr(loaded, name)
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert loaded.meta == small_bank.meta
    assert loaded.source_dir == path.parent
    with pytest.raises(TemplateBankError, match="expected"):
        TemplateBank.load(path, expected_key="0" * 64)


def test_features_save_load(small_bank: TemplateBank, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bank = TemplateBank(small_bank.poses, small_bank.K, small_bank.rgb, small_bank.mask, small_bank.xyz,
                        small_bank.view_index, meta=small_bank.meta)
    rng = np.random.default_rng(0)
    feats = {"seg_o1": rng.random((48, 16)).astype(np.float16), "match": rng.random((48, 8, 2)).astype(np.float16)}
    bank.features = dict(feats)
    p1 = bank.save_features(tmp_path, "osop-v1")
    assert p1.name == "features-osop-v1.npz"
    bank.features = {"seg_o1": np.ones((48, 4), np.float16)}
    p2 = bank.save_features(tmp_path, "weights/other run:2")  # unsafe characters -> slug + hash
    assert p2.parent == tmp_path and "/" not in p2.name[len("features-"):] and p1 != p2
    got = TemplateBank.load_features(tmp_path, "osop-v1", n_templates=48, bank_key=bank.key)
    assert got is not None and set(got) == set(feats)
    for k in feats:
        assert got[k].dtype == np.float16
        np.testing.assert_array_equal(got[k], feats[k])
    other = TemplateBank.load_features(tmp_path, "weights/other run:2")
    assert other is not None and other["seg_o1"].shape == (48, 4)  # both coexist
    assert TemplateBank.load_features(tmp_path, "never-saved") is None
    with caplog.at_level(logging.WARNING):
        assert TemplateBank.load_features(tmp_path, "osop-v1", n_templates=47) is None
        assert TemplateBank.load_features(tmp_path, "osop-v1", bank_key="f" * 64) is None
    assert "ignoring template features" in caplog.text
    p1.write_bytes(b"not a zip")
    with caplog.at_level(logging.WARNING):
        assert TemplateBank.load_features(tmp_path, "osop-v1") is None
    # attach_features uses the bank's directory and checks the row count
    bank.features = {}
    bank.source_dir = tmp_path
    assert bank.attach_features("weights/other run:2") and bank.features["seg_o1"].shape == (48, 4)
    assert not bank.attach_features("missing")
    bank.features = {"bad": np.ones((3, 2), np.float16)}
    with pytest.raises(ValueError, match="48 rows"):
        bank.save_features(tmp_path, "x")


def test_cache_key() -> None:
    a = ObjectModel.from_trimesh(trimesh.creation.box((0.1, 0.1, 0.1)), name="a")
    b = ObjectModel.from_trimesh(trimesh.creation.box((0.1, 0.1, 0.2)), name="b")
    assert bank_cache_key(a, SMALL) == bank_cache_key(a, TemplateConfig(views=ViewGridConfig(4, 6, 2), crop_size=48))
    assert bank_cache_key(a, SMALL) != bank_cache_key(b, SMALL)
    assert bank_cache_key(a, SMALL) != bank_cache_key(a, TemplateConfig(views=ViewGridConfig(4, 6, 2), crop_size=32))
    assert bank_cache_key(a, SMALL) != bank_cache_key(a, TemplateConfig(views=ViewGridConfig(4, 6, 3), crop_size=48))


def test_cache_hit_and_rebuild_on_corruption(
    box_model: ObjectModel, renderer: object, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = TemplateCache(tmp_path)
    calls = []

    def factory() -> object:
        calls.append(1)
        return _NonReleasing(renderer)

    cfg = TemplateConfig(views=ViewGridConfig(2, 3, 1), crop_size=32)
    bank = cache.get_or_build(box_model, factory, cfg, progress=False)
    path = tmp_path / bank_cache_key(box_model, cfg) / "bank.npz"
    assert path.is_file() and len(calls) == 1 and len(bank) == 6
    t0 = time.perf_counter()
    again = cache.get_or_build(box_model, factory, cfg, progress=False)
    assert time.perf_counter() - t0 < 1.0 and len(calls) == 1  # hit: no rendering
    np.testing.assert_array_equal(again.rgb, bank.rgb)
    # a passed Renderer instance is used directly and not released
    assert cache.get_or_build(box_model, renderer, cfg, progress=False) is not None  # type: ignore[arg-type]

    def corrupt(kind: str) -> None:
        if kind == "garbage":
            path.write_bytes(b"PK\x03\x04 definitely not a bank")
        elif kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        elif kind == "missing_arrays":
            np.savez(path, meta_json=np.frombuffer(b'{"key": "x"}', np.uint8))
        elif kind == "wrong_key":
            other = TemplateBank.load(path)
            other.meta["key"] = "0" * 64
            other.save(path)

    for kind in ("garbage", "truncated", "missing_arrays", "wrong_key"):
        corrupt(kind)
        caplog.clear()
        n = len(calls)
        with caplog.at_level(logging.WARNING, logger="osop_ros.core.templates"):
            rebuilt = cache.get_or_build(box_model, factory, cfg, progress=False)
        assert len(calls) == n + 1, kind
        assert "rebuilding" in caplog.text, kind
        np.testing.assert_array_equal(rebuilt.mask, bank.mask)
        assert TemplateBank.load(path, expected_key=bank.key).meta["key"] == bank.key  # repaired on disk


class _NonReleasing:
    """Wraps the shared test renderer so that TemplateCache's release() does not close it."""

    def __init__(self, inner: object):
        self._inner = inner
        self.released = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def release(self) -> None:
        self.released = True


def test_textured_model_templates(tmp_path: Path, renderer: object) -> None:
    box = trimesh.creation.box((0.05, 0.05, 0.05))
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 2] = 255  # pure blue texture
    box.visual = trimesh.visual.TextureVisuals(uv=np.full((8, 2), 0.5), image=Image.fromarray(img))
    box.export(tmp_path / "blue.obj")
    model = ObjectModel.load(tmp_path / "blue.obj", units="m")
    bank = TemplateBank.build(model, renderer, TemplateConfig(views=ViewGridConfig(2, 2, 1), crop_size=32),  # type: ignore[arg-type]
                              progress=False)
    fg = bank.rgb[bank.mask].astype(int)
    assert (fg[:, 2] > 100).all() and (fg[:, :2] < 10).all()
    sheet = make_contact_sheet(bank, n=4, cols=2)
    assert sheet.shape == (2 * 34 + 2, 2 * 34 + 2, 3)


def test_cli_build_and_benchmark(tmp_path: Path, box_model: ObjectModel, capsys: pytest.CaptureFixture) -> None:
    from osop_ros.cli import main
    from osop_ros.commands.templates import benchmark_template_bank

    argv = ["templates", "build", "--mesh", str(box_model.path), "--units", "m", "--out", str(tmp_path / "c"),
            "--grid", "2x3x2", "--crop-size", "32", "--contact-sheet", str(tmp_path / "sheet.png")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "built in" in out and "views: 12" in out and "size on disk" in out and "reload" in out
    assert Image.open(tmp_path / "sheet.png").size[0] > 32
    assert main(argv[:-2]) == 0
    assert "loaded from cache" in capsys.readouterr().out
    stats = benchmark_template_bank(box_model, TemplateConfig(views=ViewGridConfig(2, 2, 1), crop_size=32),
                                    tmp_path / "bench")
    assert stats["n_views"] == 4 and stats["size_mb"] > 0
    assert set(stats) >= {"build_s", "render_s", "size_mb", "reload_s", "n_views"}


@pytest.mark.slow
@pytest.mark.skipif(not LMO_OBJ1.exists(), reason="LM-O sample not available")
def test_full_default_bank(tmp_path: Path, renderer: object) -> None:
    model = ObjectModel.load(LMO_OBJ1, units="mm")
    t0 = time.perf_counter()
    bank = TemplateBank.build(model, renderer, TemplateConfig(), progress=False)  # type: ignore[arg-type]
    build_s = time.perf_counter() - t0
    path = bank.save(tmp_path / "bank.npz")
    t0 = time.perf_counter()
    loaded = TemplateBank.load(path)
    reload_s = time.perf_counter() - t0
    assert len(loaded) == 2880
    assert bank.mask.reshape(2880, -1).any(axis=1).all()
    assert path.stat().st_size < 100e6
    assert reload_s < 2.0
    assert build_s < 120.0
