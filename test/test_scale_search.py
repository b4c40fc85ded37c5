"""The RGB distance search along the viewing ray (real renderer and verifier, synthetic scene)."""

from __future__ import annotations

import numpy as np
import pytest

from osop_ros.core.config import load_config
from osop_ros.core.geometry import make_T, mask_to_box, project_points, rotation_about_axis, transform_points
from osop_ros.core.scale_search import RgbScaleSearch, ScaleSearchConfig, along_ray
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import CameraIntrinsics, InvalidInputError, Observation, SegmentationResult

CAM = CameraIntrinsics(500.0, 500.0, 159.5, 119.5, 320, 240)


def test_config_grid_and_validation() -> None:
    """Log-spaced factors within [1 / (1 + r), 1 + r], 1.0 always among them; bad settings are refused."""
    s = ScaleSearchConfig(0.2, 20).scales()
    assert np.any(s == 1.0) and np.all(np.diff(s) > 0)
    assert s[0] == pytest.approx(1 / 1.2) and s[-1] == pytest.approx(1.2)
    for bad in ({"max_frac": 0.0}, {"max_frac": 0.6}, {"steps": 2}):
        with pytest.raises(InvalidInputError):
            ScaleSearchConfig(**bad)
    with pytest.raises(InvalidInputError, match="rgb_scale_search"):
        load_config({"pipeline": {"rgb_scale_search": 0.7}})


def test_along_ray_keeps_rotation_and_image_position() -> None:
    """The model centre moves from c to s c: same rotation, same pixel, distance x s."""
    T = make_T(rotation_about_axis(np.array([0.3, 1.0, 0.1]), 0.7), np.array([0.05, -0.03, 0.6]))
    center = np.array([0.01, 0.02, -0.005])
    T2 = along_ray(T, center, 1.1)
    assert np.allclose(T2[:3, :3], T[:3, :3])
    c, c2 = transform_points(T, center[None])[0], transform_points(T2, center[None])[0]
    assert np.allclose(c2, 1.1 * c)
    assert np.allclose(project_points(CAM.K, T, center[None]), project_points(CAM.K, T2, center[None]))


@pytest.fixture(scope="module")
def scene():
    """The example object at 0.5 m in front of a textured background, RGB only, with its true mask."""
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
    seg = SegmentationResult(out.mask, out.mask.astype(np.float32), mask_to_box(out.mask), 0.9)
    obj = OnboardedObject("example", model, bank=None, sym_Ts=[np.eye(4)])  # type: ignore[arg-type]
    return dict(T=T, obs=Observation(rgb, CAM, None), seg=seg, obj=obj, center=np.asarray(model.center, float))


@pytest.mark.gl
@pytest.mark.parametrize("start", [1.12, 0.9])
def test_search_recovers_the_distance(scene, start: float) -> None:
    """A pose 12 % too far or 10 % too near along its ray is moved back to within 4 % of the true distance
    (the raw score's peak is flat to about +-2 % even here), and the verification score rises."""
    from osop_ros.core.verify import Verifier

    verifier = Verifier()
    try:
        T0 = along_ray(scene["T"], scene["center"], start)
        search = RgbScaleSearch(verifier, ScaleSearchConfig(0.2, 21))
        got = search(scene["obs"], scene["seg"], scene["obj"], T0)
        z_true = transform_points(scene["T"], scene["center"][None])[0, 2]
        z_got = transform_points(got.T_cam_obj, scene["center"][None])[0, 2]
        assert abs(z_got / z_true - 1) < 0.04
        assert got.verification.raw > verifier.verify(scene["obs"], scene["seg"], scene["obj"], T0, False).raw
        # the true pose stays where it is
        same = search(scene["obs"], scene["seg"], scene["obj"], scene["T"])
        assert abs(same.scale - 1.0) < 0.04
    finally:
        verifier.release()


def test_pipeline_wiring() -> None:
    """``pipeline.rgb_scale_search`` builds the search with verification, 0 or ``verify: false`` turn it off."""
    from osop_ros.core.pipeline import Pipeline

    pipe = Pipeline([], None, None, None, None)  # type: ignore[arg-type]
    pipe.config = load_config({"pipeline": {"rgb_scale_search": 0.15, "rgb_scale_steps": 11}})
    try:
        assert isinstance(pipe.scale_search, RgbScaleSearch) and pipe.scale_search.config.steps == 11
        assert pipe.scale_search.verifier is pipe.verifier
        pipe.config = load_config({"pipeline": {"rgb_scale_search": 0.0}})
        assert pipe.scale_search is None
        pipe.config = load_config({"pipeline": {"verify": False}})
        assert pipe.scale_search is None and pipe.verifier is None
    finally:
        if pipe.verifier is not None:
            pipe.verifier.release()
