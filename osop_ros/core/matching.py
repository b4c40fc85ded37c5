"""Stage 2: template matching — nearest templates give viewpoint + in-plane rotation.

The query crop (framed on the stage-1 mask exactly like templates are framed on the rendered
mask) is embedded once and compared (cosine) with the precomputed embeddings of all templates.
The best ``n_candidates`` viewpoints are then refined in-plane: each candidate template is rolled
by -range..+range degrees (``rotate_inplane``) and re-embedded, so the in-plane residual drops
from the grid's +-36 degrees to +-step/2.
"""

from __future__ import annotations

import numpy as np
import torch

from osop_ros.core.geometry import CropBox, mask_to_box
from osop_ros.core.stages import OnboardedObject
from osop_ros.core.types import InvalidInputError, MatchResult, Observation, SegmentationResult

QUERY_PAD = 1.2  # crop side = QUERY_PAD x larger side of the mask box (templates use the same rule)


def query_crop(
    obs: Observation, seg: SegmentationResult, size: int, pad: float = QUERY_PAD
) -> tuple[CropBox, np.ndarray, np.ndarray]:
    """Crop box, rgb crop (S,S,3) u8 and mask crop (S,S) u8 of a segmented instance."""
    if seg.box is None:
        raise InvalidInputError("segmentation has an empty mask")
    import cv2

    box = CropBox.from_box(seg.box, pad=pad)
    rgb = box.apply(obs.rgb, size)
    mask = box.apply(seg.mask.astype(np.uint8), size, cv2.INTER_NEAREST)
    return box, rgb, mask


def _to_t(rgb: np.ndarray, mask: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from osop_ros.nets.tensors import mask_tensor, rgb_tensor

    return rgb_tensor(rgb, device), mask_tensor(mask, device)


@torch.no_grad()
def embed_templates(
    net: torch.nn.Module, rgb: np.ndarray, mask: np.ndarray, device: torch.device, batch: int = 256
) -> torch.Tensor:
    """(T, D) embeddings of template crops: rgb (T, S, S, 3) uint8, mask (T, S, S)."""
    out = [net(*_to_t(rgb[s : s + batch], mask[s : s + batch], device)) for s in range(0, len(rgb), batch)]
    return torch.cat(out)


def inplane_deltas(range_deg: float, step_deg: float) -> np.ndarray:
    """Roll angles (deg) searched in-plane: -range..+range in ``step`` steps, or just 0 when step is 0."""
    return np.arange(-range_deg, range_deg + 1e-6, step_deg) if step_deg > 0 else np.zeros(1)


@torch.no_grad()
def match_templates(
    model: torch.nn.Module,
    q_emb: torch.Tensor,
    bank_emb: torch.Tensor,
    bank_rgb: np.ndarray,
    bank_mask: np.ndarray,
    device: torch.device,
    top_k: int = 3,
    n_candidates: int = 6,
    inplane_range_deg: float = 36.0,
    inplane_step_deg: float = 6.0,
) -> MatchResult:
    """Top-k (template id, in-plane roll) for one query embedding (D,) against bank_emb (T, D)."""
    from osop_ros.nets.matchnet import rotate_inplane

    sims = bank_emb.float() @ q_emb.float()
    n_c = min(n_candidates, len(sims))
    cand = torch.topk(sims, n_c).indices.cpu().numpy()
    deltas = inplane_deltas(inplane_range_deg, inplane_step_deg)
    nd = len(deltas)
    rgb, mask = _to_t(bank_rgb[cand], bank_mask[cand].astype(np.float32), device)
    rgb = rgb.repeat_interleave(nd, 0)
    mask = mask.repeat_interleave(nd, 0)
    d = torch.from_numpy(np.tile(deltas, n_c)).float().to(device)
    rgb_r, mask_r = rotate_inplane(rgb, d), rotate_inplane(mask, d, nearest=True)
    emb = model(rgb_r, mask_r)  # (n_c * nd, D)
    s = (emb @ q_emb.float()).view(n_c, nd).cpu().numpy()
    best = s.argmax(1)
    score = s[np.arange(n_c), best]
    order = np.argsort(-score)[:top_k]
    return MatchResult(
        template_ids=cand[order].astype(np.int64),
        scores=score[order].astype(np.float32),
        inplane_deg=deltas[best[order]].astype(np.float32),
    )


@torch.no_grad()
def match_rolled_query(
    model: torch.nn.Module,
    q_rgb: torch.Tensor,
    q_mask: torch.Tensor,
    bank_emb: torch.Tensor,
    top_k: int = 3,
    inplane_range_deg: float = 36.0,
    inplane_step_deg: float = 6.0,
) -> MatchResult:
    """Top-k (template id, roll) by rolling the *query* instead of the templates.

    q_rgb (1, 3, S, S), q_mask (1, 1, S, S); bank_emb (T, D). The query rolled by ``-d`` matches the
    template rolled by ``+d`` (same crop rule), so one batch of ``2 * range / step + 1`` query embeddings
    scores every template at every roll: an exhaustive in-plane search (the bank's 72-degree in-plane
    steps are covered by +-36 degrees) for 13 network passes instead of ``n_candidates x 13``.
    """
    from osop_ros.nets.matchnet import rotate_inplane

    deltas = inplane_deltas(inplane_range_deg, inplane_step_deg)
    d = torch.from_numpy(-deltas).float().to(q_rgb.device)
    n = len(deltas)
    rgb_r = rotate_inplane(q_rgb.expand(n, -1, -1, -1), d)
    mask_r = rotate_inplane(q_mask.expand(n, -1, -1, -1), d, nearest=True)
    emb = model(rgb_r, mask_r)  # (n, D)
    sims = bank_emb.float() @ emb.float().T  # (T, n)
    best = sims.argmax(1)
    score = sims.gather(1, best[:, None])[:, 0]
    order = torch.topk(score, min(top_k, len(score))).indices.cpu().numpy()
    best = best.cpu().numpy()
    return MatchResult(
        template_ids=order.astype(np.int64),
        scores=score.cpu().numpy()[order].astype(np.float32),
        inplane_deg=deltas[best[order]].astype(np.float32),
    )


class TemplateMatcher:
    """Stage 2 with a :class:`~osop_ros.nets.matchnet.MatchNet` or a pretrained descriptor (Matcher protocol).

    ``inplane="query"`` rolls the query crop (exhaustive over templates, 13 passes); ``"templates"`` rolls
    the ``n_candidates`` best templates (``6 x 13`` passes), the original scheme.
    """

    def __init__(
        self,
        net: torch.nn.Module,
        device: torch.device,
        top_k: int = 3,
        n_candidates: int = 6,
        inplane_range_deg: float = 36.0,
        inplane_step_deg: float = 6.0,
        inplane: str = "query",
    ) -> None:
        if inplane not in ("query", "templates"):
            raise InvalidInputError(f"inplane must be query|templates, got {inplane!r}")
        self.net = net.eval()
        self.device = device
        self.top_k, self.n_candidates = top_k, n_candidates
        self.inplane_range_deg, self.inplane_step_deg = inplane_range_deg, inplane_step_deg
        self.inplane = inplane

    @torch.no_grad()
    def bank_embeddings(self, obj: OnboardedObject) -> torch.Tensor:
        """(T, D) template embeddings on the device (from bank features when present, else computed)."""
        if "match_emb" not in obj.extra:
            feats = obj.bank.features.get("match")
            if feats is None:
                emb = embed_templates(self.net, obj.bank.rgb, obj.bank.mask, self.device)
                obj.bank.features["match"] = emb.cpu().numpy().astype(np.float16)
            else:
                emb = torch.from_numpy(feats.astype(np.float32)).to(self.device)
            obj.extra["match_emb"] = emb
        return obj.extra["match_emb"]

    @torch.no_grad()
    def describe_masks(self, rgb: np.ndarray, masks: np.ndarray | list[np.ndarray], crop_size: int) -> torch.Tensor:
        """(N, D) L2-normalised descriptors of (H, W) bool masks of ``rgb``, each framed like a query crop."""
        import cv2
        import torch.nn.functional as F

        if len(masks) == 0:
            return torch.zeros(0, 1, device=self.device)
        S = crop_size
        crops = np.zeros((len(masks), S, S, 3), np.uint8)
        mcrops = np.zeros((len(masks), S, S), np.float32)
        for i, m in enumerate(masks):
            box = CropBox.from_box(mask_to_box(m), pad=QUERY_PAD)
            crops[i] = box.apply(rgb, S)
            mcrops[i] = box.apply(m.astype(np.uint8), S, cv2.INTER_NEAREST)
        return F.normalize(embed_templates(self.net, crops, mcrops, self.device).float(), dim=1)

    @torch.no_grad()
    def template_similarity(self, desc: torch.Tensor, obj: OnboardedObject) -> np.ndarray:
        """(N,) float32 best cosine of each descriptor (N, D) (from :meth:`describe_masks`) to ``obj``'s templates."""
        import torch.nn.functional as F

        if len(desc) == 0:
            return np.zeros(0, np.float32)
        bank = F.normalize(self.bank_embeddings(obj).float(), dim=1)
        return (desc.to(bank.device) @ bank.T).max(1).values.cpu().numpy().astype(np.float32)

    @torch.no_grad()
    def __call__(self, obs: Observation, seg: SegmentationResult, obj: OnboardedObject) -> MatchResult:
        S = obj.bank.crop_size
        _, rgb, mask = query_crop(obs, seg, S)
        r, m = _to_t(rgb[None], mask[None].astype(np.float32), self.device)
        if self.inplane == "query":
            return match_rolled_query(
                self.net, r, m, self.bank_embeddings(obj), self.top_k, self.inplane_range_deg, self.inplane_step_deg
            )
        q = self.net(r, m)[0]
        return match_templates(
            self.net,
            q,
            self.bank_embeddings(obj),
            obj.bank.rgb,
            obj.bank.mask,
            self.device,
            self.top_k,
            self.n_candidates,
            self.inplane_range_deg,
            self.inplane_step_deg,
        )
