"""The RGB distance search along the viewing ray: grid, geometry, config wiring (the rendered-scene tests are in
test_verify.py, beside the verifier's scene)."""

from __future__ import annotations

import numpy as np
import pytest

from osop_ros.core.config import load_config
from osop_ros.core.geometry import make_T, project_points, rotation_about_axis, transform_points
from osop_ros.core.scale_search import RgbScaleSearch, ScaleSearchConfig, along_ray
from osop_ros.core.types import CameraIntrinsics, InvalidInputError

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


def test_pipeline_wiring_contour_refine() -> None:
    """``pipeline.rgb_contour_refine`` (on by default) builds the refinement on the pipeline's verifier."""
    from osop_ros.core.contour_refine import RgbContourRefine
    from osop_ros.core.pipeline import Pipeline

    pipe = Pipeline([], None, None, None, None)  # type: ignore[arg-type]
    pipe.config = load_config({})
    try:
        assert isinstance(pipe.contour_refine, RgbContourRefine) and pipe.contour_refine.verifier is pipe.verifier
        assert pipe.contour_refine.config.dof == "full"
        pipe.config = load_config({"pipeline": {"rgb_contour_refine": False}})
        assert pipe.contour_refine is None
        pipe.config = load_config({"pipeline": {"verify": False}})
        assert pipe.contour_refine is None
    finally:
        if pipe.verifier is not None:
            pipe.verifier.release()
