"""Stage 3: dense 2D-3D correspondences from the query crop and its matched templates."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from osop_ros.core.matching import query_crop
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import Correspondences, MatchResult, Observation, SegmentationResult


class DenseCorrespondence:
    """Runs a :class:`~osop_ros.nets.corrnet.CorrNet` once per matched template (batched).

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
        from osop_ros.nets.corrnet import CorrNet, decode_coordinates
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
        mask_logit, coord_logits = self.net(CorrNet.make_input(qr, qm, t_rgb, t_mask, t_xyz_n))
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
