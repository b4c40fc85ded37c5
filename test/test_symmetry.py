"""Shape symmetries from the mesh alone, and the colour search over them (real renderer)."""

from __future__ import annotations

import numpy as np
import pytest

from osop_ros.core.geometry import make_T, mask_to_box, rotation_about_axis, rotation_angle_deg
from osop_ros.core.mesh import ObjectModel
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.symmetry import ColourSymmetrySearch, shape_symmetries, surface_axes
from osop_ros.core.types import CameraIntrinsics, Observation, SegmentationResult
from osop_ros.core.verify import Verifier

CAM = CameraIntrinsics(500.0, 500.0, 159.5, 119.5, 320, 240)


def _obj(mesh, name: str) -> OnboardedObject:
    return OnboardedObject(name, ObjectModel.from_trimesh(mesh, name=name), bank=None, sym_Ts=[np.eye(4)])  # type: ignore[arg-type]


def _angles(syms: list[np.ndarray]) -> list[int]:
    return sorted(round(rotation_angle_deg(S[:3, :3], np.eye(3))) for S in syms)


def test_surface_axes_of_a_tilted_cylinder_are_exact():
    trimesh = pytest.importorskip("trimesh")
    axis = np.array([0.3, -0.5, 0.8]) / np.linalg.norm([0.3, -0.5, 0.8])
    R = rotation_about_axis(np.cross([0.0, 0.0, 1.0], axis), np.arccos(axis[2]))
    m = trimesh.creation.cylinder(0.02, 0.12, sections=96)
    m.apply_transform(make_T(R, np.array([0.1, 0.2, -0.05])))
    centre, axes = surface_axes(ObjectModel.from_trimesh(m, name="c"))
    assert np.allclose(centre, [0.1, 0.2, -0.05], atol=1e-6)
    assert abs(abs(float(axes[0] @ axis)) - 1.0) < 1e-6  # the long axis comes first


def test_shape_symmetries_of_primitives():
    trimesh = pytest.importorskip("trimesh")
    box = _angles(shape_symmetries(_obj(trimesh.creation.box((0.05, 0.08, 0.12)), "box")))
    assert box == [180, 180, 180]  # the three face-axis flips, no 90-degree turn
    sq = _angles(shape_symmetries(_obj(trimesh.creation.box((0.05, 0.05, 0.12)), "sq")))
    assert sq.count(90) == 2 and sq.count(180) >= 3
    cone = shape_symmetries(_obj(trimesh.creation.cone(0.04, 0.1, sections=64), "cone"))
    assert len(cone) == 23  # every 15-degree turn about the axis, no flip (apex on one side)
    cyl = _angles(shape_symmetries(_obj(trimesh.creation.cylinder(0.03, 0.1, sections=64), "cyl")))
    assert len(cyl) == 47 and cyl.count(180) >= 2  # turns and upside-down flips
    body = trimesh.creation.cylinder(0.04, 0.1, sections=64)
    handle = trimesh.creation.box((0.02, 0.01, 0.06)).apply_translation((0.05, 0.0, 0.0))
    mug = shape_symmetries(_obj(trimesh.util.concatenate([body, handle]), "mug"))
    assert _angles(mug) == [180]  # only the flip that keeps the handle where it is


def _scene(obj: OnboardedObject, T: np.ndarray) -> tuple[Observation, SegmentationResult]:
    """``obj`` rendered at ``T`` on a grey background 0.8 m away, and its true mask as the stage-1 result."""
    from osop_ros.core.render import Renderer

    with Renderer() as r:
        r.add_object("m", obj.model)
        out = r.render(CAM.K, CAM.width, CAM.height, [("m", T)])
    obs = Observation(np.where(out.mask[..., None], out.rgb, np.uint8(90)), CAM,
                      np.where(out.mask, out.depth, 0.8).astype(np.float32))
    return obs, SegmentationResult(out.mask, out.mask.astype(np.float32), mask_to_box(out.mask), 0.9)


@pytest.fixture(scope="module")
def verifier():
    v = Verifier()
    yield v
    v.release()


def _two_tone_can(trimesh, uniform: bool = False):
    m = trimesh.creation.cylinder(0.03, 0.1, sections=72)
    v = np.asarray(m.vertices)
    red = (np.arctan2(v[:, 1], v[:, 0]) > 0) & (v[:, 2] > -0.02)
    col = np.where(red[:, None], [200, 40, 30, 255], [30, 60, 200, 255]).astype(np.uint8)
    if uniform:
        col[:] = [120, 120, 120, 255]
    m.visual.vertex_colors = col
    return m


@pytest.mark.gl
@pytest.mark.parametrize("turn_deg", [90.0, 180.0])
def test_colour_search_turns_a_labelled_can_back(verifier, turn_deg):
    trimesh = pytest.importorskip("trimesh")

    obj = _obj(_two_tone_can(trimesh), "can")
    T = make_T(rotation_about_axis(np.array([1.0, 0.2, 0.1]), 1.1), np.array([0.0, 0.0, 0.45]))
    obs, seg = _scene(obj, T)
    centre, axes = surface_axes(obj.model)
    S = make_T(rotation_about_axis(axes[0], np.radians(turn_deg)), np.zeros(3))
    S[:3, 3] = centre - S[:3, :3] @ centre
    wrong = T @ S  # same depth and silhouette, colours turned away
    choice = ColourSymmetrySearch(verifier)(obs, seg, obj, wrong)
    assert choice.switched and choice.gain > 0.3
    assert rotation_angle_deg(choice.T_cam_obj[:3, :3], T[:3, :3]) < 10.0
    # the right pose is kept
    keep = ColourSymmetrySearch(verifier)(obs, seg, obj, T)
    assert not keep.switched and np.allclose(keep.T_cam_obj, T)


@pytest.mark.gl
def test_colour_search_keeps_an_untextured_pose(verifier):
    trimesh = pytest.importorskip("trimesh")

    obj = _obj(_two_tone_can(trimesh, uniform=True), "grey_can")
    T = make_T(rotation_about_axis(np.array([1.0, 0.2, 0.1]), 1.1), np.array([0.0, 0.0, 0.45]))
    obs, seg = _scene(obj, T)
    T_in = T @ shape_symmetries(obj)[5]
    choice = ColourSymmetrySearch(verifier)(obs, seg, obj, T_in)
    assert not choice.switched and np.allclose(choice.T_cam_obj, T_in)


class _TwinStages:
    """Stages 1-4 stubs: the given mask, and a solver that returns ``T_wrong`` (the right pose's twin)."""

    def __init__(self, seg: SegmentationResult, T_wrong: np.ndarray) -> None:
        self.seg, self.T = seg, T_wrong

    def segment(self, obs, obj):
        return [self.seg]

    def match(self, obs, seg, obj):
        from osop_ros.core.types import MatchResult

        return MatchResult(np.array([0]), np.array([0.8], np.float32), np.zeros(1, np.float32))

    def correspond(self, obs, seg, match, obj):
        from osop_ros.core.types import Correspondences

        return [Correspondences(np.zeros((0, 2)), np.zeros((0, 3)), np.zeros(0, np.float32))]

    def __call__(self, obs, seg, corrs, obj):
        from osop_ros.core.types import PoseHypothesis

        return [PoseHypothesis(self.T.copy(), 0.9, 10, {"corr_set": 0})]


@pytest.mark.gl
def test_pipeline_symmetry_search_from_config(verifier):
    trimesh = pytest.importorskip("trimesh")
    from osop_ros.core.config import load_config
    from osop_ros.core.pipeline import Pipeline

    obj = _obj(_two_tone_can(trimesh), "can")
    T = make_T(rotation_about_axis(np.array([0.3, 1.0, 0.2]), 0.9), np.array([0.01, 0.0, 0.5]))
    obs, seg = _scene(obj, T)
    st = _TwinStages(seg, T @ shape_symmetries(obj)[20])
    pipe = Pipeline([obj], st.segment, st.match, st.correspond, st)
    pipe.config = load_config({"pipeline": {"calibration": "none", "depth_seg": False, "symmetry_search": False}})
    assert pipe.symmetry_search is None
    e0 = pipe(obs)[0]
    assert "symmetry_search" not in e0.diagnostics and np.allclose(e0.T_cam_obj, st.T)
    pipe.verifier.release()
    pipe.config = load_config({"pipeline": {"calibration": "none", "depth_seg": False}})  # on by default
    try:
        e = pipe(obs)[0]
        d = e.diagnostics["symmetry_search"]
        assert d["switched"] and d["candidates"] == 47 and d["gain"] > 0.3
        assert rotation_angle_deg(e.R, T[:3, :3]) < 10.0 and "symmetry" in e.timings
        assert e.diagnostics["score_raw"] > e0.diagnostics["score_raw"]  # re-verified at the chosen pose
    finally:
        pipe.verifier.release()


def _tapered_banded_can(trimesh):
    """A can 10 % narrower at the top, red above its middle and blue below: not symmetric upside down."""
    m = trimesh.creation.cylinder(0.03, 0.1, sections=72)
    v = np.asarray(m.vertices).copy()
    top = v[:, 2] > 0
    v[top, :2] *= 0.9
    m.vertices = v
    m.visual.vertex_colors = np.where(top[:, None], [200, 40, 30, 255], [30, 60, 200, 255]).astype(np.uint8)
    return m


def test_near_symmetries_of_a_tapered_can():
    trimesh = pytest.importorskip("trimesh")
    from osop_ros.core.symmetry import SymmetrySearchConfig, approximate_symmetries

    obj = _obj(_tapered_banded_can(trimesh), "tapered")
    exact = _angles(shape_symmetries(obj))
    assert len(exact) == 23 and 180 in exact  # turns about the axis only
    cfg = SymmetrySearchConfig(approx_tol_frac=0.06)
    near = approximate_symmetries(obj, cfg)
    assert len(near) >= 20 and _angles(near).count(180) >= 2  # the upside-down twins
    assert approximate_symmetries(obj, SymmetrySearchConfig()) == []  # off by default in the dataclass


@pytest.mark.gl
def test_colour_search_rights_an_upside_down_tapered_can(verifier):
    trimesh = pytest.importorskip("trimesh")
    from osop_ros.core.symmetry import SymmetrySearchConfig, approximate_symmetries

    obj = _obj(_tapered_banded_can(trimesh), "tapered")
    T = make_T(rotation_about_axis(np.array([1.0, 0.2, 0.1]), 1.1), np.array([0.0, 0.0, 0.45]))
    obs, seg = _scene(obj, T)
    cfg = SymmetrySearchConfig(approx_tol_frac=0.06)
    flips = [S for S in approximate_symmetries(obj, cfg) if round(rotation_angle_deg(S[:3, :3], np.eye(3))) == 180]
    upside_down = T @ flips[0]
    assert not ColourSymmetrySearch(verifier)(obs, seg, obj, upside_down).switched  # exact twins only: stuck
    choice = ColourSymmetrySearch(verifier, cfg)(obs, seg, obj, upside_down)
    assert choice.switched and choice.approximate and choice.gain > 0.3
    # right side up again (the turn about the axis is free: both halves are one colour all round)
    up = T[:3, :3] @ surface_axes(obj.model)[1][0]
    assert float(up @ (choice.T_cam_obj[:3, :3] @ surface_axes(obj.model)[1][0])) > 0.98
