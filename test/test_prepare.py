"""Training shards from synthetic scenes: crops, paired templates and mini banks are geometrically consistent."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh

from osop_ros.core.geometry import centred_view_rotation, make_T, rotation_angle_deg
from osop_ros.data.meshes import MeshLibraryBuilder, MeshLibraryConfig
from osop_ros.data.synth import MeshLibrary, SynthConfig, SynthGenerator
from osop_ros.train.prepare import PrepareConfig, perturb_rotation, prepare

pytestmark = pytest.mark.gl


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(synthetic scenes, mesh library) of 4 small meshes."""
    from osop_ros.core.render import Renderer, RendererError

    src = tmp_path_factory.mktemp("src")
    shapes = [
        trimesh.creation.box(extents=(2.0, 1.0, 0.6)),
        trimesh.creation.capsule(height=1.0, radius=0.25),
        trimesh.creation.cone(radius=0.5, height=0.8),
        trimesh.creation.box(extents=(1.0, 0.7, 0.2)),
    ]
    for i, m in enumerate(shapes):
        p = src / f"random_urdfs/{i:03d}/{i:03d}.obj"
        p.parent.mkdir(parents=True)
        m.export(str(p))
    lib = tmp_path_factory.mktemp("lib")
    MeshLibraryBuilder(
        MeshLibraryConfig(min_faces=300, max_faces=1500, min_diameter=0.1, max_diameter=0.2, detect_symmetry=False)
    )(src, lib, val_fraction=0.25, seed=1, progress=False)
    synth = tmp_path_factory.mktemp("synth")
    try:
        r = Renderer()
    except RendererError as exc:  # pragma: no cover
        pytest.skip(f"no headless GL: {exc}")
    cfg = SynthConfig(
        width=160,
        height=120,
        images_per_scene=3,
        objects_per_image=(2, 3),
        distractors_per_image=(0, 0),
        depth_range=(0.35, 0.5),
    )
    SynthGenerator(MeshLibrary(lib), r, cfg)(synth, "train", 1, seed=3, progress=False)
    r.release()
    return synth, lib


SMALL = dict(crop_size=32, image_width=80, min_px=30, views_per_object=4, min_visib=0.2)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, sources: tuple[Path, Path]) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(*sources, out, PrepareConfig(**SMALL))
    return out


def test_images_only_matches_full_preparation(
    tmp_path: Path, sources: tuple[Path, Path], prepared: Path
) -> None:
    """``--images-only``: the same stage-1 images and object mini banks, no instance shards."""
    s = prepare(*sources, tmp_path, PrepareConfig(**SMALL, instances=False))
    assert s["instances"] == 0 and not list(tmp_path.glob("instances-*.npz"))
    full = json.loads((prepared / "done.json").read_text())
    assert s["images"] == full["images"] > 0 and s["objects"] == full["objects"]
    with np.load(tmp_path / "images-0000.npz") as a, np.load(prepared / "images-0000.npz") as b:
        assert np.array_equal(a["objmap"], b["objmap"]) and np.array_equal(a["rgb"], b["rgb"])
    with np.load(tmp_path / "objects.npz") as a, np.load(prepared / "objects.npz") as b:
        assert np.array_equal(a["obj_id"], b["obj_id"])


def test_centred_rotation_puts_centre_on_axis() -> None:
    R = trimesh.transformations.random_rotation_matrix(np.random.default_rng(0).random(3))[:3, :3]
    T = make_T(R, [0.2, -0.1, 0.8])
    c = np.array([0.01, 0.02, -0.01])
    Rc = centred_view_rotation(T, c)
    d = T[:3, :3] @ c + T[:3, 3]
    # the centred camera sees the centre straight ahead: Rc rotates d's direction onto +z
    assert np.allclose((Rc @ R.T) @ (d / np.linalg.norm(d)), [0, 0, 1], atol=1e-9)
    assert rotation_angle_deg(Rc, R) == pytest.approx(np.degrees(np.arccos(d[2] / np.linalg.norm(d))), abs=1e-6)


def test_perturb_rotation_reports_its_angle() -> None:
    rng = np.random.default_rng(1)
    R = np.eye(3)
    for _ in range(5):
        Rp, ang = perturb_rotation(R, rng, 8.0, 6.0)
        assert rotation_angle_deg(Rp, R) == pytest.approx(ang, abs=1e-6)


def test_shards_are_consistent(prepared: Path) -> None:
    with np.load(prepared / "instances-0000.npz") as z:
        d = {k: z[k] for k in z.files}
    n = len(d["obj_id"])
    assert n > 0
    assert d["q_rgb"].shape == (n, 32, 32, 3) and d["t_xyz"].shape == (n, 32, 32, 3)
    for i in range(n):
        qm, tm = d["q_mask"][i] > 0, d["t_mask"][i] > 0
        assert qm.sum() > 0 and tm.sum() > 0
        # object coordinates lie on the model: within half a diameter (+ margin) of the centre
        for xyz, m in ((d["q_xyz"][i], qm), (d["t_xyz"][i], tm)):
            r = np.linalg.norm(xyz[m].astype(np.float32) - d["center"][i], axis=1)
            assert r.max() <= 0.5 * d["diameter"][i] * 1.05
        assert rotation_angle_deg(d["R_t"][i].astype(np.float64), d["R_q"][i].astype(np.float64)) == pytest.approx(
            float(d["angle_deg"][i]), abs=0.05
        )
    with np.load(prepared / "images-0000.npz") as z:
        assert z["rgb"].shape[1:] == (60, 80, 3)
        assert (z["objmap"] > 0).any(axis=(1, 2)).all()  # every image shows at least one object
    with np.load(prepared / "objects.npz") as z:
        assert set(z["obj_id"].tolist()) >= set(d["obj_id"].tolist())
        assert z["rgb"].shape[1:] == (4, 32, 32, 3) and z["mask"].reshape(len(z["obj_id"]), 4, -1).any(-1).all()
        assert np.allclose(z["sym_R"][:, 0], np.eye(3))
