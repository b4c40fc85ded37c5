"""End-to-end evaluation on a tiny synthetic BOP dataset rendered in tmp_path; oracle stages."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import trimesh

from osop_ros.core.geometry import look_at, make_T, project_points, rotation_about_axis, rotation_error_sym_deg
from osop_ros.core.mesh import ObjectModel
from osop_ros.core.types import CameraIntrinsics, MatchResult, Observation, SegmentationResult
from osop_ros.data.bop import BopResult, bop_gt_entry, write_bop_csv

pytestmark = pytest.mark.gl

W, H = 320, 240
K = np.array([[320.0, 0.0, 159.5], [0.0, 320.0, 119.5], [0.0, 0.0, 1.0]])
BOX_SYM = make_T(rotation_about_axis([0, 0, 1], np.pi), np.zeros(3))


def _ell() -> trimesh.Trimesh:
    a = trimesh.creation.box(extents=(0.10, 0.03, 0.04))
    b = trimesh.creation.box(extents=(0.03, 0.07, 0.04))
    b.apply_translation((0.035, 0.05, 0.0))
    m = trimesh.util.concatenate([a, b])
    m.visual.vertex_colors = np.tile([200, 80, 40, 255], (len(m.vertices), 1))
    return m


def _box() -> trimesh.Trimesh:
    m = trimesh.creation.box(extents=(0.06, 0.04, 0.03))
    m.visual.vertex_colors = np.tile([40, 160, 200, 255], (len(m.vertices), 1))
    return m


def _wedge() -> trimesh.Trimesh:
    """Object 3: in the dataset's models but in no image (absent-object queries)."""
    m = trimesh.creation.cone(radius=0.03, height=0.08, sections=12)
    m.visual.vertex_colors = np.tile([90, 200, 60, 255], (len(m.vertices), 1))
    return m


def _pose(el_deg: float, az_deg: float, roll_deg: float, t: tuple[float, float, float]) -> np.ndarray:
    el, az = np.radians(el_deg), np.radians(az_deg)
    d = np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])
    R = rotation_about_axis([0, 0, 1], np.radians(roll_deg)) @ look_at(d)[:3, :3]
    return make_T(R, t)


SCENE = {
    0: [(1, _pose(37.5, 30.0, 20.0, (0.0, 0.01, 0.5))), (2, _pose(63.75, 120.0, -40.0, (-0.04, -0.01, 0.42)))],
    1: [(1, _pose(11.25, 210.0, -60.0, (0.02, -0.02, 0.55))), (2, _pose(37.5, 300.0, 10.0, (-0.06, 0.03, 0.5)))],
}


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def renderer():
    render = pytest.importorskip("osop_ros.core.render")
    try:
        r = render.Renderer()
    except render.RendererError as exc:
        pytest.skip(f"no GL context: {exc}")
    yield r
    r.release()


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory, renderer) -> Path:
    """BOP dataset: 2 objects in the images (obj 2 symmetric) + obj 3 in none, 2 images, depth only for
    image 0, targets file."""
    root = tmp_path_factory.mktemp("bop") / "synth"
    (root / "models").mkdir(parents=True)
    info = {}
    for obj_id, mesh in ((1, _ell()), (2, _box()), (3, _wedge())):
        mm = mesh.copy()
        mm.apply_scale(1000.0)
        path = root / "models" / f"obj_{obj_id:06d}.ply"
        mm.export(path)
        model = ObjectModel.load(path, units="mm")
        renderer.add_object(f"synth{obj_id}", model)
        info[str(obj_id)] = {"diameter": model.diameter * 1000.0}
    info["2"]["symmetries_discrete"] = [BOX_SYM.reshape(-1).tolist()]
    _write_json(root / "models" / "models_info.json", info)
    _write_json(root / "camera.json", {"fx": 320.0, "fy": 320.0, "cx": 159.5, "cy": 119.5, "width": W, "height": H,
                                       "depth_scale": 0.1})
    sd = root / "test" / "000001"
    (sd / "rgb").mkdir(parents=True)
    (sd / "depth").mkdir()
    gt, gt_info, cams, targets = {}, {}, {}, []
    rng = np.random.default_rng(0)
    for im_id, objs in SCENE.items():
        out = renderer.render(K, W, H, [(f"synth{o}", T) for o, T in objs])
        bg = rng.integers(0, 60, size=(H, W, 3), dtype=np.uint8)
        rgb = np.where(out.mask[..., None], out.rgb, bg)
        cv2.imwrite(str(sd / "rgb" / f"{im_id:06d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        if im_id == 0:
            d = np.where(out.depth > 0, out.depth, 0.8)  # a back wall at 0.8 m
            cv2.imwrite(str(sd / "depth" / f"{im_id:06d}.png"), np.round(d * 10000.0).astype(np.uint16))
        gt[str(im_id)] = [bop_gt_entry(o, T) for o, T in objs]
        infos = []
        for k, (o, T) in enumerate(objs):
            full = int(renderer.render(K, W, H, [(f"synth{o}", T)]).mask.sum())
            vis = int((out.inst == k + 1).sum())
            infos.append({"visib_fract": vis / full, "px_count_visib": vis})
            targets.append({"scene_id": 1, "im_id": im_id, "obj_id": o, "inst_count": 1})
        gt_info[str(im_id)] = infos
        cams[str(im_id)] = {"cam_K": K.reshape(-1).tolist(), "depth_scale": 0.1}
    _write_json(sd / "scene_gt.json", gt)
    _write_json(sd / "scene_gt_info.json", gt_info)
    _write_json(sd / "scene_camera.json", cams)
    _write_json(root / "test_targets_bop19.json", targets)
    return root


def _tcfg():
    from osop_ros.core.templates import TemplateConfig
    from osop_ros.core.views import ViewGridConfig

    return TemplateConfig(views=ViewGridConfig(n_elevations=5, n_azimuths=12, n_inplane=1), crop_size=48)


def _config(**pipeline):
    """Core config of the tests: CPU, default pipeline section (verification on) + ``pipeline`` overrides."""
    from osop_ros.core.config import load_config

    return load_config({"device": "cpu", "pipeline": {"score_threshold": 0.3, **pipeline}})


def _options(synth: Path, tmp_path: Path, **kw):
    from osop_ros.eval.runner import EvalOptions

    base = dict(dataset=synth, oracle=("mask", "viewpoint"), out=tmp_path / "res.csv", cache_dir=tmp_path.parent / "tc",
                template_config=_tcfg(), progress=False, correspondence="transfer", top_k=1, config=_config())
    base.update(kw)
    return EvalOptions(**base)


# ------------------------------------------------------------------------------------------ oracles


def _onboard(synth: Path, renderer, obj_id: int, tmp_path: Path):
    from osop_ros.core.geometry import symmetry_transforms
    from osop_ros.core.stages import OnboardedObject
    from osop_ros.core.templates import TemplateCache
    from osop_ros.data.bop import BopDataset

    ds = BopDataset(synth)
    model = ObjectModel.load(ds.model_path(obj_id), units="mm", symmetries=ds.models_info[obj_id])
    bank = TemplateCache(tmp_path.parent / "tc").get_or_build(model, renderer, _tcfg(), progress=False)
    return ds, OnboardedObject(f"o{obj_id}", model, bank, symmetry_transforms(model.symmetries), obj_id)


def test_oracle_segmenter_occlusion(synth: Path, renderer, tmp_path: Path) -> None:
    from osop_ros.eval.oracle import OracleFrame, OracleSegmenter

    ds, obj = _onboard(synth, renderer, 1, tmp_path)
    frame = ds.load_frame(1, 0)
    of = OracleFrame(renderer, {1: "synth1", 2: "synth2"})
    seg = OracleSegmenter(of)
    with pytest.raises(Exception, match="set_frame"):
        seg(frame.obs, obj)
    seg.set_frame([(g.obj_id, g.T_cam_obj) for g in frame.gts])
    res = seg(frame.obs, obj)
    assert len(res) == 1 and seg.is_oracle
    full = renderer.render(K, W, H, [("synth1", frame.gts[0].T_cam_obj)]).mask
    m = res[0].mask
    assert not (m & ~full).any()  # visible mask is inside the unoccluded silhouette
    assert m.sum() == pytest.approx(frame.gts[0].visib_fract * full.sum(), abs=2)
    assert res[0].box is not None and res[0].score == 1.0
    # mask_visib from the dataset takes precedence over rendering
    mv = [np.zeros((H, W), bool), np.zeros((H, W), bool)]
    mv[0][10:20, 10:30] = True
    seg.set_frame([(g.obj_id, g.T_cam_obj) for g in frame.gts], mv)
    assert seg(frame.obs, obj)[0].mask.sum() == 200


def test_oracle_matcher_and_template_transfer(synth: Path, renderer, tmp_path: Path) -> None:
    """Query = a template view rendered off-centre and rolled: the oracle finds it with the roll, transfer + PnP
    recover the pose."""
    from osop_ros.core.correspondence import TemplateTransferCorrespondences
    from osop_ros.core.solver import PoseSolver
    from osop_ros.eval.oracle import OracleFrame, OracleMatcher, OracleSegmenter

    _, obj = _onboard(synth, renderer, 1, tmp_path)
    tid = 29
    R_t = obj.bank.poses[tid][:3, :3]
    roll = 33.0
    T = make_T(rotation_about_axis([0, 0, 1], np.radians(roll)) @ R_t, (0.0, 0.0, 0.45))
    T[:3, 3] -= T[:3, :3] @ obj.model.center  # object centre on the optical axis: no off-axis correction
    out = renderer.render(K, W, H, [("synth1", T)])
    obs = Observation(out.rgb, CameraIntrinsics.from_K(K, W, H))
    of = OracleFrame(renderer, {1: "synth1"})
    of.set_frame([(1, T)])
    seg = OracleSegmenter(of)(obs, obj)[0]
    match = OracleMatcher(of, top_k=3)(obs, seg, obj)
    assert match.template_ids[0] == tid and match.scores[0] == pytest.approx(1.0, abs=1e-5)
    assert match.inplane_deg[0] == pytest.approx(roll, abs=1e-3)
    corrs = TemplateTransferCorrespondences(n_templates=1)(obs, seg, match, obj)
    assert len(corrs) == 1 and len(corrs[0]) > 300
    c = corrs[0]
    # transferred pairs reproject close to where they were put (the template and the query are the same view)
    err = np.linalg.norm(project_points(K, T, c.pts_obj) - c.uv, axis=1)
    assert np.median(err) < 1.5
    hyp = PoseSolver()(obs, seg, corrs, obj)[0]
    assert rotation_error_sym_deg(hyp.T_cam_obj[:3, :3], T[:3, :3]) < 2.0
    assert np.linalg.norm(hyp.T_cam_obj[:3, 3] - T[:3, 3]) < 0.01
    # without the roll, transfer is visibly worse
    no_roll = MatchResult(match.template_ids[:1], match.scores[:1], np.zeros(1, np.float32))
    c0 = TemplateTransferCorrespondences()(obs, seg, no_roll, obj)[0]
    assert np.median(np.linalg.norm(project_points(K, T, c0.pts_obj) - c0.uv, axis=1)) > 3 * np.median(err)


def test_oracle_matcher_symmetry(synth: Path, renderer, tmp_path: Path) -> None:
    from osop_ros.eval.oracle import OracleMatcher

    _, obj = _onboard(synth, renderer, 2, tmp_path)
    R = obj.bank.poses[17][:3, :3]
    err, _ = OracleMatcher.rotation_errors_deg(R @ BOX_SYM[:3, :3], obj.bank.poses[:, :3, :3], obj.sym_Ts)
    assert err[17] == pytest.approx(0.0, abs=1e-4)
    err_nosym, _ = OracleMatcher.rotation_errors_deg(R @ BOX_SYM[:3, :3], obj.bank.poses[:, :3, :3], [np.eye(4)])
    assert err_nosym[17] > 90.0


# ------------------------------------------------------------------------------------------ runner


def test_eval_rgb_and_rgbd(synth: Path, tmp_path: Path, renderer, capsys) -> None:
    from osop_ros.data.bop import read_bop_csv
    from osop_ros.eval.runner import run_eval

    run = run_eval(_options(synth, tmp_path, modality="rgb"), renderer=renderer)
    printed = capsys.readouterr().out
    assert "ORACLE(mask,viewpoint)" in printed.splitlines()[0] and "NOT comparable" in printed
    rows = read_bop_csv(run.csv_path)
    assert len(rows) == 4 and {(r.im_id, r.obj_id) for r in rows} == {(0, 1), (0, 2), (1, 1), (1, 2)}
    for im in (0, 1):
        assert len({r.time for r in rows if r.im_id == im}) == 1
    summ = json.loads(run.json_path.read_text())
    assert summ["label"] == "ORACLE(mask,viewpoint)" and summ["oracle"] == ["mask", "viewpoint"]
    m = summ["metrics"]
    assert m["n_targets"] == 4 and m["n_targets_depth"] == 2
    assert m["recall"]["mspd"] > 0.7 and m["recall"]["mssd"] > 0.4
    assert m["ar_rgb"] == pytest.approx((m["recall"]["mssd"] + m["recall"]["mspd"]) / 2)
    assert m["ar_bop"] is not None and not m["ar_bop_covers_all_targets"]

    run_d = run_eval(_options(synth, tmp_path / "d", modality="rgbd"), renderer=renderer)
    s = run_d.summary
    assert s["images_evaluated"] == 1 and s["images_skipped_no_depth"] == 1
    md = s["metrics"]
    assert md["n_targets"] == 2 and md["ar_bop_covers_all_targets"]
    # ICP on exact depth: (near) perfect
    assert md["recall"]["mssd"] > 0.9 and md["recall"]["vsd"] > 0.8 and md["recall"]["add_s"] == 1.0


def test_eval_ground_truth_csv_is_perfect(synth: Path, tmp_path: Path, renderer) -> None:
    from osop_ros.data.bop import BopDataset
    from osop_ros.eval.runner import run_eval

    ds = BopDataset(synth)
    rows = [BopResult(s, i, g.obj_id, 1.0, g.T_cam_obj, 0.0) for s, i in ds.images() for g in ds.gt(s, i)]
    # a wrong, lower-scored duplicate must not matter (inst_count = 1)
    rows.append(BopResult(1, 0, 1, 0.1, make_T(np.eye(3), (0, 0, 1.0)), 0.0))
    csv = write_bop_csv(tmp_path / "gt.csv", rows)
    run = run_eval(_options(synth, tmp_path, results_csv=csv, oracle=()), renderer=renderer, print_fn=None)
    rec = run.report.recall
    for k in ("mssd", "mspd", "vsd", "add_s"):
        assert rec[k] == pytest.approx(1.0), k
    assert run.report.ar_bop == pytest.approx(1.0) and run.report.ar_rgb == pytest.approx(1.0)


def test_learned_stage_unavailable_and_factory(synth: Path, tmp_path: Path, renderer) -> None:
    from osop_ros.core.config import load_config
    from osop_ros.eval.oracle import OracleSegmenter
    from osop_ros.eval.runner import StageUnavailableError, run_eval

    no_weights = load_config({"weights": {s: str(tmp_path / "none" / f"{s}.pt") for s in ("segment", "match",
                                                                                           "correspond")}})
    with pytest.raises(StageUnavailableError, match="segmenter"):
        run_eval(_options(synth, tmp_path, oracle=("viewpoint",), config=no_weights), renderer=renderer,
                 print_fn=None)

    calls = []

    class FakeLearnedSegmenter:
        """Stands in for a network: here it delegates to the oracle masks of the runner's frame."""

        def __init__(self, ctx) -> None:
            from osop_ros.eval.oracle import OracleFrame

            self.inner = OracleSegmenter(OracleFrame(ctx.renderer, {1: "eval_obj_000001", 2: "eval_obj_000002"}))
            self.ctx = ctx

        def __call__(self, obs, obj) -> list[SegmentationResult]:
            ds = self.ctx.dataset
            im = [i for s, i in ds.images() if np.array_equal(ds.load_rgb(s, i), obs.rgb)][0]
            self.inner.set_frame([(g.obj_id, g.T_cam_obj) for g in ds.gt(1, im)])
            return self.inner(obs, obj)

    def factory(name, ctx):
        calls.append(name)
        return FakeLearnedSegmenter(ctx) if name == "segmenter" else None

    run = run_eval(_options(synth, tmp_path, oracle=("viewpoint",), objects=[1]), stage_factory=factory,
                   renderer=renderer, print_fn=None)
    assert calls == ["segmenter"]
    assert run.summary["stages"]["segmenter"] == "FakeLearnedSegmenter"
    assert run.summary["label"] == "ORACLE(viewpoint)" and run.report.n_targets == 2


def test_cli_eval(synth: Path, tmp_path: Path, capsys) -> None:
    from osop_ros.cli import main
    from osop_ros.data.bop import BopDataset

    ds = BopDataset(synth)
    rows = [BopResult(s, i, g.obj_id, 1.0, g.T_cam_obj, 0.0) for s, i in ds.images() for g in ds.gt(s, i)]
    csv = write_bop_csv(tmp_path / "gt.csv", rows)
    assert main(["eval", "--dataset", str(synth), "--results", str(csv), "--out", str(tmp_path / "o.csv"),
                 "--objects", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "RGB AR = mean(MSSD, MSPD) over all 2 targets = 1.000" in out
    assert (tmp_path / "o.json").is_file()
    # a learned stage that is not available: clear error, exit code 2
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    assert main(["eval", "--dataset", str(synth), "--out", str(tmp_path / "x.csv"), "--no-progress",
                 "--weights-dir", str(no_weights)]) == 2
    assert "learned segmenter, matcher, correspondence not available" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ what ships


ROS_YAML = """
/**/osop_node:
  ros__parameters:
    objects: {names: [a], a: {mesh: /x.ply}}
    device: cpu
    threads: 1
    weights: {segment: "", match: "", correspond: ""}
    templates: {crop_size: 48, n_elevations: 4}
    pipeline: {modality: rgbd, score_threshold: 0.7, top_k_templates: 4, icp: false, verify: true,
               verify_refine_top_n: 1, calibration: none}
    qos: {reliability: reliable, depth: 5}
    use_depth: true
"""


def test_eval_config_is_the_node_config(tmp_path: Path) -> None:
    """``osop eval`` reads the node's parameter file the way the node does (and plain core YAML)."""
    from osop_ros.core.config import load_config
    from osop_ros.eval.runner import EvalOptions, default_node_config_path, load_eval_config

    ros = tmp_path / "node.yaml"
    ros.write_text(ROS_YAML)
    cfg = load_eval_config(ros)
    p = cfg.pipeline
    assert (p.modality, p.score_threshold, p.top_k_templates, p.icp, p.verify_refine_top_n, p.calibration) == (
        "rgbd", 0.7, 4, False, 1, "none")
    assert cfg.device == "cpu" and cfg.threads == 1 and cfg.templates.crop_size == 48 and cfg.objects == []
    plain = tmp_path / "plain.yaml"
    plain.write_text("device: cpu\npipeline: {top_k_templates: 2, verify: false}\n")
    assert load_eval_config(plain).pipeline.top_k_templates == 2 and not load_eval_config(plain).pipeline.verify
    # defaults = the config; options deviate
    opts = EvalOptions(dataset=tmp_path, config=cfg)
    r = opts.resolved_config()
    assert r.pipeline.top_k_templates == 4 and r.pipeline.modality == "rgbd" and opts.corr_mode == "learned"
    r2 = EvalOptions(dataset=tmp_path, config=cfg, top_k=1, icp=True, modality="rgb", score_threshold=0.2,
                     max_instances=3).resolved_config()
    assert (r2.pipeline.top_k_templates, r2.pipeline.icp, r2.pipeline.modality, r2.pipeline.score_threshold,
            r2.pipeline.max_instances) == (1, True, "rgb", 0.2, 3)
    # the shipped node file gives the same core config as the node's own parameter mapping
    shipped = load_eval_config(default_node_config_path())
    pytest.importorskip("rclpy")
    import yaml

    from osop_ros.eval.runner import _flatten
    from osop_ros.ros.params import core_config, core_param_specs

    raw = yaml.safe_load(default_node_config_path().read_text())["/**/osop_node"]["ros__parameters"]
    values = {s.name: s.default for s in core_param_specs()} | {"device": "auto", "threads": 0} | _flatten(raw)
    node = load_config(core_config(values))
    assert shipped.pipeline == node.pipeline and shipped.weights == node.weights and shipped.templates == node.templates


def _rows(csv: Path) -> list[tuple]:
    from osop_ros.data.bop import read_bop_csv

    return [(r.scene_id, r.im_id, r.obj_id, round(r.score, 6), tuple(np.round(r.T_cam_obj.reshape(-1), 6)))
            for r in read_bop_csv(csv)]


def test_eval_summary_absent_queries_and_jobs(synth: Path, tmp_path: Path, renderer) -> None:
    """Top-level AR keys, published precision/recall, absent-object queries, features JSONL, calibration fit
    and plot; ``jobs=2`` (worker processes) gives the same estimates as one process."""
    from osop_ros.core.types import InvalidInputError
    from osop_ros.eval.runner import run_eval

    kw = dict(modality="auto", objects=[1, 2, 3], absent=1, pr_plot=tmp_path / "pr.png", hard_negatives=True)
    run = run_eval(_options(synth, tmp_path / "a", **kw), renderer=renderer, print_fn=None)
    s = run.summary
    assert s["AR"] == pytest.approx(s["metrics"]["ar_bop"]) and s["AR"] is not None
    assert s["AR_VSD"] == pytest.approx(s["metrics"]["recall_depth"]["vsd"])
    assert s["AR_MSSD"] == pytest.approx(s["metrics"]["recall_depth"]["mssd"])
    assert s["AR_MSPD"] == pytest.approx(s["metrics"]["recall_depth"]["mspd"])
    assert s["pipeline"]["verify"] and s["stages"]["verifier"] == "Verifier"
    pub = s["published"]
    assert pub["n_targets"] == 4 and pub["n_estimates"] == 4
    assert pub["absent_queries"] == 2  # obj 3 in each of the 2 images
    assert 0 <= pub["absent_published"] <= 2 and pub["n_published"] >= pub["n_correct"] >= 1
    lines = [json.loads(x) for x in Path(s["features_jsonl"]).read_text().splitlines()]
    assert len(lines) == len(run.records) and sum(r["absent"] for r in lines) >= 2
    flips = [r for r in lines if r.get("fit_only")]
    assert len(flips) == 3 * 4 and all(r["score"] is None and r["features"]["raw"] is not None for r in flips)
    assert all(r["correct"] == (r["mssd_rel"] is not None and r["mssd_rel"] < 0.1) for r in flips)
    assert not all(r["correct"] for r in flips)  # flips of the asymmetric L-shape are wrong poses
    present = [r for r in lines if not r["absent"] and not r.get("fit_only")]
    assert {r["modality"] for r in present} == {"rgbd", "rgb"}  # auto: depth only for image 0
    assert all(r["features"]["iou"] is not None and "raw" in r["features"] for r in present)
    assert all(r["correct"] == (r["mssd_rel"] is not None and r["mssd_rel"] < 0.1) for r in present)
    assert (tmp_path / "pr.png").is_file() and s["threshold_table"][0]["threshold"] == 0.0
    with pytest.raises(InvalidInputError, match="not enough estimates"):  # 6 estimates cannot be calibrated
        run_eval(_options(synth, tmp_path / "f", fit_calibration=tmp_path / "cal.yaml", objects=[1, 2, 3], absent=1),
                 renderer=renderer, print_fn=None)
    assert not (tmp_path / "cal.yaml").exists()
    # no verification: the solver's score is published, no verification features
    nv = run_eval(_options(synth, tmp_path / "nv", modality="rgbd", verify=False), renderer=renderer, print_fn=None)
    assert nv.summary["stages"]["verifier"] == "none" and all(not r.get("features") for r in nv.records)
    # worker processes: same estimates, same order
    one = run_eval(_options(synth, tmp_path / "j1", modality="auto"), renderer=renderer, print_fn=None)
    two = run_eval(_options(synth, tmp_path / "j2", modality="auto", jobs=2), renderer=renderer, print_fn=None)
    assert _rows(one.csv_path) == _rows(two.csv_path) and len(_rows(one.csv_path)) == 4
    assert two.summary["worker_processes"] == 2 and one.summary["worker_processes"] == 0


def test_cli_eval_with_config_and_overrides(synth: Path, tmp_path: Path, capsys) -> None:
    """``osop eval --config`` (plain YAML: small template grid) with flags deviating from it."""
    from osop_ros.cli import main

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"device: cpu\ntemplates: {{crop_size: 48, n_elevations: 5, n_azimuths: 12, n_inplane: 1, "
        f"cache_dir: {tmp_path.parent / 'tc'}}}\npipeline: {{score_threshold: 0.05, top_k_templates: 3}}\n"
    )
    out = tmp_path / "c.csv"
    assert main(["eval", "--dataset", str(synth), "--config", str(cfg), "--oracle", "mask,viewpoint",
                 "--correspondence", "transfer", "--top-k", "1", "--modality", "rgbd", "--objects", "1,2,3",
                 "--absent", "1", "--out", str(out), "--no-progress", "--no-vsd"]) == 0
    printed = capsys.readouterr().out
    assert "top_k=1" in printed and "score_threshold=0.05" in printed and "absent objects: 1 queries" in printed
    s = json.loads(out.with_suffix(".json").read_text())
    assert s["pipeline"]["top_k_templates"] == 1 and s["pipeline"]["score_threshold"] == 0.05
    assert s["AR"] is None and s["AR_VSD"] is None and s["AR_MSSD"] is not None  # --no-vsd: no BOP AR
    assert s["published"]["threshold"] == 0.05 and out.with_suffix(".features.jsonl").is_file()


def test_stage3_error_under_symmetry() -> None:
    """Model points of a symmetric twin pose are as good as the true ones; without the symmetry they are not."""
    from types import SimpleNamespace

    from osop_ros.eval.stages import _symmetric_instance_error

    rng = np.random.default_rng(0)
    gt = rng.uniform(-0.05, 0.05, (200, 3))
    S = make_T(rotation_about_axis(np.array([0.0, 0, 1]), np.pi), np.zeros(3))  # a 180-degree turn
    twin = gt @ S[:3, :3].T  # S^-1 = S: what a network reading the twin's coordinates predicts
    model = SimpleNamespace(diameter=0.2)
    plain = SimpleNamespace(model=model, sym_Ts=[np.eye(4)])
    sym = SimpleNamespace(model=model, sym_Ts=[np.eye(4), S])
    assert _symmetric_instance_error(gt, gt, plain) == 0.0
    assert _symmetric_instance_error(twin, gt, plain) > 10.0  # % of the diameter
    assert _symmetric_instance_error(twin, gt, sym) < 1e-9
