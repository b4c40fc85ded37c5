"""Pipeline chaining, modality handling and ICP tracking with fallback (stub stages + real renderer/ICP)."""

from __future__ import annotations

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

pytestmark = pytest.mark.gl
CAM = CameraIntrinsics(500.0, 500.0, 159.5, 119.5, 320, 240)


class Stub:
    """Segmenter/matcher/correspondence/solver stand-ins that count calls; the solver returns ``T``."""

    def __init__(self, T: np.ndarray) -> None:
        self.T = T
        self.calls = {"segment": 0, "solve": 0}

    def segment(self, obs, obj):
        self.calls["segment"] += 1
        m = obs.depth > 0 if obs.depth is not None else np.ones(obs.rgb.shape[:2], bool)
        return [SegmentationResult(m, m.astype(np.float32), mask_to_box(m), 1.0)]

    def match(self, obs, seg, obj):
        return MatchResult(np.array([0]), np.array([1.0], np.float32), np.zeros(1, np.float32))

    def correspond(self, obs, seg, match, obj):
        return [Correspondences(np.zeros((0, 2)), np.zeros((0, 3)), np.zeros(0, np.float32))]

    def solve(self, obs, seg, corrs, obj):
        self.calls["solve"] += 1
        return [PoseHypothesis(self.T.copy(), 0.9, 100)]


@pytest.fixture(scope="module")
def scene():
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer
    from osop_ros.data.example import EXAMPLE_PATH

    model = ObjectModel.load(EXAMPLE_PATH, units="m", name="example")
    T = make_T(rotation_about_axis(np.array([1.0, 0.5, 0.2]), 0.8), np.array([0.01, -0.02, 0.5]))
    with Renderer() as r:
        r.add_object("m", model)
        out = r.render(CAM.K, CAM.width, CAM.height, [("m", T)])
    obj = OnboardedObject("example", model, bank=None, sym_Ts=[np.eye(4)])  # type: ignore[arg-type]
    return model, T, out, obj


def _pipe(stub: Stub, obj, **kw) -> Pipeline:
    return Pipeline([obj], stub.segment, stub.match, stub.correspond, stub.solve, **kw)


def test_modality_rgb_drops_depth_and_rgbd_requires_it(scene) -> None:
    _, T, out, obj = scene
    stub = Stub(T)
    seen = []
    pipe = _pipe(stub, obj, modality="rgb")
    pipe.correspondence = lambda obs, seg, m, o: seen.append(obs.depth) or stub.correspond(obs, seg, m, o)
    pipe(Observation(out.rgb, CAM, out.depth))
    assert seen == [None]
    with pytest.raises(InvalidInputError, match="no depth"):
        _pipe(stub, obj, modality="rgbd")(Observation(out.rgb, CAM, None))
    with pytest.raises(InvalidInputError):
        _pipe(stub, obj, modality="depth")


def test_rgb_segmenter_runs_only_on_frames_without_depth(scene) -> None:
    _, T, out, obj = scene
    stub, rgb_calls = Stub(T), []

    def rgb_segment(obs, o):
        rgb_calls.append(obs.depth)
        m = np.ones(obs.rgb.shape[:2], bool)
        return [SegmentationResult(m, m.astype(np.float32), mask_to_box(m), 1.0)]

    pipe = _pipe(stub, obj, rgb_segmenter=rgb_segment)
    pipe(Observation(out.rgb, CAM, out.depth))
    assert (stub.calls["segment"], rgb_calls) == (1, [])
    pipe(Observation(out.rgb, CAM, None))
    assert (stub.calls["segment"], rgb_calls) == (1, [None])
    pipe.modality = "rgb"  # depth dropped by the modality: the RGB stage 1 too
    pipe(Observation(out.rgb, CAM, out.depth))
    assert (stub.calls["segment"], rgb_calls) == (1, [None, None])


def test_tracking_refines_previous_pose_and_falls_back(scene) -> None:
    from osop_ros.core.tracking import IcpTracker

    model, T_gt, out, obj = scene
    # the full pipeline returns a pose 3 deg / 6 mm off; tracking must pull the next frames onto the GT
    T_off = make_T(
        rotation_about_axis(np.array([0.0, 1.0, 0.0]), np.radians(3.0)) @ T_gt[:3, :3],
        T_gt[:3, 3] + np.array([0.004, -0.003, 0.003]),
    )
    stub = Stub(T_off)
    pipe = _pipe(stub, obj, tracker=IcpTracker())
    obs = Observation(out.rgb, CAM, out.depth)
    first = pipe(obs)[0]
    assert stub.calls["segment"] == 1 and not first.diagnostics.get("tracked")
    second = pipe(obs)[0]
    assert stub.calls["segment"] == 1, "tracking should have skipped the four stages"
    assert second.diagnostics["tracked"] and second.score >= 0.6
    assert rotation_angle_deg(second.R, T_gt[:3, :3]) < 1.0
    assert np.linalg.norm(second.t - T_gt[:3, 3]) < 0.002
    # object gone (empty depth): tracking fails -> full pipeline runs again
    empty = Observation(out.rgb, CAM, np.zeros_like(out.depth))
    pipe(empty)
    assert stub.calls["segment"] == 2
    pipe(obs)  # tracked again from the pose the full pipeline just returned
    assert stub.calls["segment"] == 2
    pipe(Observation(out.rgb, CAM, None))  # without depth the tracker cannot run
    assert stub.calls["segment"] == 3
