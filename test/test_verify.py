"""Render-and-compare verification, hypothesis selection, the calibrated score and their pipeline wiring
(real renderer and ICP, stub stages 1-3)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from osop_ros.core.geometry import make_T, mask_to_box, rotation_about_axis, rotation_angle_deg
from osop_ros.core.pipeline import Pipeline
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import (
    CameraIntrinsics,
    Correspondences,
    InvalidInputError,
    MatchResult,
    Observation,
    PoseHypothesis,
    SegmentationResult,
)
from osop_ros.core.verify import (
    FEATURE_NAMES,
    PlattModel,
    ScoreCalibration,
    Verifier,
    edge_agreement,
    select_hypothesis,
)

pytestmark = pytest.mark.gl
CAM = CameraIntrinsics(500.0, 500.0, 159.5, 119.5, 320, 240)


def _rot(T: np.ndarray, axis, deg: float) -> np.ndarray:
    return make_T(rotation_about_axis(np.asarray(axis, float), np.radians(deg)) @ T[:3, :3], T[:3, 3])


def _shift(T: np.ndarray, d) -> np.ndarray:
    return make_T(T[:3, :3], T[:3, 3] + np.asarray(d, float))


@pytest.fixture(scope="module")
def scene():
    """The example object at 0.5 m on a textured background 0.3 m behind it; an occluding slab covering
    the left part of the object 0.1 m in front of it in a second depth image."""
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer
    from osop_ros.data.example import EXAMPLE_PATH

    model = ObjectModel.load(EXAMPLE_PATH, units="m", name="example")
    T = make_T(rotation_about_axis(np.array([1.0, 0.5, 0.2]), 0.8), np.array([0.01, -0.02, 0.5]))
    with Renderer() as r:
        r.add_object("m", model)
        out = r.render(CAM.K, CAM.width, CAM.height, [("m", T)])
    rng = np.random.default_rng(0)
    bg = np.repeat(np.repeat(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), 8, 0), 8, 1)
    rgb = np.where(out.mask[..., None], out.rgb, bg)
    depth = np.where(out.mask, out.depth, 0.8).astype(np.float32)
    box = mask_to_box(out.mask)
    occl = depth.copy()
    x_cut = (box[0] + box[2]) // 2
    occl[:, : x_cut] = np.minimum(occl[:, : x_cut], 0.4)  # slab in front of the left half
    seg_full = SegmentationResult(out.mask, out.mask.astype(np.float32), box, 0.9)
    vis = out.mask.copy()
    vis[:, : x_cut] = False
    seg_vis = SegmentationResult(vis, vis.astype(np.float32), mask_to_box(vis), 0.9)
    obj = OnboardedObject("example", model, bank=None, sym_Ts=[np.eye(4)])  # type: ignore[arg-type]
    return dict(model=model, T=T, rgb=rgb, depth=depth, occl=occl, seg=seg_full, seg_vis=seg_vis, obj=obj)


@pytest.fixture(scope="module")
def verifier():
    v = Verifier()
    yield v
    v.release()


def test_verify_ranks_true_pose_first_rgbd_and_rgb(scene, verifier) -> None:
    T, obj = scene["T"], scene["obj"]
    obs = Observation(scene["rgb"], CAM, scene["depth"])
    good = verifier.verify(obs, scene["seg"], obj, T)
    f = good.features
    assert set(f) == set(FEATURE_NAMES)
    assert f["iou"] > 0.9 and f["depth_inlier"] > 0.9 and f["occluded"] < 0.05 and f["depth_valid"] > 0.95
    assert f["edge"] > 0.3 and good.raw > 0.6
    wrong = {
        "rot 45": _rot(T, [0, 1, 0], 45), "flip": _rot(T, [1, 0, 0], 180), "x +1.5 cm": _shift(T, [0.015, 0, 0]),
        "z -3 cm (in free space)": _shift(T, [0, 0, -0.03]), "z +3 cm (behind the surface)": _shift(T, [0, 0, 0.03]),
    }
    for name, Tw in wrong.items():
        v = verifier.verify(obs, scene["seg"], obj, Tw)
        assert v.raw < good.raw - 0.2, name
    assert verifier.verify(obs, scene["seg"], obj, wrong["z -3 cm (in free space)"]).features["depth_behind"] > 0.8
    assert verifier.verify(obs, scene["seg"], obj, wrong["z +3 cm (behind the surface)"]).features["occluded"] > 0.8
    # RGB only: no depth terms, the ranking holds with silhouette + edges
    rgb_obs = Observation(scene["rgb"], CAM, None)
    g = verifier.verify(rgb_obs, scene["seg"], obj, T)
    assert math.isnan(g.features["depth_inlier"]) and math.isnan(g.features["occluded"])
    for name in ("rot 45", "flip", "x +1.5 cm"):
        assert verifier.verify(rgb_obs, scene["seg"], obj, wrong[name]).raw < g.raw - 0.15, name
    # a pose behind the camera or out of view scores 0
    assert verifier.verify(obs, scene["seg"], obj, _shift(T, [0, 0, -1.0])).raw == 0.0
    assert verifier.verify(obs, scene["seg"], obj, _shift(T, [5.0, 0, 0])).raw == 0.0


def test_occlusion_is_not_an_error(scene, verifier) -> None:
    """Observed depth in front of the model (the slab) is excluded; the true pose still verifies."""
    T, obj = scene["T"], scene["obj"]
    obs = Observation(scene["rgb"], CAM, scene["occl"])
    v = verifier.verify(obs, scene["seg_vis"], obj, T)
    f = v.features
    assert 0.2 < f["occluded"] < 0.8
    assert f["depth_inlier"] > 0.9 and f["iou"] > 0.8  # silhouette compared with the visible part only
    assert v.raw > 0.5
    # the same pose 4 cm further away: hidden behind the surface, mostly "occluded" -> penalised
    far = verifier.verify(obs, scene["seg_vis"], obj, _shift(T, [0, 0, 0.04]))
    assert far.features["occluded"] > 0.9 and far.raw < 0.25


def test_renderer_keys_follow_the_model_not_its_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new model that reuses a freed model's id must not be rendered with the old mesh."""
    import osop_ros.core.verify as verify_mod

    added: list[tuple[str, object]] = []

    class FakeRenderer:
        def add_object(self, key: str, model: object) -> None:
            added.append((key, model))

    v = Verifier(renderer_factory=FakeRenderer)
    monkeypatch.setattr(verify_mod, "id", lambda o: 7, raising=False)  # every model gets the same id
    a, b = (OnboardedObject(n, object(), bank=None, sym_Ts=[np.eye(4)]) for n in "ab")  # type: ignore[arg-type]
    ka, kb = v._key(a), v._key(b)
    assert ka != kb and [m for _, m in added] == [a.model, b.model]
    assert v._key(b) == kb and len(added) == 2  # cached while the model lives (the entry holds it)


def test_edge_agreement_counts_orientation() -> None:
    r = np.zeros((40, 40), bool)
    r[20, 5:35] = True  # a horizontal edge ...
    theta_r = np.full((40, 40), np.pi / 2)  # ... has a vertical gradient
    o = np.zeros((40, 40), bool)
    o[21, :] = True
    hit, chance = edge_agreement(r, theta_r, o, np.full((40, 40), -np.pi / 2), 1.5, 30.0)
    assert hit == 1.0 and 0.0 < chance < 0.1  # opposite contrast, same orientation
    hit, _ = edge_agreement(r, theta_r, o, np.zeros((40, 40)), 1.5, 30.0)
    assert hit == 0.0  # perpendicular observed edges do not support it
    hit, _ = edge_agreement(r, theta_r, np.roll(o, 6, axis=0), np.full((40, 40), np.pi / 2), 1.5, 30.0)
    assert hit == 0.0  # too far


def test_select_verifies_all_refines_best(scene, verifier) -> None:
    T, obj = scene["T"], scene["obj"]
    obs = Observation(scene["rgb"], CAM, scene["depth"])
    close = _shift(_rot(T, [0, 0, 1], 3), [0.003, -0.002, 0.004])
    hyps = [PoseHypothesis(_rot(T, [0, 1, 0], 60), 0.9, 50, {"id": "bad"}),
            PoseHypothesis(close, 0.2, 50, {"id": "close"}),
            PoseHypothesis(_shift(T, [0.03, 0, 0]), 0.5, 50, {"id": "off"})]
    refined = []

    def refine(h: PoseHypothesis) -> PoseHypothesis:
        refined.append(h.info["id"])
        return PoseHypothesis(T.copy(), h.score, h.inliers, {**h.info, "icp": True})

    sel = select_hypothesis(verifier, obs, scene["seg"], obj, hyps, refine, refine_top_n=1)
    assert refined == ["close"]  # ranked first by verification although the solver score was lowest
    assert sel.refined and sel.hypothesis.info["icp"] and np.allclose(sel.hypothesis.T_cam_obj, T)
    assert len(sel.candidates) == 3 and sel.candidates == sorted(sel.candidates, reverse=True)

    def bad_refine(h: PoseHypothesis) -> PoseHypothesis:  # "ICP" that makes it worse is not taken
        return PoseHypothesis(_rot(T, [0, 1, 0], 90), h.score, h.inliers, dict(h.info))

    sel = select_hypothesis(verifier, obs, scene["seg"], obj, hyps, bad_refine, refine_top_n=2)
    assert not sel.refined and sel.hypothesis.info["id"] == "close"


def test_select_tries_flips_of_the_best(scene, verifier) -> None:
    from osop_ros.core.verify import model_flips

    T, obj = scene["T"], scene["obj"]
    obs = Observation(scene["rgb"], CAM, scene["depth"])
    flips = model_flips(obj)
    assert len(flips) == 3
    for F in flips:  # rotations by pi about axes through the model centre
        assert np.allclose(F @ F, np.eye(4), atol=1e-9)
        assert rotation_angle_deg(F[:3, :3], np.eye(3)) == pytest.approx(180)
        assert np.allclose(F[:3, :3] @ obj.model.center + F[:3, 3], obj.model.center)
    flipped = PoseHypothesis(T @ flips[1], 0.9, 50, {})
    assert select_hypothesis(verifier, obs, scene["seg"], obj, [flipped]).hypothesis is flipped  # no flips tried
    assert verifier.config.flip_top_n == 0  # off by default (measured worse on heldout_b)
    assert select_hypothesis(verifier, obs, scene["seg"], obj, [flipped], flips=flips).hypothesis is flipped
    verifier.config.flip_top_n = 2
    try:
        sel = select_hypothesis(verifier, obs, scene["seg"], obj, [flipped], flips=flips)
    finally:
        verifier.config.flip_top_n = 0
    assert sel.hypothesis.info["flip_axis"] == 1 and np.allclose(sel.hypothesis.T_cam_obj, T, atol=1e-9)
    assert len(sel.candidates) == 4


def _calibration() -> ScoreCalibration:
    return ScoreCalibration({
        "rgbd": PlattModel(["raw", "depth_inlier"], [0.5, 0.5], [0.2, 0.2], [2.0, 1.0], -1.0),
        "rgb": PlattModel(["raw"], [0.5], [0.2], [1.5], -2.0),
    }, {"criterion": "test"})


def test_calibration_probability_and_files(tmp_path) -> None:
    cal = _calibration()
    p = cal.probability({"raw": 0.7, "depth_inlier": float("nan")}, "rgbd")  # NaN -> the mean (no effect)
    assert p == pytest.approx(1.0 / (1.0 + math.exp(-(-1.0 + 2.0 * (0.7 - 0.5) / 0.2))))
    assert cal.probability({"raw": 0.7}, "rgb") == pytest.approx(1.0 / (1.0 + math.exp(-(-2.0 + 1.5))))
    assert ScoreCalibration({"rgb": cal.models["rgb"]}).probability({"raw": 0.7}, "rgbd") is None
    for name in ("c.yaml", "c.json"):
        path = cal.save(tmp_path / name)
        back = ScoreCalibration.load(path)
        assert back.meta["criterion"] == "test"
        assert back.probability({"raw": 0.3, "depth_inlier": 0.9}, "rgbd") == pytest.approx(
            cal.probability({"raw": 0.3, "depth_inlier": 0.9}, "rgbd"))
    (tmp_path / "bad.yaml").write_text("models: {rgbd: {features: [raw, nonsense], mean: [0, 0], scale: [1, 1], "
                                       "coef: [1, 1], intercept: 0}}\n")
    with pytest.raises(InvalidInputError, match="nonsense"):
        ScoreCalibration.load(tmp_path / "bad.yaml")
    with pytest.raises(InvalidInputError, match="cannot read"):
        ScoreCalibration.load(tmp_path / "missing.yaml")


# `osop data synth --split val` sets of docs/results.md (synth_val: session 4; the others: session 8 / 12)
OWN_VAL_SETS = {"synth_val", "cal_val", "float_val", "calp_val"}


def test_shipped_calibration_is_well_formed() -> None:
    from osop_ros.core.pipeline import default_calibration_path

    path = default_calibration_path()
    if not path.is_file():
        pytest.skip("no shipped score calibration yet")
    cal = ScoreCalibration.load(path)
    assert set(cal.models) == {"rgbd", "rgb"}
    assert "MSSD" in cal.meta["criterion"]
    for mod, fit in cal.meta["fitted_on"].items():
        # fitted on val sets of our own generator only, never on the held-out style or on real data
        sources = [Path(str(d)).name for d in (fit.get("datasets") or [fit.get("dataset")])]
        assert sources and set(sources) <= OWN_VAL_SETS, f"{mod} calibration fitted on {sources}, not our val data"
        assert fit["n"] > fit["n_pos"] and (fit["n_pos"] > 0 or "constant" in fit["note"])
    # roughly the medians of correct / wrong RGB-D estimates on synth_val (docs/results.md)
    good = {"raw": 0.9, "iou": 0.88, "mask_recall": 1.0, "mask_precision": 0.9, "edge": 0.85, "texture_edge": 0.6,
            "color": 0.85, "depth_inlier": 0.98, "depth_behind": 0.02, "occluded": 0.0, "depth_valid": 1.0,
            "seg_score": 0.9, "match_score": 0.75, "flip_margin": 0.2}
    bad = {**good, "raw": 0.4, "iou": 0.36, "mask_recall": 0.6, "edge": 0.2, "texture_edge": 0.08, "depth_inlier": 0.68,
           "depth_behind": 0.32, "flip_margin": 0.0}
    if cal.uses("flip_margin", "rgbd"):  # a pose whose flip explains the image as well is not sure
        assert cal.probability({**good, "flip_margin": 0.0}, "rgbd") < cal.probability(good, "rgbd")
    assert cal.probability(good, "rgbd") > 0.5 > 0.05 > cal.probability(bad, "rgbd")
    if cal.models["rgb"].features:
        assert cal.probability(good, "rgb") > cal.probability(bad, "rgb")
    else:  # no correct RGB-only pose in the fitting data: a constant, low probability
        assert cal.probability(good, "rgb") == cal.probability(bad, "rgb") < 0.05


class StubStages:
    """Stages 1-3 from the rendered scene; a solver with ``propose`` (wrong, near-right) and ``refine``."""

    def __init__(self, scene) -> None:
        self.s = scene
        self.refined = 0

    def segment(self, obs, obj):
        return [self.s["seg"]]

    def match(self, obs, seg, obj):
        return MatchResult(np.array([0, 1]), np.array([0.8, 0.6], np.float32), np.zeros(2, np.float32))

    def correspond(self, obs, seg, match, obj):
        return [Correspondences(np.zeros((0, 2)), np.zeros((0, 3)), np.zeros(0, np.float32))] * 2

    def __call__(self, obs, seg, corrs, obj):  # the plain stage protocol: one (wrong) ranked list
        return self.propose(obs, seg, corrs, obj)

    def propose(self, obs, seg, corrs, obj):
        T = self.s["T"]
        return [PoseHypothesis(_rot(T, [0, 1, 0], 50), 0.9, 10, {"corr_set": 0}),
                PoseHypothesis(_shift(T, [0.002, 0.0, 0.003]), 0.3, 10, {"corr_set": 1})]

    def refine(self, obs, seg, h, obj):
        self.refined += 1
        return None if obs.depth is None else PoseHypothesis(self.s["T"].copy(), h.score, h.inliers, dict(h.info))

    def uses_depth(self, obs):
        return obs.depth is not None


def test_pipeline_publishes_verified_calibrated_pose(scene, tmp_path) -> None:
    from osop_ros.core.config import load_config

    st = StubStages(scene)
    obs = Observation(scene["rgb"], CAM, scene["depth"])
    plain = Pipeline([scene["obj"]], st.segment, st.match, st.correspond, st)
    assert plain.verifier is None
    e0 = plain(obs)[0]
    assert rotation_angle_deg(e0.R, scene["T"][:3, :3]) > 40  # without verification the solver's first wins
    pipe = Pipeline([scene["obj"]], st.segment, st.match, st.correspond, st, verifier=Verifier(),
                    calibration=_calibration(), refine_top_n=1)
    try:
        e = pipe(obs)[0]
        assert np.allclose(e.T_cam_obj, scene["T"]) and st.refined == 1 and e.diagnostics["verify_refined"]
        d = e.diagnostics
        assert d["score_calibrated"] and d["verify_modality"] == "rgbd"
        assert d["verify"]["match_score"] == pytest.approx(0.6) and d["verify"]["seg_score"] == pytest.approx(0.9)
        assert e.score == pytest.approx(_calibration().probability(d["verify"], "rgbd"))
        assert {"segment", "match", "correspond", "solve", "verify", "refine", "total"} <= set(e.timings)
        e_rgb = pipe(Observation(scene["rgb"], CAM, None))[0]
        assert e_rgb.diagnostics["verify_modality"] == "rgb" and not e_rgb.diagnostics["verify_refined"]
        assert rotation_angle_deg(e_rgb.R, scene["T"][:3, :3]) < 2
        # uncalibrated: the raw verification score is published and flagged
        pipe.calibration = None
        e2 = pipe(obs)[0]
        assert not e2.diagnostics["score_calibrated"] and e2.score == pytest.approx(e2.diagnostics["score_raw"])
    finally:
        pipe.verifier.release()
    # configuration wiring: assigning a config applies the pipeline's verification keys
    pipe.config = load_config({"pipeline": {"verify": False}})
    assert pipe.verifier is None and pipe.calibration is None
    cal_file = _calibration().save(tmp_path / "cal.yaml")
    pipe.config = load_config({"pipeline": {"verify": True, "calibration": str(cal_file), "verify_refine_top_n": 3}})
    assert isinstance(pipe.verifier, Verifier) and pipe.refine_top_n == 3
    assert pipe.calibration is not None and set(pipe.calibration.models) == {"rgbd", "rgb"}
    pipe.verifier.release()
    pipe.config = load_config({"pipeline": {"calibration": "none"}})
    assert pipe.verifier is not None and pipe.calibration is None
    pipe.verifier.release()
    with pytest.raises(InvalidInputError, match="cannot read"):
        pipe.config = load_config({"pipeline": {"calibration": str(tmp_path / "missing.yaml")}})
    with pytest.raises(InvalidInputError, match="verify_candidates"):
        load_config({"pipeline": {"verify_candidates": 0}})


def test_solver_propose_then_refine_matches_call(scene) -> None:
    """``propose`` + ``refine`` (the verification path) give the poses ``__call__`` gives."""
    from osop_ros.core.geometry import project_points
    from osop_ros.core.solver import PoseSolver, SolverConfig

    T, model, obj = scene["T"], scene["model"], scene["obj"]
    pts, _ = model.sample_surface(400, seed=3)
    T_noisy = _shift(_rot(T, [0, 1, 0], 2), [0.002, 0, 0])
    uv = project_points(CAM.K, T_noisy, pts)
    corrs = [Correspondences(uv, pts, np.ones(len(pts), np.float32))]
    obs = Observation(scene["rgb"], CAM, scene["depth"])
    solver = PoseSolver(SolverConfig(icp_top_n=1))
    full = solver(obs, scene["seg"], corrs, obj)
    props = solver.propose(obs, scene["seg"], corrs, obj)
    assert all("icp_fitness" not in h.info for h in props)
    ref = solver.refine(obs, scene["seg"], props[0], obj)
    assert ref is not None and ref.info["icp_accepted"]
    assert np.allclose(ref.T_cam_obj, full[0].T_cam_obj, atol=1e-9)
    assert rotation_angle_deg(ref.T_cam_obj[:3, :3], T[:3, :3]) < 1.0
    assert solver.refine(Observation(scene["rgb"], CAM, None), scene["seg"], props[0], obj) is None


def test_flip_margins_follow_the_flip_group(scene) -> None:
    """Member ``a`` composed with flip ``i`` is the member :func:`flip_margins` assumes (checked on the real
    flips of the example model), and the margins are raw minus the best non-symmetric alternative."""
    from osop_ros.core.verify import flip_margins, model_flips

    T, obj = scene["T"], scene["obj"]
    flips = model_flips(obj)
    members = [T] + [T @ F for F in flips]
    rng = np.random.default_rng(3)
    for nonsym in ([0, 1, 2], [0, 2], [1], []):
        raws = rng.random(4).tolist()
        got = flip_margins(raws, nonsym)
        for a, Pa in enumerate(members):
            alts = []
            for i in nonsym:
                (b,) = [k for k, Pk in enumerate(members) if np.allclose(Pa @ flips[i], Pk, atol=1e-9)]
                alts.append(raws[b])
            if alts:
                assert got[a] == pytest.approx(raws[a] - max(alts))
            else:
                assert math.isnan(got[a])
    assert flip_margins([0.9, 0.5, 0.85, 0.3], [0, 1, 2])[0] == pytest.approx(0.05)
    with pytest.raises(ValueError, match="3 flips"):
        flip_margins([0.9, 0.5], [0])


def test_nonsymmetric_flips_skip_declared_symmetries(scene) -> None:
    from osop_ros.core.verify import model_flips, nonsymmetric_flips

    model = scene["model"]
    flips = model_flips(OnboardedObject("a", model, bank=None, sym_Ts=[np.eye(4)]))  # type: ignore[arg-type]
    cases = {(): [0, 1, 2], (1,): [0, 2], (0, 1, 2): []}
    for declared, expected in cases.items():
        obj = OnboardedObject("b", model, bank=None,  # type: ignore[arg-type]
                              sym_Ts=[np.eye(4)] + [flips[i] for i in declared])
        assert nonsymmetric_flips(obj) == expected
    # a symmetry that is a flip only to within a few millimetres still counts (tolerance 0.1 x diameter)
    nudged = make_T(flips[2][:3, :3], flips[2][:3, 3] + np.array([0.002, 0.0, 0.0]))
    obj = OnboardedObject("c", model, bank=None, sym_Ts=[np.eye(4), nudged])  # type: ignore[arg-type]
    assert nonsymmetric_flips(obj) == [0, 1]


def test_pipeline_flip_margin_only_when_the_calibration_reads_it(scene) -> None:
    st = StubStages(scene)
    obs = Observation(scene["rgb"], CAM, scene["depth"])
    obj = OnboardedObject("example", scene["model"], bank=None, sym_Ts=[np.eye(4)])  # type: ignore[arg-type]
    with_flip = ScoreCalibration({"rgbd": PlattModel(["raw", "flip_margin"], [0.5, 0.0], [0.2, 0.1], [1.0, 3.0], 0.0)})
    assert with_flip.uses("flip_margin", "rgbd") and not with_flip.uses("flip_margin", "rgb")
    assert not _calibration().uses("flip_margin", "rgbd")
    pipe = Pipeline([obj], st.segment, st.match, st.correspond, st, verifier=Verifier(), calibration=_calibration(),
                    refine_top_n=1)
    try:
        d = pipe(obs)[0].diagnostics
        assert d["verify"].get("flip_margin") is None and "verify_flips" not in d
        pipe.calibration = with_flip
        e = pipe(obs)[0]
        d = e.diagnostics
        # the true pose of an asymmetric model: every upside-down twin explains the image worse
        assert np.allclose(e.T_cam_obj, scene["T"]) and d["verify"]["flip_margin"] > 0.05
        assert e.score == pytest.approx(with_flip.probability(d["verify"], "rgbd"))
        assert "verify_flips" not in d
        pipe.verifier.config.report_flips = True  # eval: the flips as hard negatives, with their own margins
        d2 = pipe(obs)[0].diagnostics
        assert len(d2["verify_flips"]) == 3
        assert d2["verify"]["flip_margin"] == pytest.approx(d["verify"]["flip_margin"])
        assert all(f["features"]["flip_margin"] < 0 for f in d2["verify_flips"])
    finally:
        pipe.verifier.release()


class FarStubStages(StubStages):
    """The near-right hypothesis 8 % too far along its viewing ray (a PnP distance error)."""

    def propose(self, obs, seg, corrs, obj):
        from osop_ros.core.scale_search import along_ray

        T = self.s["T"]
        far = along_ray(T, np.asarray(self.s["model"].center, float), 1.08)
        return [PoseHypothesis(_rot(T, [0, 1, 0], 50), 0.9, 10, {"corr_set": 0}),
                PoseHypothesis(far, 0.3, 10, {"corr_set": 1})]


@pytest.mark.parametrize("start", [1.12, 0.9])
def test_scale_search_recovers_the_distance(scene, verifier, start: float) -> None:
    """RGB only: a pose 12 % too far or 10 % too near along its ray is moved back to within 4 % of the true
    distance (the raw score's peak is flat to about +-2 % even here), and the verification score rises."""
    from osop_ros.core.geometry import transform_points
    from osop_ros.core.scale_search import RgbScaleSearch, ScaleSearchConfig, along_ray

    obs, seg, obj = Observation(scene["rgb"], CAM, None), scene["seg"], scene["obj"]
    center = np.asarray(scene["model"].center, float)
    T0 = along_ray(scene["T"], center, start)
    search = RgbScaleSearch(verifier, ScaleSearchConfig(0.2, 21))
    got = search(obs, seg, obj, T0)
    z_true = transform_points(scene["T"], center[None])[0, 2]
    z_got = transform_points(got.T_cam_obj, center[None])[0, 2]
    assert abs(z_got / z_true - 1) < 0.04
    assert got.verification.raw > verifier.verify(obs, seg, obj, T0, False).raw
    # the true pose stays where it is
    assert abs(search(obs, seg, obj, scene["T"]).scale - 1.0) < 0.04


def test_pipeline_searches_the_distance_without_depth_only(scene) -> None:
    """RGB frames: the verified pose is moved along its ray towards the true distance (``rgb_scale`` in the
    diagnostics, a ``scale`` timing); RGB-D frames never take the search (ICP decides there)."""
    from osop_ros.core.scale_search import RgbScaleSearch

    st = FarStubStages(scene)
    verifier = Verifier()
    pipe = Pipeline([scene["obj"]], st.segment, st.match, st.correspond, st, verifier=verifier,
                    scale_search=RgbScaleSearch(verifier))
    try:
        z_true = float(scene["T"][2, 3])
        e = pipe(Observation(scene["rgb"], CAM, None))[0]
        assert e.diagnostics["rgb_scale"] < 0.97 and "scale" in e.timings
        assert abs(e.T_cam_obj[2, 3] / z_true - 1) < 0.04  # from 8 % off
        assert rotation_angle_deg(e.R, scene["T"][:3, :3]) < 1e-6  # rotation untouched
        e_d = pipe(Observation(scene["rgb"], CAM, scene["depth"]))[0]
        assert "rgb_scale" not in e_d.diagnostics and "scale" not in e_d.timings
    finally:
        verifier.release()


def _centre_error(T: np.ndarray, T_true: np.ndarray, center: np.ndarray) -> tuple[float, float]:
    """(distance between the model centres in m, rotation angle in degrees)."""
    from osop_ros.core.geometry import transform_points

    c, c_true = transform_points(T, center[None])[0], transform_points(T_true, center[None])[0]
    return float(np.linalg.norm(c - c_true)), rotation_angle_deg(T[:3, :3], T_true[:3, :3])


@pytest.mark.parametrize("dof", ["full", "translation", "depth"])
def test_contour_refinement_pulls_the_pose_onto_the_edges(scene, verifier, dof: str) -> None:
    """On a plain background the rendered contour is pulled back onto the object's edges: 6 % too far
    along the ray (30 mm) or 5 mm to the side -> within 3 mm and 2 degrees (each degree-of-freedom choice)."""
    from osop_ros.core.contour_refine import ContourRefineConfig, ContourRefiner
    from osop_ros.core.scale_search import along_ray

    rgb = np.where(scene["seg"].mask[..., None], scene["rgb"], 90).astype(np.uint8)
    obs, seg, obj, T = Observation(rgb, CAM, None), scene["seg"], scene["obj"], scene["T"]
    center = np.asarray(scene["model"].center, float)
    refine = ContourRefiner(verifier.render_view, ContourRefineConfig(dof=dof))
    starts = {"6 % too far": along_ray(T, center, 1.06)}
    if dof != "depth":
        starts["5 mm to the side"] = _shift(T, [0.005, 0.0, 0.0])
    for name, T0 in starts.items():
        r = refine(obs, seg, obj, T0)
        assert r.ok and r.n_points >= 100, name
        dist, ang = _centre_error(r.T_cam_obj, T, center)
        assert dist < 0.003 and ang < 2.0, (name, dist, ang)
        assert _centre_error(T0, T, center)[0] > 0.0049


def test_contour_refinement_refuses(scene, verifier) -> None:
    """Bad settings are refused; a pose whose contour finds no edges (blank image) comes back unchanged, not ok."""
    from osop_ros.core.contour_refine import ContourRefineConfig, ContourRefiner

    for bad in ({"dof": "rotation"}, {"iterations": 0}, {"search_px": 2, "final_search_px": 4}, {"side": 8},
                {"min_points": 4}, {"huber_px": 0.0}, {"mask_sigma_px": -1.0}):
        with pytest.raises(InvalidInputError):
            ContourRefineConfig(**bad)  # type: ignore[arg-type]
    blank = Observation(np.full_like(scene["rgb"], 128), CAM, None)
    r = ContourRefiner(verifier.render_view)(blank, scene["seg"], scene["obj"], scene["T"])
    assert not r.ok and np.array_equal(r.T_cam_obj, scene["T"])


@pytest.mark.parametrize("case", ["empty mask", "full mask", "behind the camera", "half outside the image",
                                  "far away (a few pixels)", "no mask"])
def test_contour_refinement_bad_input(scene, verifier, case: str) -> None:
    """Degenerate inputs never raise; when nothing can be refined the pose comes back unchanged, and whatever
    comes back stays within the configured total change."""
    from osop_ros.core.contour_refine import ContourRefineConfig, ContourRefiner

    T, obj, seg = scene["T"], scene["obj"], scene["seg"]
    H, W = seg.mask.shape
    if case == "empty mask":
        seg = SegmentationResult(np.zeros((H, W), bool), np.zeros((H, W), np.float32), None, 0.1)
    elif case == "full mask":
        seg = SegmentationResult(np.ones((H, W), bool), np.ones((H, W), np.float32), (0, 0, W, H), 0.1)
    elif case == "behind the camera":
        T = _shift(T, [0.0, 0.0, -1.0])
    elif case == "half outside the image":
        T = _shift(T, [0.33, 0.0, 0.0])
    elif case == "far away (a few pixels)":
        T = _shift(T, [0.0, 0.0, 30.0])
    cfg = ContourRefineConfig()
    r = ContourRefiner(verifier.render_view, cfg)(Observation(scene["rgb"], CAM, None),
                                                  None if case == "no mask" else seg, obj, T)
    if not r.ok:
        assert np.array_equal(r.T_cam_obj, T)
    dist, ang = _centre_error(r.T_cam_obj, T, np.asarray(scene["model"].center, float))
    assert ang <= cfg.max_rotation_deg + 1e-6 and dist <= cfg.max_shift_frac * float(obj.model.diameter) + 1e-9
    if case in ("empty mask", "behind the camera", "far away (a few pixels)"):
        assert not r.ok


def test_rgb_contour_refine_on_a_textured_background(scene, verifier) -> None:
    """On the textured scene (8-px blocks of random colour behind the object) a pose 5 mm off to the side
    comes back nearer the truth, verified better; a blank image leaves the pose and its verification alone."""
    from osop_ros.core.contour_refine import RgbContourRefine

    obs, seg, obj, T = Observation(scene["rgb"], CAM, None), scene["seg"], scene["obj"], scene["T"]
    center = np.asarray(scene["model"].center, float)
    refine = RgbContourRefine(verifier)
    T0 = _shift(T, [0.005, 0.0, 0.0])
    got = refine(obs, seg, obj, T0)
    assert got.result.ok and got.verification is not None
    assert got.verification.raw > verifier.verify(obs, seg, obj, T0, False).raw
    assert _centre_error(got.T_cam_obj, T, center)[0] < 0.004
    blank = refine(Observation(np.full_like(scene["rgb"], 128), CAM, None), seg, obj, T0)
    assert blank.verification is None and np.array_equal(blank.T_cam_obj, T0)


def test_pipeline_refines_contours_without_depth_only(scene) -> None:
    """RGB frames: ``rgb_contour`` in the diagnostics and a ``contour`` timing, the pose nearer the truth;
    RGB-D frames never take the refinement."""
    from osop_ros.core.contour_refine import RgbContourRefine

    st = FarStubStages(scene)
    verifier = Verifier()
    pipe = Pipeline([scene["obj"]], st.segment, st.match, st.correspond, st, verifier=verifier,
                    contour_refine=RgbContourRefine(verifier))
    try:
        center = np.asarray(scene["model"].center, float)
        e = pipe(Observation(scene["rgb"], CAM, None))[0]
        assert e.diagnostics["rgb_contour"]["refined"] and "contour" in e.timings
        assert _centre_error(e.T_cam_obj, scene["T"], center)[0] < 0.02  # from 40 mm (8 % of 0.5 m)
        e_d = pipe(Observation(scene["rgb"], CAM, scene["depth"]))[0]
        assert "rgb_contour" not in e_d.diagnostics and "contour" not in e_d.timings
    finally:
        verifier.release()
