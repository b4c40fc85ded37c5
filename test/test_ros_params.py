"""Node parameters, config/osop.yaml, config/osop.rviz, output message builders (no DDS)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import yaml

pytest.importorskip("rclpy", reason="rclpy not installed")

import ros_fixtures as F  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from std_msgs.msg import Header  # noqa: E402
from visualization_msgs.msg import Marker  # noqa: E402

from osop_ros.core.config import PACKAGE_ROOT, load_config  # noqa: E402
from osop_ros.core.types import PoseEstimate  # noqa: E402
from osop_ros.ros import outputs  # noqa: E402
from osop_ros.ros.conversions import msg_to_T  # noqa: E402
from osop_ros.ros.node import CorePipelineAdapter, load_factory  # noqa: E402
from osop_ros.ros.params import (  # noqa: E402
    NODE_PARAMS,
    ObjectSpec,
    ParameterError,
    core_config,
    core_param_specs,
    object_param_specs,
    object_spec_from_values,
    symmetries_dict,
    validate_values,
)

REPO = Path(__file__).resolve().parents[1]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def default_values() -> dict[str, Any]:
    vals = {s.name: (None if isinstance(s.default, Parameter.Type) else s.default) for s in NODE_PARAMS}
    vals.update({s.name: s.default for s in core_param_specs()})
    return vals


def test_osop_yaml_only_uses_declared_parameters_with_matching_types() -> None:
    data = yaml.safe_load((REPO / "config" / "osop.yaml").read_text())
    (key,) = data
    assert key.endswith("osop_node")
    params = flatten(data[key]["ros__parameters"])
    specs = {s.name: s for s in (*NODE_PARAMS, *core_param_specs())}
    for name in params["objects.names"]:
        specs.update({s.name: s for s in object_param_specs(name)})
    for name, value in params.items():
        assert name in specs, f"config/osop.yaml sets undeclared parameter {name}"
        default = specs[name].default
        if not isinstance(default, Parameter.Type):
            assert type(value) is type(default), f"{name}: {type(value).__name__} vs {type(default).__name__}"
    vals = default_values()
    vals.update(params)
    assert validate_values(vals) == []
    spec = object_spec_from_values(vals, "objects.example_object.", "example_object")
    assert spec.validate() == [] and spec.mesh_path.is_file(), "default object mesh must ship with the package"


def test_core_config_round_trips_through_load_config() -> None:
    vals = default_values()
    vals.update({"device": "cpu", "pipeline.score_threshold": 0.5, "templates.crop_size": 32})
    cfg = load_config(core_config(vals))
    assert cfg.device == "cpu" and cfg.pipeline.score_threshold == 0.5 and cfg.templates.crop_size == 32
    assert cfg.objects == []


def test_every_core_option_is_a_parameter() -> None:
    names = {s.name for s in core_param_specs()}
    assert {"pipeline.score_threshold", "weights.segment", "templates.cache_dir", "pipeline.modality"} <= names
    live = [s.name for s in core_param_specs() if not s.read_only]
    assert live == ["pipeline.score_threshold"]


def test_descriptors_have_descriptions_and_ranges() -> None:
    for s in (*NODE_PARAMS, *core_param_specs()):
        d = s.descriptor()
        assert d.description, s.name
    d = next(s for s in core_param_specs() if s.name == "pipeline.score_threshold").descriptor()
    assert (d.floating_point_range[0].from_value, d.floating_point_range[0].to_value) == (0.0, 1.0)
    d = next(s for s in NODE_PARAMS if s.name == "qos.depth").descriptor()
    assert d.read_only and d.integer_range[0].from_value == 1


def test_validate_values_reports_every_problem() -> None:
    vals = default_values()
    vals.update({"device": "gpu", "qos.reliability": "maybe", "max_image_side": 8, "min_image_side": 16,
                 "use_depth": False, "pipeline.modality": "rgbd", "pipeline_factory": "not a ref",
                 "objects.names": ["a", "a"]})
    errs = "\n".join(validate_values(vals))
    for words in ("device must be", "qos.reliability", "max_image_side", "use_depth is false", "pipeline_factory",
                  "unique"):
        assert words in errs


def test_symmetries_from_flat_lists() -> None:
    assert symmetries_dict(None, None, None, "x") == {}
    s = symmetries_dict([0.0, 0.0, 1.0], None, list(np.eye(4).ravel()), "o")
    assert s == {"continuous": [{"axis": [0.0, 0.0, 1.0], "offset": [0.0, 0.0, 0.0]}],
                 "discrete": [list(np.eye(4).ravel())]}
    for bad in (([0.0, 1.0], None, None), ([0.0, 0.0, 0.0], None, None), ([0.0, 0.0, 1.0], [1.0], None),
                (None, None, [1.0] * 15)):
        with pytest.raises(ParameterError):
            symmetries_dict(*bad, "o")


def test_object_spec_resolution_and_validation() -> None:
    spec = ObjectSpec("example_object", "package://osop_ros/assets/example_object.ply", "m", 1)
    assert spec.mesh_path == PACKAGE_ROOT / "assets" / "example_object.ply"
    core = spec.to_core()
    assert core["mesh"] == str(spec.mesh_path) and core["obj_id"] == 1
    assert "topic name" in ObjectSpec("my-object", "m.ply").validate()[0]
    errs = ObjectSpec("ok", "", "inch").validate()
    assert errs == ["object ok: mesh path is empty", "object ok: units must be one of ('mm', 'm', 'auto'), got 'inch'"]


def test_load_factory() -> None:
    assert load_factory("ros_fixtures:blob_factory") is F.blob_factory
    with pytest.raises(ParameterError, match="cannot be imported"):
        load_factory("ros_fixtures:nope")


def test_core_pipeline_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default factory's adapter onboards with the pipeline's config + networks and registers the object."""
    import osop_ros.core.factory as factory

    seen = {}

    def fake_onboard(obj_cfg: Any, cfg: Any, nets: Any) -> SimpleNamespace:
        seen.update(obj=obj_cfg, cfg=cfg, nets=nets)
        return SimpleNamespace(name=obj_cfg.name, model=None)

    monkeypatch.setattr(factory, "onboard_object", fake_onboard)
    added = []
    pipe = SimpleNamespace(config="CFG", networks="NETS", add_object=added.append)
    adapter = CorePipelineAdapter(pipe)
    obj = adapter.add_object({"name": "mug", "mesh": "/m.ply", "units": "mm", "obj_id": 3, "symmetries": {}})
    assert added == [obj] and seen["cfg"] == "CFG" and seen["nets"] == "NETS"
    assert (seen["obj"].name, seen["obj"].units, seen["obj"].obj_id) == ("mug", "mm", 3)


# ----------------------------------------------------------------------------------- output builders
HEADER = Header(frame_id="cam")


def est(name: str, t: tuple[float, float, float] = (0.1, 0.2, 0.9), score: float = 0.8) -> PoseEstimate:
    return PoseEstimate(name, _T(t), score)


def _T(t: tuple[float, float, float]) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = F.R_TEST
    T[:3, 3] = t
    return T


def test_object_visual_from_model(tmp_path: Path) -> None:
    mesh = tmp_path / "cube.obj"
    mesh.write_text(F.cube_obj_text())
    vis = outputs.object_visual("cube", 2, mesh, "mm", F.cube_model(), max_triangles=5)
    assert vis.mesh_uri == mesh.resolve().as_uri() and vis.mesh_scale == 0.001
    assert vis.triangles.shape == (15, 3)  # decimated to 5 faces
    np.testing.assert_allclose(vis.size, [0.05] * 3)
    assert vis.color == outputs.PALETTE[2]
    auto = outputs.object_visual("cube", 0, mesh, "auto", None)
    assert auto.mesh_scale is None and auto.triangles is None


def test_marker_array_mesh_triangles_and_labels(tmp_path: Path) -> None:
    mesh = tmp_path / "cube.obj"
    mesh.write_text(F.cube_obj_text())
    visuals = {"a": outputs.object_visual("a", 0, mesh, "mm", F.cube_model()),
               "b": outputs.object_visual("b", 1, mesh, "auto", F.cube_model())}
    arr = outputs.marker_array(HEADER, [est("a"), est("b", score=0.55)], visuals)
    types_ = [m.type for m in arr.markers[1:]]
    assert arr.markers[0].action == Marker.DELETEALL
    assert types_ == [Marker.MESH_RESOURCE, Marker.TEXT_VIEW_FACING, Marker.TRIANGLE_LIST, Marker.TEXT_VIEW_FACING]
    m = arr.markers[1]
    assert m.scale.x == 0.001 and m.mesh_resource.startswith("file://")
    np.testing.assert_allclose(msg_to_T(m.pose), _T((0.1, 0.2, 0.9)), atol=1e-12)
    assert arr.markers[4].text == "b 0.55" and len(arr.markers[3].points) == 36
    assert len({(m.ns, m.id) for m in arr.markers[1:]}) == 4
    tri_only = outputs.marker_array(HEADER, [est("a")], visuals, mode="triangles")
    assert tri_only.markers[1].type == Marker.TRIANGLE_LIST


def test_transforms_name_instances() -> None:
    tfs = outputs.transforms(HEADER, [est("a"), est("a", (0.0, 0.0, 1.0)), est("b")], prefix="osop/")
    assert [t.child_frame_id for t in tfs] == ["osop/a", "osop/a_1", "osop/b"]
    assert tfs[1].transform.translation.z == 1.0 and tfs[0].header.frame_id == "cam"


def test_detection_array_with_vision_msgs_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """vision_msgs is optional: check the builder against its (>= 3.0) message layout with stand-ins."""
    from geometry_msgs.msg import Pose, Vector3

    def ns(**kw: Any) -> SimpleNamespace:
        return SimpleNamespace(**kw)

    vm = types.SimpleNamespace(
        Detection3DArray=lambda: ns(header=None, detections=[]),
        Detection3D=lambda: ns(header=None, id="", results=[], bbox=ns(center=Pose(), size=Vector3())),
        ObjectHypothesisWithPose=lambda: ns(hypothesis=ns(class_id="", score=0.0), pose=ns(pose=Pose())),
    )
    vis = {"a": outputs.object_visual("a", 0, None, "m", F.cube_model())}
    arr = outputs.detection_array(vm, HEADER, [est("a")], vis)
    (det,) = arr.detections
    assert det.results[0].hypothesis.class_id == "a" and det.results[0].hypothesis.score == pytest.approx(0.8)
    assert det.bbox.size.x == pytest.approx(0.05)
    np.testing.assert_allclose(msg_to_T(det.results[0].pose.pose)[:3, 3], [0.1, 0.2, 0.9])


def test_overlay_draws_contour_and_axes() -> None:
    rgb, _ = F.make_arrays()
    vis = {"cube": outputs.object_visual("cube", 0, None, "m", F.cube_model())}
    out = outputs.overlay_image(rgb, F.CAM.K, [PoseEstimate("cube", F.expected_T(40, 20, 0.8), 0.9)], vis)
    assert out.shape == rgb.shape and out.dtype == np.uint8
    assert (out != rgb).any(axis=2).sum() > 20
    np.testing.assert_array_equal(outputs.overlay_image(rgb, F.CAM.K, [], vis), rgb)


def test_rviz_config_shows_image_overlay_markers_tf() -> None:
    cfg = yaml.safe_load((REPO / "config" / "osop.rviz").read_text())
    displays = cfg["Visualization Manager"]["Displays"]
    by_class = {}
    for d in displays:
        by_class.setdefault(d["Class"], []).append(d)
    assert "rviz_default_plugins/TF" in by_class
    assert by_class["rviz_default_plugins/MarkerArray"][0]["Topic"]["Value"] == "/osop_node/markers"
    topics = {d["Topic"]["Value"] for d in by_class["rviz_default_plugins/Image"]}
    assert topics == {"/osop/camera_image", "/osop_node/overlay"}


def test_launch_file_compiles_and_declares_arguments() -> None:
    src = (REPO / "launch" / "osop.launch.py").read_text()
    compile(src, "osop.launch.py", "exec")
    for arg in ("config_file", "device", "namespace", "rgb_topic", "depth_topic", "camera_info_topic", "rviz"):
        assert f'DeclareLaunchArgument("{arg}"' in src


def test_launch_description_generates_when_launch_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("launch_ros", reason="launch/launch_ros not installed (PyPI ROS wheels)")
    import importlib.util

    import ament_index_python.packages as aip

    monkeypatch.setattr(aip, "get_package_share_directory", lambda pkg: str(REPO))
    spec = importlib.util.spec_from_file_location("osop_launch", REPO / "launch" / "osop.launch.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "osop_launch", mod)
    spec.loader.exec_module(mod)
    ld = mod.generate_launch_description()
    names = {a.name for a in ld.get_launch_arguments()}
    assert {"config_file", "device", "namespace", "rgb_topic", "depth_topic", "camera_info_topic", "rviz"} <= names


# ----------------------------------------------------------------------------------- packaging (issue 13.4, 13.9)
PY_KEY_MODULES = {"python3-opencv": "cv2", "python3-yaml": "yaml", "python3-numpy": "numpy",
                  "python3-scipy": "scipy", "python3-tqdm": "tqdm", "python3-trimesh": "trimesh",
                  "python3-psutil": "psutil", "python3-pytest": "pytest"}


def imported_top_level_modules(*roots: Path) -> set[str]:
    import ast

    mods: set[str] = set()
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    mods.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    mods.add(node.module.split(".")[0])
    return mods


def package_xml() -> tuple[dict[str, list[str]], set[str]]:
    """{tag: [names]} of the dependencies and the names documented as optional (``optional: a, b`` comments)."""
    import re
    import xml.etree.ElementTree as ET

    text = (REPO / "package.xml").read_text()
    root = ET.fromstring(text)
    deps: dict[str, list[str]] = {}
    for el in root:
        if el.tag.endswith("depend"):
            deps.setdefault(el.tag, []).append(el.text.strip())
    optional: set[str] = set()
    for comment in re.findall(r"<!--(.*?)-->", text, re.S):
        for m in re.finditer(r"optional:\s*([\w\s,]+)", comment):
            optional.update(n.strip() for n in m.group(1).split(",") if n.strip())
    return deps, optional


def is_ros_python_package(name: str) -> bool:
    return name in ("rclpy", "launch", "launch_ros", "ament_index_python", "tf2_ros", "message_filters",
                    "cv_bridge", "launch_testing") or name.endswith(("_msgs", "_srvs", "_interfaces"))


def test_package_xml_exec_depends_match_the_imports() -> None:
    """Issue 13.9: every declared exec_depend is imported by osop_ros/ or launch/, or documented optional;
    every ROS package imported there is declared; cv_bridge (never imported) is not declared."""
    deps, optional = package_xml()
    exec_deps = deps["exec_depend"]
    imported = imported_top_level_modules(REPO / "osop_ros", REPO / "launch" / "osop.launch.py")
    assert optional == {"rviz2"}
    for dep in exec_deps:
        module = PY_KEY_MODULES.get(dep, dep)
        assert module in imported or dep in optional, f"package.xml declares {dep} but nothing imports {module}"
    assert "cv_bridge" not in exec_deps
    missing = {m for m in imported if is_ros_python_package(m)} - set(exec_deps)
    assert missing == set(), f"imported but not declared in package.xml: {missing}"
    assert set(deps["test_depend"]) <= {"launch_testing", "python3-pytest"}
    readme = (REPO / "README.md").read_text()
    assert "cv_bridge is not used" in readme  # and why


def load_launch_module(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    import importlib.util

    spec = importlib.util.spec_from_file_location("osop_launch_t", REPO / "launch" / "osop.launch.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "osop_launch_t", mod)
    spec.loader.exec_module(mod)  # must work without launch / launch_ros
    return mod


def test_launch_rviz_check(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Issue 13.9: rviz:=true without rviz2 installed adds a message instead of the rviz node."""
    import shutil

    import ament_index_python.packages as aip

    mod = load_launch_module(monkeypatch)

    def no_package(name: str) -> str:
        raise aip.PackageNotFoundError(name)

    monkeypatch.setattr(aip, "get_package_prefix", no_package)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert mod.find_rviz2() == (None, None)
    assert "rviz2 is not installed" in mod.RVIZ_MISSING and "without rviz" in mod.RVIZ_MISSING
    monkeypatch.setattr(shutil, "which", lambda name: "/opt/bin/rviz2")
    assert mod.find_rviz2() == (None, "/opt/bin/rviz2")
    exe = tmp_path / "lib" / "rviz2" / "rviz2"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setattr(aip, "get_package_prefix", lambda name: str(tmp_path))
    assert mod.find_rviz2() == ("rviz2", "rviz2")


def test_launch_without_rviz2_keeps_osop_node(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("launch_ros", reason="launch/launch_ros not installed (PyPI ROS wheels)")
    import ament_index_python.packages as aip
    from launch.actions import LogInfo
    from launch.launch_context import LaunchContext

    monkeypatch.setattr(aip, "get_package_share_directory", lambda pkg: str(REPO))
    mod = load_launch_module(monkeypatch)
    monkeypatch.setattr(mod, "find_rviz2", lambda: (None, None))
    ctx = LaunchContext()
    ctx.launch_configurations.update({
        "config_file": str(REPO / "config" / "osop.yaml"), "device": "", "namespace": "", "rgb_topic": "/c/rgb",
        "depth_topic": "/c/depth", "camera_info_topic": "/c/info", "use_depth": "", "qos_reliability": "reliable",
        "rviz": "true", "fixed_frame": "cam", "log_level": "info"})
    actions = mod._nodes(ctx)
    assert len(actions) == 2 and isinstance(actions[1], LogInfo)


def test_setup_py_declares_the_pytest_test_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13.4: colcon's python test step runs pytest when pytest is a declared test dependency; setuptools
    ignores ``tests_require``, the ament_python convention is ``extras_require={'test': ['pytest']}``."""
    import runpy

    import setuptools

    seen: dict[str, Any] = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    assert "pytest" in seen["extras_require"]["test"]
    assert "tests_require" not in seen


def test_launch_test_module_finds_its_fixtures_without_pytest_sys_path() -> None:
    """Issue 13.4: ``launch_test test/test_ros_launch.py`` imports the file by path, without test/ on sys.path."""
    import subprocess

    code = (
        "import importlib.util, sys\n"
        "assert not any(p.rstrip('/').endswith('test') for p in sys.path)\n"
        f"spec = importlib.util.spec_from_file_location('launch_t', {str(REPO / 'test' / 'test_ros_launch.py')!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "try:\n"
        "    spec.loader.exec_module(mod)\n"
        "except BaseException as exc:\n"
        "    if type(exc).__name__ != 'Skipped':\n"  # launch_testing missing here: skipped after the fixtures
        "        raise\n"
        "assert 'ros_fixtures' in sys.modules and hasattr(mod, 'F'), 'fixtures not imported'\n"
        "print('fixtures ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "fixtures ok" in res.stdout, res.stdout + res.stderr
