"""Stage 3: dense 2D-3D correspondences from the query crop and its matched templates."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from osop_ros.core.geometry import CropBox
from osop_ros.core.matching import query_crop
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import Correspondences, InvalidInputError, MatchResult, Observation, SegmentationResult


class DenseCorrespondence:
    """Runs a stage-3 network (:class:`~osop_ros.nets.corrnet.CorrNet` or
    :class:`~osop_ros.nets.featnets.FeatCorrNet`, both with ``make_input``) once per matched template (batched).

    Keeps pixels whose predicted mask probability >= ``mask_threshold`` that also lie in the
    (dilated) stage-1 mask; ``conf`` = mask probability x product of per-axis peak bin probabilities.
    """

    def __init__(
        self, net: torch.nn.Module, device: torch.device, mask_threshold: float = 0.5, min_conf: float = 0.0
    ) -> None:
        self.net = net.eval()
        self.device = device
        self.mask_threshold = mask_threshold
        self.min_conf = min_conf

    @torch.no_grad()
    def __call__(
        self, obs: Observation, seg: SegmentationResult, match: MatchResult, obj: OnboardedObject
    ) -> list[Correspondences]:
        from osop_ros.nets.corrnet import decode_coordinates
        from osop_ros.nets.matchnet import rotate_inplane
        from osop_ros.nets.tensors import mask_tensor, rgb_tensor, xyz_tensor

        bank = obj.bank
        S = bank.crop_size
        box, q_rgb, q_mask = query_crop(obs, seg, S)
        ids = np.asarray(match.template_ids)
        k = len(ids)
        dev = self.device
        center = torch.from_numpy(np.asarray(obj.model.center, np.float32)).to(dev).view(1, 3, 1, 1)
        diam = float(obj.model.diameter)
        t_rgb, t_mask, t_xyz = (
            rgb_tensor(bank.rgb[ids], dev),
            mask_tensor(bank.mask[ids], dev),
            xyz_tensor(bank.xyz[ids], dev),
        )
        d = torch.from_numpy(np.asarray(match.inplane_deg, np.float32)).to(dev)
        t_rgb, t_mask, t_xyz = rotate_inplane(t_rgb, d), rotate_inplane(t_mask, d, True), rotate_inplane(t_xyz, d, True)
        t_xyz_n = ((t_xyz - center) / diam + 0.5) * t_mask
        qr = rgb_tensor(q_rgb, dev).expand(k, -1, -1, -1)
        qm = mask_tensor(q_mask, dev).expand(k, -1, -1, -1)
        mask_logit, coord_logits = self.net(self.net.make_input(qr, qm, t_rgb, t_mask, t_xyz_n))
        coords, peak = decode_coordinates(coord_logits)
        pm = torch.sigmoid(mask_logit[:, 0]).cpu().numpy()
        coords = coords.cpu().numpy()
        peak = peak.prod(dim=1).cpu().numpy()
        allowed = cv2.dilate(q_mask, np.ones((5, 5), np.uint8)) > 0
        out = []
        vv, uu = np.mgrid[0:S, 0:S]
        for i in range(k):
            keep = (pm[i] >= self.mask_threshold) & allowed
            conf = pm[i] * peak[i]
            keep &= conf >= self.min_conf
            uv_crop = np.stack([uu[keep], vv[keep]], 1).astype(np.float64)
            pts = (coords[i][:, keep].T - 0.5) * diam + obj.model.center
            out.append(
                Correspondences(
                    uv=box.crop_to_image(uv_crop, S), pts_obj=pts.astype(np.float64), conf=conf[keep].astype(np.float32)
                )
            )
        return out


class TemplateTransferCorrespondences:
    """Stage 3 without learning: 2D-3D pairs by overlaying the matched template on the query mask.

    Template-mask pixels are rolled by ``match.inplane_deg`` about the template crop centre (the
    convention of ``rotate_inplane``: ``(x, y) -> R2(theta) (x, y)`` with y down), then the square crop
    around their bounding box (the bank's ``pad``) is aligned with the square crop around the query mask
    box (templates and queries are framed the same way), so normalised crop coordinates coincide. Pairs:
    template pixels landing inside the query mask; ``pts_obj`` = the template's model coordinates at the
    pixel, ``uv`` = the corresponding full-image pixel; conf = 1. No resampling of either image.
    """

    is_oracle = False
    name = "template-transfer"

    def __init__(self, n_templates: int = 1, min_pairs: int = 0) -> None:
        if n_templates < 1:
            raise InvalidInputError(f"n_templates must be >= 1, got {n_templates}")
        self.n_templates = n_templates
        self.min_pairs = min_pairs

    def __call__(
        self, obs: Observation, seg: SegmentationResult, match: MatchResult, obj: OnboardedObject
    ) -> list[Correspondences]:
        if seg.box is None or not seg.mask.any():
            return []
        bank = obj.bank
        S = bank.crop_size
        cfg = bank.config
        pad = cfg.pad if cfg is not None else 1.2
        q_crop = CropBox.from_box(seg.box, pad=pad)
        H, W = seg.mask.shape
        c = (S - 1) / 2.0
        out = []
        for j, tid in enumerate(np.asarray(match.template_ids)[: self.n_templates]):
            vs, us = np.nonzero(bank.mask[int(tid)])
            if len(us) == 0:
                continue
            pts = bank.xyz[int(tid)][vs, us].astype(np.float64)
            p = np.stack([us, vs], axis=1).astype(np.float64)
            ang = np.radians(float(match.inplane_deg[j])) if len(match.inplane_deg) > j else 0.0
            if abs(ang) > 1e-9:
                R2 = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
                p = (p - c) @ R2.T + c
            t_crop = CropBox.from_points(p, pad=pad)
            uv = np.array([q_crop.cx, q_crop.cy]) + (p - [t_crop.cx, t_crop.cy]) * (q_crop.side / t_crop.side)
            ui = np.floor(uv[:, 0] + 0.5).astype(np.int64)
            vi = np.floor(uv[:, 1] + 0.5).astype(np.int64)
            ok = (ui >= 0) & (ui < W) & (vi >= 0) & (vi < H)
            ok[ok] = seg.mask[vi[ok], ui[ok]]
            if ok.sum() < self.min_pairs:
                continue
            out.append(Correspondences(uv[ok], pts[ok], np.ones(int(ok.sum()), dtype=np.float32)))
        return out
