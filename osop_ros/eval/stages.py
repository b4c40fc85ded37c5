"""Per-stage measurements of the learned networks on any BOP dataset (``osop eval-stages``).

Each stage is measured on its own, with ground truth for its inputs:
* stage 1: IoU of the predicted mask of the queried object with its visible GT mask (head: all pixels
  with probability >= 0.5, and separately the top-ranked component, the first candidate the pipeline
  verifies; proposals: the top proposal);
* stage 2: rotation error (symmetry-aware, after in-plane refinement) of the top-1 template, query
  crop framed on the GT visible mask; GT rotation corrected to an object-centred view;
* stage 3: 3D error of the predicted model coordinates at visible GT pixels, in % of the diameter,
  given the GT visible mask and the template nearest to the GT (oracle viewpoint).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from osop_ros.core.types import SegmentationResult

if TYPE_CHECKING:
    from osop_ros.core.stages import OnboardedObject

log = logging.getLogger(__name__)


@dataclass
class StageEvalOptions:
    """What to measure."""

    dataset: Path
    split: str = "test"
    objects: list[int] | None = None
    max_targets: int = 200
    min_visib: float = 0.1
    device: str = "auto"
    weights_dir: Path | None = None
    weights: dict[str, str] = field(default_factory=dict)  # stage -> file or training-free spec (wins)
    cache_dir: Path | None = None
    template_config: Any | None = None  # TemplateConfig; None = the default 2880-view bank
    seg_input_width: int = 320  # stage 1 runs at this image width (the pipeline's ``seg_input_width``)
    inplane: str = "query"  # stage 2 in-plane search: query | templates (see TemplateMatcher)
    absent_area_frac: float = 0.002  # an absent object's mask larger than this fraction = false positive
    absent_from: Path | None = None  # BOP dataset whose objects are also queried on every image (never in it)
    n_foreign: int = 8  # objects of ``absent_from`` onboarded (queried in turn)
    stage1_only: bool = False  # skip stages 2 and 3 (no descriptor banks to embed: much faster on new objects)
    segmenter: str = "head"  # stage 1: head (OSOP head, prob >= 0.5) | proposals (MobileSAM, core/proposals.py)
    seg_ranking: str | None = None  # head components' order (None = the pipeline default), see PipelineConfig
    proposal: Any | None = None  # ProposalConfig; None = its defaults


def evaluate_stages(opts: StageEvalOptions) -> dict:
    """Run the three learned stages on the dataset's targets; returns per-stage statistics."""
    from tqdm import tqdm

    from osop_ros.core.config import PipelineConfig, load_config
    from osop_ros.core.correspondence import DenseCorrespondence
    from osop_ros.core.factory import Networks
    from osop_ros.core.geometry import (
        mask_to_box,
        rotation_about_axis,
        rotation_error_sym_deg,
        symmetry_transforms,
    )
    from osop_ros.core.matching import TemplateMatcher
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer
    from osop_ros.core.segmentation import OneShotSegmenter
    from osop_ros.core.stages import OnboardedObject
    from osop_ros.core.templates import TemplateCache, TemplateConfig
    from osop_ros.data.bop import BopDataset
    from osop_ros.eval.oracle import OracleFrame, OracleMatcher

    weights = (
        {}
        if opts.weights_dir is None
        else {s: str(Path(opts.weights_dir) / f"{s}.pt") for s in ("segment", "match", "correspond")}
    )
    weights.update(opts.weights)
    nets = Networks.load(load_config({"device": opts.device, "weights": weights}))
    ds = BopDataset(opts.dataset, opts.split)
    targets = [t for t in ds.targets if opts.objects is None or t.obj_id in opts.objects]
    obj_ids = sorted({t.obj_id for t in targets})
    cache = TemplateCache(opts.cache_dir)
    renderer = Renderer()
    tcfg = opts.template_config or TemplateConfig()

    def onboard(d: BopDataset, oid: int, name: str) -> OnboardedObject:
        model = ObjectModel.load(d.model_path(oid), units="mm", name=name, symmetries=d.symmetries(oid))
        bank = cache.get_or_build(model, renderer, tcfg, progress=False)
        return OnboardedObject(model.name, model, bank, symmetry_transforms(model.symmetries), obj_id=oid)

    objects: dict[int, OnboardedObject] = {}
    keys = {}
    for oid in obj_ids:
        objects[oid] = onboard(ds, oid, f"obj_{oid:06d}")
        keys[oid] = f"eval{oid}"
        renderer.add_object(keys[oid], objects[oid].model)
    foreign: list[OnboardedObject] = []  # objects of another dataset: absent by construction
    if opts.absent_from is not None:
        fds = BopDataset(opts.absent_from, opts.split)
        foreign = [onboard(fds, oid, f"foreign_{oid:06d}") for oid in fds.obj_ids[: opts.n_foreign]]
    frame = OracleFrame(renderer, keys)
    matcher = TemplateMatcher(nets.matchnet, nets.device, top_k=1, inplane=opts.inplane)
    seg = OneShotSegmenter(nets.segnet, nets.device, input_width=opts.seg_input_width,
                           ranking=opts.seg_ranking or PipelineConfig().seg_ranking, ranker=matcher)
    if opts.segmenter not in ("head", "proposals"):
        raise ValueError(f"segmenter must be head|proposals, got {opts.segmenter!r}")
    proposer = None
    if opts.segmenter == "proposals":
        from osop_ros.core.proposals import ProposalConfig, ProposalSegmenter
        from osop_ros.nets.mobile_sam import MobileSAM

        pcfg = opts.proposal or ProposalConfig()
        sam = MobileSAM.from_package(pcfg.image_size).to(nets.device)
        proposer = ProposalSegmenter(seg, sam, matcher, pcfg, crop_size=tcfg.crop_size)

    def stage1(obs, obj: OnboardedObject) -> tuple[np.ndarray, np.ndarray, float | None]:  # noqa: ANN001
        """(H, W) bool masks of the stage-1 answer (head: prob >= 0.5) and of its top-ranked candidate, and
        the ranking score (proposals only)."""
        if proposer is None:
            r = seg(obs, obj)
            top = r[0].mask if r else np.zeros(obs.rgb.shape[:2], bool)
            return r[0].prob >= 0.5 if r else top, top, None
        r = proposer(obs, obj)
        if not r:
            return np.zeros(obs.rgb.shape[:2], bool), np.zeros(obs.rgb.shape[:2], bool), None
        return r[0].mask, r[0].mask, r[0].rank_score

    oracle_match = OracleMatcher(frame, top_k=1)
    corr = DenseCorrespondence(nets.corrnet, nets.device, mask_threshold=0.0)
    res: dict[str, list] = {
        "iou": [],
        "top_iou": [],
        "rot_err": [],
        "coord_err_pct": [],
        "coord_err_inst_pct": [],
        "coord_err_sym_inst_pct": [],  # per instance, under the best of the object's symmetries
        "coord_obj": [],
        "obj": [],
        "absent_fp": [],
        "foreign_fp": [],
        "rank_present": [],  # (ranking score, IoU) of the top proposal of present targets
        "rank_absent": [],  # ranking score of the top proposal of absent / foreign queries
    }
    t0 = time.time()
    n = 0
    by_image: dict[tuple[int, int], list] = {}
    for t in targets:
        by_image.setdefault((t.scene_id, t.im_id), []).append(t)
    for (sid, iid), tlist in tqdm(list(by_image.items()), desc="stages"):
        if n >= opts.max_targets:
            break
        obs = ds.load_observation(sid, iid, with_depth=False)
        gts = ds.gt(sid, iid)
        frame.set_frame([(g.obj_id, g.T_cam_obj) for g in gts])
        vis = frame.visible_masks(obs)
        # stage 1 "not here": query one dataset object that is not in this image
        absent = [o for o in obj_ids if o not in {g.obj_id for g in gts}]
        if absent and n < opts.max_targets:
            pa, _, ra = stage1(obs, objects[absent[(sid * 31 + iid) % len(absent)]])
            res["absent_fp"].append(float(pa.mean() > opts.absent_area_frac))
            if ra is not None:
                res["rank_absent"].append(ra)
        if foreign and n < opts.max_targets:  # an object of another dataset: certainly not here
            pf, _, rf = stage1(obs, foreign[len(res["foreign_fp"]) % len(foreign)])
            res["foreign_fp"].append(float(pf.mean() > opts.absent_area_frac))
            if rf is not None:
                res["rank_absent"].append(rf)
        for tg in tlist:
            obj = objects[tg.obj_id]
            for gi, g in enumerate(gts):
                if g.obj_id != tg.obj_id or g.visib_fract < opts.min_visib or vis[gi].sum() < 50:
                    continue
                if n >= opts.max_targets:
                    break
                n += 1
                # stage 1
                pm, top, rank = stage1(obs, obj)
                res["iou"].append(_iou(pm, vis[gi]))
                res["top_iou"].append(_iou(top, vis[gi]))
                if rank is not None:
                    res["rank_present"].append((rank, res["iou"][-1]))
                res["obj"].append(tg.obj_id)
                if opts.stage1_only:
                    continue
                # stage 2 on the GT mask
                gseg = SegmentationResult(
                    mask=vis[gi], prob=vis[gi].astype(np.float32), box=mask_to_box(vis[gi]), score=1.0
                )
                m = matcher(obs, gseg, obj)
                d = np.radians(float(m.inplane_deg[0]))
                R_est = rotation_about_axis(np.array([0.0, 0, 1]), d) @ obj.bank.poses[m.template_ids[0], :3, :3]
                R_gt = OracleMatcher.view_rotation(g.T_cam_obj, obj.model.center)
                res["rot_err"].append(rotation_error_sym_deg(R_est, R_gt, obj.sym_Ts))
                # stage 3 with the GT-nearest template
                om = oracle_match(obs, gseg, obj)
                cs = corr(obs, gseg, om, obj)[0]
                out = renderer.render(
                    obs.camera.K, obs.camera.width, obs.camera.height, [(keys[tg.obj_id], g.T_cam_obj)]
                )
                uv = np.round(cs.uv).astype(int)
                H, W = vis[gi].shape
                ok = (uv[:, 0] >= 0) & (uv[:, 0] < W) & (uv[:, 1] >= 0) & (uv[:, 1] < H)
                uv, pts = uv[ok], cs.pts_obj[ok]
                on = vis[gi][uv[:, 1], uv[:, 0]]
                if on.sum() > 0:
                    gt_xyz = out.xyz[uv[on, 1], uv[on, 0]]
                    e = np.linalg.norm(pts[on] - gt_xyz, axis=1) / obj.model.diameter * 100
                    res["coord_err_pct"].append(e)
                    res["coord_err_inst_pct"].append(float(np.median(e)))
                    res["coord_err_sym_inst_pct"].append(_symmetric_instance_error(pts[on], gt_xyz, obj))
                    res["coord_obj"].append(tg.obj_id)
    renderer.release()
    allc = np.concatenate(res["coord_err_pct"]) if res["coord_err_pct"] else np.array([np.nan])
    rot = np.array(res["rot_err"])
    iou = np.array(res["iou"])
    summary = {
        "dataset": str(opts.dataset),
        "n_instances": n,
        "stage1_mean_iou": round(float(iou.mean()), 4) if len(iou) else None,
        "stage1_iou_ge_0.5": round(float((iou >= 0.5).mean()), 4) if len(iou) else None,
        "stage1_top_mean_iou": round(float(np.mean(res["top_iou"])), 4) if res["top_iou"] else None,
        "stage1_top_iou_ge_0.5": round(float((np.array(res["top_iou"]) >= 0.5).mean()), 4) if res["top_iou"] else None,
        "stage1_absent_false_pos": round(float(np.mean(res["absent_fp"])), 4) if res["absent_fp"] else None,
        "stage1_n_absent_queries": len(res["absent_fp"]),
        "stage1_foreign_false_pos": round(float(np.mean(res["foreign_fp"])), 4) if res["foreign_fp"] else None,
        "stage1_n_foreign_queries": len(res["foreign_fp"]),
        "stage2_median_rot_err_deg": round(float(np.median(rot)), 2) if len(rot) else None,
        "stage2_within_15deg": round(float((rot < 15).mean()), 4) if len(rot) else None,
        "stage3_median_coord_err_pct_diam": round(float(np.median(allc)), 2) if res["coord_err_pct"] else None,
        "stage3_median_of_instance_medians_pct": round(float(np.median(res["coord_err_inst_pct"])), 2)
        if res["coord_err_inst_pct"]
        else None,
        "stage3_within_10pct": round(float((allc < 10).mean()), 4) if res["coord_err_pct"] else None,
        "stage3_median_of_instance_medians_sym_pct": round(float(np.median(res["coord_err_sym_inst_pct"])), 2)
        if res["coord_err_sym_inst_pct"]
        else None,
        "seconds": round(time.time() - t0, 1),
    }
    if res["rank_present"]:
        summary["stage1_min_score_sweep"] = min_score_sweep(res["rank_present"], res["rank_absent"])
    per_obj = {}
    for oid in obj_ids:
        idx = [i for i, o in enumerate(res["obj"]) if o == oid]
        if idx:
            per_obj[oid] = {
                "n": len(idx),
                "iou": round(float(iou[idx].mean()), 3),
                "rot_med": round(float(np.median(rot[idx])), 1) if len(rot) else None,
            }
            sym = [e for e, o in zip(res["coord_err_sym_inst_pct"], res["coord_obj"], strict=True) if o == oid]
            if sym:
                per_obj[oid]["coord_sym_med_pct"] = round(float(np.median(sym)), 2)
    summary["per_object"] = per_obj
    return summary


def _symmetric_instance_error(pts: np.ndarray, gt_xyz: np.ndarray, obj: OnboardedObject) -> float:
    """Median error (% of the diameter) of predicted model points (N, 3) against the true ones (N, 3), metres,
    under the symmetry S of the object that explains them best (points of a symmetric twin pose are as good)."""
    from osop_ros.core.geometry import transform_points

    best = min(
        float(np.median(np.linalg.norm(transform_points(np.asarray(S), pts) - gt_xyz, axis=1)))
        for S in obj.sym_Ts or [np.eye(4)]
    )
    return best / obj.model.diameter * 100


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two (H, W) bool masks (0 when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


def min_score_sweep(
    present: list[tuple[float, float]], absent: list[float], thresholds: tuple[float, ...] = ()
) -> list[dict[str, float]]:
    """What a ``min_score`` on the top proposal's ranking score would do, per threshold.

    present: (score, IoU) of the top proposal of each present target; absent: top scores of absent
    queries. Per threshold: share of absent queries still answered (false positives), share of
    present targets answered, and share answered with IoU >= 0.5.
    """
    p = np.array(present, dtype=np.float64).reshape(-1, 2)
    a = np.array(absent, dtype=np.float64)
    ths = thresholds or tuple(np.round(np.quantile(np.concatenate([p[:, 0], a]), np.linspace(0, 0.9, 10)), 3))
    out = []
    for t in ths:
        kept = p[:, 0] >= t
        out.append({
            "min_score": float(t),
            "absent_fp": round(float((a >= t).mean()), 4) if len(a) else float("nan"),
            "present_answered": round(float(kept.mean()), 4),
            "present_iou_ge_0.5": round(float((kept & (p[:, 1] >= 0.5)).mean()), 4),
        })
    return out
