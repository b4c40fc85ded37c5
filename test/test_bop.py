"""BOP dataset reader and result CSV writer/reader on a hand-written dataset in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from osop_ros.core.geometry import make_T, rotation_about_axis
from osop_ros.data.bop import (
    BopDataset,
    BopFormatError,
    BopResult,
    BopTarget,
    bop_gt_entry,
    read_bop_csv,
    write_bop_csv,
)

K_LIST = [500.0, 0.0, 80.0, 0.0, 510.0, 60.0, 0.0, 0.0, 1.0]


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    _write(root / "camera.json", {"cx": 80.0, "cy": 60.0, "fx": 500.0, "fy": 510.0, "width": 160, "height": 120,
                                  "depth_scale": 0.1})
    _write(
        root / "models" / "models_info.json",
        {
            "3": {"diameter": 120.0, "min_x": -50, "min_y": -40, "min_z": -30, "size_x": 100, "size_y": 80},
            "7": {
                "diameter": 80.0,
                "symmetries_discrete": [[-1, 0, 0, 10, 0, -1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1]],
                "symmetries_continuous": [{"axis": [0, 0, 2], "offset": [0, 0, 5]}],
            },
        },
    )
    (root / "models" / "obj_000003.ply").write_text("ply\n")
    sd = root / "test" / "000001"
    T0 = make_T(rotation_about_axis([0, 1, 0], 0.3), [0.01, -0.02, 0.5])
    T1 = make_T(np.eye(3), [-0.05, 0.0, 0.7])
    _write(sd / "scene_gt.json", {"4": [bop_gt_entry(3, T0), bop_gt_entry(7, T1), bop_gt_entry(3, T1)],
                                  "9": [bop_gt_entry(7, T0)]})
    _write(
        sd / "scene_gt_info.json",
        {
            "4": [
                {"bbox_obj": [1, 2, 30, 40], "bbox_visib": [3, 4, 20, 30], "px_count_visib": 500, "visib_fract": 0.8},
                {"bbox_obj": [0, 0, 10, 10], "bbox_visib": [0, 0, 5, 5], "px_count_visib": 20, "visib_fract": 0.1},
                {"bbox_obj": [0, 0, 10, 10], "bbox_visib": [0, 0, 5, 5], "px_count_visib": 20, "visib_fract": 0.3},
            ],
            "9": [{"visib_fract": 1.0}],
        },
    )
    cam = {"cam_K": K_LIST, "depth_scale": 0.1}
    _write(sd / "scene_camera.json", {"4": cam, "9": cam})
    rgb = np.zeros((120, 160, 3), np.uint8)
    rgb[..., 0] = 200  # red in RGB order
    (sd / "rgb").mkdir()
    cv2.imwrite(str(sd / "rgb" / "000004.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(sd / "rgb" / "000009.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    (sd / "depth").mkdir()
    depth = np.full((120, 160), 5000, np.uint16)  # 5000 * 0.1 = 500 mm
    depth[0, 0] = 0
    cv2.imwrite(str(sd / "depth" / "000004.png"), depth)
    (sd / "mask_visib").mkdir()
    m = np.zeros((120, 160), np.uint8)
    m[10:20, 30:50] = 255
    cv2.imwrite(str(sd / "mask_visib" / "000004_000002.png"), m)
    _write(root / "test_targets_bop19.json", [{"scene_id": 1, "im_id": 4, "obj_id": 3, "inst_count": 2}])
    return root


def test_reads_structure(dataset: Path) -> None:
    ds = BopDataset(dataset)
    assert ds.scene_ids == [1]
    assert ds.image_ids(1) == [4, 9]
    assert ds.images() == [(1, 4), (1, 9)]
    assert ds.targets == [BopTarget(1, 4, 3, 2)]
    assert ds.obj_ids == [3, 7]
    assert ds.diameter(3) == pytest.approx(0.12)
    assert ds.model_path(3).name == "obj_000003.ply"
    with pytest.raises(BopFormatError, match="no model file for object 7"):
        ds.model_path(7)
    s = ds.summary()
    assert s["images"] == 2 and s["images_with_depth"] == 1 and s["targets"] == 1


def test_targets_fallback_to_all_gt(dataset: Path) -> None:
    (dataset / "test_targets_bop19.json").unlink()
    ds = BopDataset(dataset)
    assert ds.targets == [BopTarget(1, 4, 3, 2), BopTarget(1, 4, 7, 1), BopTarget(1, 9, 7, 1)]


def test_gt_in_metres_and_info(dataset: Path) -> None:
    ds = BopDataset(dataset)
    gts = ds.gt(1, 4)
    assert [g.obj_id for g in gts] == [3, 7, 3]
    T0 = make_T(rotation_about_axis([0, 1, 0], 0.3), [0.01, -0.02, 0.5])
    assert np.allclose(gts[0].T_cam_obj, T0, atol=1e-9)
    assert gts[0].visib_fract == pytest.approx(0.8)
    assert gts[0].bbox_visib == (3, 4, 20, 30) and gts[0].px_count_visib == 500
    assert ds.gt(1, 123) == []


def test_symmetries_in_metres(dataset: Path) -> None:
    sym = BopDataset(dataset).symmetries(7)
    assert len(sym.discrete) == 1 and np.allclose(sym.discrete[0][:3, 3], [0.01, 0, 0])
    axis, offset = sym.continuous[0]
    assert np.allclose(axis, [0, 0, 1]) and np.allclose(offset, [0, 0, 0.005])
    assert not BopDataset(dataset).symmetries(3).is_symmetric


def test_observation_units_and_missing_depth(dataset: Path) -> None:
    ds = BopDataset(dataset)
    cam, scale = ds.camera(1, 4)
    assert (cam.width, cam.height) == (160, 120) and scale == pytest.approx(0.1)
    assert np.allclose(cam.K, np.array(K_LIST).reshape(3, 3))
    obs = ds.load_observation(1, 4)
    assert obs.rgb.dtype == np.uint8 and obs.rgb[0, 0].tolist() == [200, 0, 0]
    assert obs.depth is not None and obs.depth.dtype == np.float32
    assert obs.depth[5, 5] == pytest.approx(0.5) and obs.depth[0, 0] == 0.0
    frame = ds.load_frame(1, 9)
    assert frame.obs.depth is None and not frame.has_depth and len(frame.gts) == 1
    assert ds.load_observation(1, 4, with_depth=False).depth is None


def test_mask_visib(dataset: Path) -> None:
    ds = BopDataset(dataset)
    m = ds.mask_visib(1, 4, 2)
    assert m is not None and m.dtype == bool and m.sum() == 200 and m[15, 40]
    assert ds.mask_visib(1, 4, 0) is None


def test_errors_name_the_file(tmp_path: Path, dataset: Path) -> None:
    with pytest.raises(BopFormatError, match="not found"):
        BopDataset(tmp_path / "nope")
    with pytest.raises(BopFormatError, match="split folder"):
        BopDataset(dataset, split="val")
    (dataset / "test" / "000001" / "scene_camera.json").write_text("{broken")
    with pytest.raises(BopFormatError, match="scene_camera.json: invalid JSON"):
        BopDataset(dataset).camera(1, 4)


def test_csv_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rs = []
    for i in range(5):
        T = make_T(rotation_about_axis(rng.normal(size=3), rng.uniform(0, 3)), rng.normal(size=3) * 0.1 + [0, 0, 1])
        rs.append(BopResult(2, 3 + i // 2, 5 + i, float(rng.random()), T, 0.25 * (i // 2)))
    p = write_bop_csv(tmp_path / "sub" / "res.csv", rs)
    text = p.read_text().splitlines()
    assert text[0] == "scene_id,im_id,obj_id,score,R,t,time"
    fields = text[1].split(",")
    assert len(fields) == 7 and len(fields[4].split()) == 9 and len(fields[5].split()) == 3
    # t is written in millimetres
    assert np.allclose([float(v) for v in fields[5].split()], rs[0].T_cam_obj[:3, 3] * 1000, atol=1e-5)
    back = read_bop_csv(p)
    assert len(back) == 5
    for a, b in zip(rs, back, strict=True):
        assert (a.scene_id, a.im_id, a.obj_id) == (b.scene_id, b.im_id, b.obj_id)
        assert np.allclose(a.T_cam_obj, b.T_cam_obj, atol=1e-8) and a.score == pytest.approx(b.score, abs=1e-6)
        assert a.time == pytest.approx(b.time)


def test_csv_errors(tmp_path: Path) -> None:
    T = make_T(np.eye(3), [0, 0, 1])
    with pytest.raises(BopFormatError, match="different times"):
        write_bop_csv(tmp_path / "r.csv", [BopResult(1, 1, 1, 0.5, T, 0.1), BopResult(1, 1, 2, 0.5, T, 0.3)])
    bad = tmp_path / "bad.csv"
    bad.write_text("scene_id,im_id,obj_id,score,R,t,time\n1,2,3,0.5,1 0 0 0 1 0 0 0,0 0 1,0.1\n")
    with pytest.raises(BopFormatError, match="bad.csv:2"):
        read_bop_csv(bad)
    bad.write_text("a,b\n")
    with pytest.raises(BopFormatError, match="header"):
        read_bop_csv(bad)
