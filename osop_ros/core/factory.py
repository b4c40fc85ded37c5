"""Build a ready :class:`~osop_ros.core.pipeline.Pipeline` from an :class:`OsopConfig`.

Onboarding an object = load its mesh, load or render its template bank (content-keyed cache),
then load or compute the network features of the bank (cached next to the bank under a key made
of the weights' digests) so a restart costs a file read, not a re-extraction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from osop_ros.core.config import ObjectConfig, OsopConfig, load_config
from osop_ros.core.geometry import symmetry_transforms
from osop_ros.core.stages import OnboardedObject, Segmenter
from osop_ros.core.types import Observation, SegmentationResult, Symmetries

log = logging.getLogger(__name__)


@dataclass
class Networks:
    """The three stage networks on one device, plus a digest of their weights for cache keys."""

    segnet: torch.nn.Module
    matchnet: torch.nn.Module
    corrnet: torch.nn.Module
    device: torch.device
    digest: str

    @classmethod
    def load(cls, cfg: OsopConfig) -> Networks:
        from osop_ros.core.types import WeightsError
        from osop_ros.nets.checkpoint import NetsError

        try:
            return cls._load(cfg)
        except NetsError as exc:
            raise WeightsError(str(exc)) from exc

    @classmethod
    def _load(cls, cfg: OsopConfig) -> Networks:
        from osop_ros.nets.checkpoint import build_network, resolve_device, spec_digest

        device = resolve_device(cfg.device)
        if cfg.threads and device.type == "cpu":
            torch.set_num_threads(cfg.threads)
        paths = {s: cfg.weight_path(s) for s in ("segment", "match", "correspond")}
        nets = {s: build_network(p, device, stage=s) for s, p in paths.items()}
        digest = "-".join(spec_digest(p)[:8] for p in paths.values())
        return cls(nets["segment"], nets["match"], nets["correspond"], device, digest)


def symmetries_from_config(obj: ObjectConfig) -> Symmetries:
    """``symmetries: {discrete: [[16 floats]], continuous: [{axis, offset}]}`` in metres."""
    return Symmetries.from_bop_info(obj.symmetries or {}, unit_scale=1.0)


@torch.no_grad()
def extract_bank_features(bank, nets: Networks, batch: int = 256) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Per-template vectors: ``seg_o1..3`` (T, C_l), ``seg_hist`` (T, N_BINS) and ``match`` (T, D), float16.

    The segmentation vectors are computed with the object's colour histogram averaged over the coarse
    view subset the segmenter uses, exactly as :class:`OneShotSegmenter` does without cached features.
    """
    from osop_ros.core.segmentation import coarse_view_subset
    from osop_ros.nets.segnet import colour_histogram
    from osop_ros.nets.tensors import mask_tensor, rgb_tensor

    def tensors(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return rgb_tensor(bank.rgb[idx], nets.device), mask_tensor(bank.mask[idx], nets.device)

    obj_hist = colour_histogram(*tensors(coarse_view_subset(bank.view_index))).mean(0, keepdim=True)
    out: dict[str, list[np.ndarray]] = {}
    for s in range(0, len(bank), batch):
        rgb, mask = tensors(np.arange(s, min(len(bank), s + batch)))
        out.setdefault("seg_hist", []).append(colour_histogram(rgb, mask).cpu().numpy().astype(np.float16))
        for i, v in enumerate(nets.segnet.template_vectors(rgb, mask, obj_hist.expand(len(rgb), -1))):
            out.setdefault(f"seg_o{i + 1}", []).append(v.cpu().numpy().astype(np.float16))
        out.setdefault("match", []).append(nets.matchnet(rgb, mask).cpu().numpy().astype(np.float16))
    return {k: np.concatenate(v) for k, v in out.items()}


def onboard_object(
    obj_cfg: ObjectConfig, cfg: OsopConfig, nets: Networks | None, renderer_factory=None
) -> OnboardedObject:  # noqa: ANN001
    """Mesh -> template bank (cached) -> features (cached). Raises MeshLoadError / OsopError on bad input."""
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer
    from osop_ros.core.templates import TemplateCache, TemplateConfig
    from osop_ros.core.views import ViewGridConfig

    t0 = time.perf_counter()
    sym = symmetries_from_config(obj_cfg)
    model = ObjectModel.load(cfg.mesh_path(obj_cfg), units=obj_cfg.units, name=obj_cfg.name, symmetries=sym)
    tc = cfg.templates
    tcfg = TemplateConfig(
        views=ViewGridConfig(
            n_elevations=tc.n_elevations,
            n_azimuths=tc.n_azimuths,
            n_inplane=tc.n_inplane,
            elevation_range_deg=(tc.elevation_min_deg, tc.elevation_max_deg),
        ),
        crop_size=tc.crop_size,
    )
    cache = TemplateCache(cfg.template_cache_dir())
    bank = cache.get_or_build(model, renderer_factory or Renderer, tcfg)
    if nets is not None:
        fkey = f"nets-{nets.digest}"
        directory: Path = cache.bank_dir(model, tcfg)
        if not bank.attach_features(fkey, directory):
            bank.features.update(extract_bank_features(bank, nets))
            bank.save_features(directory, fkey)
    log.info("onboarded %s: %d templates in %.1f s", obj_cfg.name, len(bank), time.perf_counter() - t0)
    return OnboardedObject(obj_cfg.name, model, bank, symmetry_transforms(sym), obj_id=obj_cfg.obj_id)


def build_segmenter(cfg: OsopConfig, nets: Networks, matcher, kind: str | None = None):  # noqa: ANN001, ANN201
    """Stage 1 (a Segmenter) of ``kind`` (default ``cfg.pipeline.segmenter``): the OSOP head (components ranked
    per ``seg_ranking``, with ``matcher``'s descriptors), or MobileSAM proposals ranked by ``matcher``'s
    descriptors (raises :class:`WeightsError` naming the package when MobileSAM's is missing)."""
    from osop_ros.core.segmentation import OneShotSegmenter
    from osop_ros.core.types import WeightsError
    from osop_ros.nets.errors import NetsError

    p = cfg.pipeline
    head = OneShotSegmenter(nets.segnet, nets.device, input_width=p.seg_input_width, ranking=p.seg_ranking,
                            ranker=matcher)
    if (kind or p.segmenter) == "head":
        return head
    from osop_ros.core.proposals import ProposalConfig, ProposalSegmenter
    from osop_ros.nets.mobile_sam import MobileSAM

    try:
        sam = MobileSAM.from_package(p.proposal_image_size).to(nets.device)
    except NetsError as exc:
        raise WeightsError(str(exc)) from exc
    pcfg = ProposalConfig(
        image_size=p.proposal_image_size,
        grid=(p.proposal_grid_x, p.proposal_grid_y),
        head_peaks=p.proposal_head_peaks,
        head_weight=p.proposal_head_weight,
        cover_weight=p.proposal_cover_weight,
        colour_weight=p.proposal_colour_weight,
        min_score=p.proposal_min_score,
    )
    return ProposalSegmenter(head, sam, matcher, pcfg, crop_size=cfg.templates.crop_size)


class LazySegmenter:
    """A segmenter built on its first call (the RGB-only stage 1 of an ``auto`` pipeline: MobileSAM is loaded
    only once a frame without depth arrives)."""

    def __init__(self, build: Callable[[], Segmenter]) -> None:
        self._build = build
        self.segmenter: Segmenter | None = None

    def __call__(self, obs: Observation, obj: OnboardedObject) -> list[SegmentationResult]:
        if self.segmenter is None:
            self.segmenter = self._build()
        return self.segmenter(obs, obj)


def build_rgb_segmenter(cfg: OsopConfig, nets: Networks, matcher) -> Segmenter | None:  # noqa: ANN001
    """Stage 1 of frames without depth (``pipeline.segmenter_rgb``), or None when it is ``segmenter``'s.

    Built now for ``modality: rgb``, on first use for ``auto``; never for ``rgbd``.
    """
    p = cfg.pipeline
    kind = p.segmenter if p.segmenter_rgb == "same" else p.segmenter_rgb
    if kind == p.segmenter or p.modality == "rgbd":
        return None
    if p.modality == "rgb":
        return build_segmenter(cfg, nets, matcher, kind)
    if kind == "proposals":  # a missing package is reported now, not at the first frame without depth
        from osop_ros.core.types import WeightsError
        from osop_ros.nets.errors import NetsError
        from osop_ros.nets.mobile_sam import checkpoint_file

        try:
            checkpoint_file()
        except NetsError as exc:
            raise WeightsError(f"pipeline.segmenter_rgb: {exc} (or set pipeline.segmenter_rgb: same)") from exc
    return LazySegmenter(lambda: build_segmenter(cfg, nets, matcher, kind))


def build_pipeline(cfg: OsopConfig | dict | str | None):  # noqa: ANN201 - returns Pipeline (lazy import)
    """Load networks, onboard every configured object (a failing object is logged and skipped)."""
    from osop_ros.core.correspondence import DenseCorrespondence
    from osop_ros.core.matching import TemplateMatcher
    from osop_ros.core.pipeline import Pipeline
    from osop_ros.core.solver import PoseSolver, SolverConfig
    from osop_ros.core.tracking import IcpTracker
    from osop_ros.core.types import OsopError

    if not isinstance(cfg, OsopConfig):
        cfg = load_config(cfg)
    nets = Networks.load(cfg)
    objects = []
    for o in cfg.objects:
        try:
            objects.append(onboard_object(o, cfg, nets))
        except OsopError as exc:
            log.error("object %s skipped: %s", o.name, exc)
    p = cfg.pipeline
    solver_cfg = SolverConfig(icp=p.icp)
    matcher = TemplateMatcher(nets.matchnet, nets.device, top_k=p.top_k_templates)
    pipe = Pipeline(
        objects,
        segmenter=build_segmenter(cfg, nets, matcher),
        rgb_segmenter=build_rgb_segmenter(cfg, nets, matcher),
        matcher=matcher,
        correspondence=DenseCorrespondence(nets.corrnet, nets.device),
        solver=PoseSolver(solver_cfg),
        max_instances=p.max_instances,
        tracker=IcpTracker() if p.tracking else None,
        modality=p.modality,
    )
    pipe.config = cfg
    pipe.networks = nets
    return pipe
