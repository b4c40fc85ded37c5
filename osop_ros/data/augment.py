"""Image augmentation for synthetic training data (numpy + OpenCV; every random choice from a passed-in rng).

Images are (H, W, 3) uint8 RGB unless stated; depth is (H, W) float32 metres with 0 = missing.
Geometric augmentation (:func:`random_affine`) returns the (2, 3) affine so that targets (masks, xyz maps,
keypoints) can be warped consistently with :func:`warp_image` / :func:`warp_points`. Pixel convention: the
centre of pixel column ``u`` is at ``u`` (OpenCV), which is what ``cv2.warpAffine`` assumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from osop_ros.core.types import InvalidInputError

PROCEDURAL_KINDS = ("noise", "gradient", "checker", "stripes", "perlin", "solid", "blobs")


def _check_rgb(img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise InvalidInputError(f"expected an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")


def _random_color(rng: np.random.Generator) -> np.ndarray:
    """(3,) float32 RGB in [0, 255]."""
    return rng.uniform(0, 255, size=3).astype(np.float32)


# ----------------------------------------------------------------------------------------------- backgrounds


def perlin_noise(rng: np.random.Generator, height: int, width: int, octaves: int = 4, base_cells: int = 3,
                 persistence: float = 0.5) -> np.ndarray:
    """Fractal value noise (smoothly interpolated random grids summed over octaves) -> (H, W) float32 in [0, 1]."""
    out = np.zeros((height, width), dtype=np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        cells = base_cells * 2**o
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        layer = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        out += amp * layer
        total += amp
        amp *= persistence
    out /= total
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def procedural_background(rng: np.random.Generator, height: int, width: int, kind: str | None = None) -> np.ndarray:
    """Synthetic background of ``kind`` (one of :data:`PROCEDURAL_KINDS`, random if None) -> (H, W, 3) uint8."""
    if kind is None:
        kind = str(rng.choice(PROCEDURAL_KINDS))
    if kind not in PROCEDURAL_KINDS:
        raise InvalidInputError(f"unknown background kind {kind!r}; expected one of {PROCEDURAL_KINDS}")
    h, w = int(height), int(width)
    c0, c1 = _random_color(rng), _random_color(rng)
    if kind == "solid":
        img = np.broadcast_to(c0, (h, w, 3)).astype(np.float32)
        img = img + rng.normal(0, 3, size=(h, w, 1)).astype(np.float32)
    elif kind == "noise":
        scale = int(rng.integers(1, 16))
        small = rng.uniform(0, 255, size=(max(1, h // scale), max(1, w // scale), 3)).astype(np.float32)
        img = cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST if rng.random() < 0.5 else cv2.INTER_LINEAR)
    elif kind == "gradient":
        ang = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xs * np.cos(ang) + ys * np.sin(ang)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = (1 - t)[..., None] * c0 + t[..., None] * c1
    elif kind == "checker":
        cell = int(rng.integers(8, max(9, min(h, w) // 4)))
        ang = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        u = (xs * np.cos(ang) + ys * np.sin(ang)) / cell
        v = (-xs * np.sin(ang) + ys * np.cos(ang)) / cell
        chk = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
        img = (1 - chk)[..., None] * c0 + chk[..., None] * c1
    elif kind == "stripes":
        period = rng.uniform(6, max(7.0, min(h, w) / 3))
        ang = rng.uniform(0, np.pi)
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        s = np.sin(2 * np.pi * (xs * np.cos(ang) + ys * np.sin(ang)) / period)
        t = (s > 0).astype(np.float32) if rng.random() < 0.5 else (s + 1) / 2
        img = (1 - t)[..., None] * c0 + t[..., None] * c1
    elif kind == "perlin":
        t = perlin_noise(rng, h, w, octaves=int(rng.integers(2, 6)), base_cells=int(rng.integers(2, 8)))
        if rng.random() < 0.5:
            img = (1 - t)[..., None] * c0 + t[..., None] * c1
        else:
            img = np.stack([perlin_noise(rng, h, w) for _ in range(3)], axis=-1) * 255.0
    else:  # blobs: random filled ellipses/polygons on a base colour
        img = np.broadcast_to(c0, (h, w, 3)).astype(np.float32).copy()
        for _ in range(int(rng.integers(5, 30))):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            axes = (int(rng.integers(3, max(4, w // 4))), int(rng.integers(3, max(4, h // 4))))
            cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, _random_color(rng).tolist(), -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def photo_background(path: str | Path, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Random crop (scale 0.3-1 of the shorter side, random aspect close to W/H, random flip) of an image file,
    resized to (H, W, 3) uint8 RGB."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise InvalidInputError(f"cannot read background image {path}")
    img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    ih, iw = img.shape[:2]
    aspect = width / height * rng.uniform(0.9, 1.1)
    ch = int(min(ih, iw / aspect) * rng.uniform(0.3, 1.0))
    cw = int(min(iw, ch * aspect))
    ch, cw = max(ch, 1), max(cw, 1)
    y0 = int(rng.integers(0, ih - ch + 1))
    x0 = int(rng.integers(0, iw - cw + 1))
    crop = img[y0 : y0 + ch, x0 : x0 + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    interp = cv2.INTER_AREA if cw > width else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(crop), (int(width), int(height)), interpolation=interp)


def random_background(rng: np.random.Generator, height: int, width: int, photos: Sequence[Path] = (),
                      p_photo: float = 0.7) -> np.ndarray:
    """A photo crop (probability ``p_photo`` when ``photos`` is non-empty) or a procedural background."""
    if photos and rng.random() < p_photo:
        return photo_background(photos[int(rng.integers(len(photos)))], rng, height, width)
    return procedural_background(rng, height, width)


def composite(fg: np.ndarray, mask: np.ndarray, bg: np.ndarray, feather_sigma: float = 0.0) -> np.ndarray:
    """Paste ``fg`` (H, W, 3) u8 over ``bg`` where ``mask`` (H, W) bool; optional soft edge (Gaussian sigma px)."""
    _check_rgb(fg)
    _check_rgb(bg)
    if fg.shape != bg.shape or mask.shape != fg.shape[:2]:
        raise InvalidInputError(f"composite: shapes differ fg={fg.shape} bg={bg.shape} mask={mask.shape}")
    a = mask.astype(np.float32)
    if feather_sigma > 0:
        a = cv2.GaussianBlur(a, (0, 0), feather_sigma)
    a = a[..., None]
    return np.clip(a * fg.astype(np.float32) + (1 - a) * bg.astype(np.float32) + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- photometric


def color_jitter(img: np.ndarray, rng: np.random.Generator, brightness: float = 0.3, contrast: float = 0.3,
                 saturation: float = 0.3, hue: float = 0.05) -> np.ndarray:
    """Random brightness/contrast/saturation factors in [1 - x, 1 + x] and hue shift in [-hue, hue] turns."""
    _check_rgb(img)
    out = img.astype(np.float32)
    b = rng.uniform(1 - brightness, 1 + brightness)
    c = rng.uniform(1 - contrast, 1 + contrast)
    s = rng.uniform(1 - saturation, 1 + saturation)
    hshift = rng.uniform(-hue, hue)
    out *= b
    mean = out.mean()
    out = (out - mean) * c + mean
    gray = out.mean(axis=2, keepdims=True)
    out = (out - gray) * s + gray
    out = np.clip(out, 0, 255).astype(np.uint8)
    if abs(hshift) > 1e-6:
        hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
        hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + int(round(hshift * 180))) % 180).astype(np.uint8)
        out = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return out


def gaussian_blur(img: np.ndarray, rng: np.random.Generator, max_sigma: float = 1.5) -> np.ndarray:
    """Gaussian blur with sigma ~ U(0.2, max_sigma) px."""
    sigma = rng.uniform(0.2, max_sigma)
    return cv2.GaussianBlur(img, (0, 0), sigma)


def motion_blur(img: np.ndarray, rng: np.random.Generator, max_length: int = 9) -> np.ndarray:
    """Linear motion blur: a line kernel of random length (3..max_length px) and direction."""
    length = int(rng.integers(3, max(4, max_length + 1)))
    k = np.zeros((length, length), dtype=np.float32)
    c = (length - 1) / 2.0
    ang = rng.uniform(0, np.pi)
    dx, dy = np.cos(ang) * c, np.sin(ang) * c
    cv2.line(k, (int(round(c - dx)), int(round(c - dy))), (int(round(c + dx)), int(round(c + dy))), 1.0, 1)
    k /= max(float(k.sum()), 1e-6)
    return cv2.filter2D(img, -1, k, borderType=cv2.BORDER_REFLECT)


def add_noise(img: np.ndarray, rng: np.random.Generator, gauss_sigma_max: float = 6.0,
              shot_max: float = 0.6) -> np.ndarray:
    """Gaussian read noise (sigma ~ U(0, gauss_sigma_max) grey levels) plus signal-dependent shot noise
    (std = k sqrt(I), k ~ U(0, shot_max))."""
    _check_rgb(img)
    f = img.astype(np.float32)
    sigma = rng.uniform(0, gauss_sigma_max)
    k = rng.uniform(0, shot_max)
    noise = rng.standard_normal(f.shape, dtype=np.float32)
    f = f + noise * np.sqrt(sigma**2 + k**2 * f)
    return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def jpeg_degrade(img: np.ndarray, rng: np.random.Generator, quality_range: tuple[int, int] = (30, 95)) -> np.ndarray:
    """JPEG round trip at a random quality (compression artefacts)."""
    _check_rgb(img)
    q = int(rng.integers(quality_range[0], quality_range[1] + 1))
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, q])
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 RGB
        return img
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class PhotometricConfig:
    """Probabilities/strengths of :func:`photometric_augment`."""

    p_jitter: float = 0.9
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.04
    p_blur: float = 0.3
    max_blur_sigma: float = 1.2
    p_motion_blur: float = 0.15
    max_motion_length: int = 7
    p_noise: float = 0.6
    gauss_sigma_max: float = 5.0
    shot_max: float = 0.5
    p_jpeg: float = 0.4
    jpeg_quality: tuple[int, int] = (40, 95)


def photometric_augment(img: np.ndarray, rng: np.random.Generator, cfg: PhotometricConfig | None = None) -> np.ndarray:
    """Colour jitter, blur (Gaussian or motion), noise, JPEG loss, each applied with its probability."""
    cfg = cfg or PhotometricConfig()
    _check_rgb(img)
    out = img
    if rng.random() < cfg.p_jitter:
        out = color_jitter(out, rng, cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
    r = rng.random()
    if r < cfg.p_motion_blur:
        out = motion_blur(out, rng, cfg.max_motion_length)
    elif r < cfg.p_motion_blur + cfg.p_blur:
        out = gaussian_blur(out, rng, cfg.max_blur_sigma)
    if rng.random() < cfg.p_noise:
        out = add_noise(out, rng, cfg.gauss_sigma_max, cfg.shot_max)
    if rng.random() < cfg.p_jpeg:
        out = jpeg_degrade(out, rng, cfg.jpeg_quality)
    return out


# ----------------------------------------------------------------------------------------------- geometric


def random_affine(rng: np.random.Generator, in_size: tuple[int, int], out_size: tuple[int, int] | None = None,
                  scale_range: tuple[float, float] = (0.85, 1.2), max_rotation_deg: float = 15.0,
                  max_shift: float = 0.08, center: tuple[float, float] | None = None) -> np.ndarray:
    """(2, 3) float64 affine mapping input pixels to output pixels (``out = A @ [u, v, 1]``).

    in_size / out_size: (width, height). The input ``center`` (default image centre) goes to the output
    centre shifted by up to ``max_shift`` x output size, after rotation by up to +-``max_rotation_deg`` and
    scaling by ``scale_range`` x (out/in size ratio, aspect kept by the smaller ratio).
    """
    w, h = in_size
    ow, oh = out_size if out_size is not None else in_size
    cx, cy = center if center is not None else ((w - 1) / 2.0, (h - 1) / 2.0)
    s = rng.uniform(*scale_range) * min(ow / w, oh / h)
    ang = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg))
    tx = (ow - 1) / 2.0 + rng.uniform(-max_shift, max_shift) * ow
    ty = (oh - 1) / 2.0 + rng.uniform(-max_shift, max_shift) * oh
    c, sn = np.cos(ang) * s, np.sin(ang) * s
    M = np.array([[c, -sn], [sn, c]])
    t = np.array([tx, ty]) - M @ np.array([cx, cy])
    return np.hstack([M, t[:, None]])


def invert_affine(A: np.ndarray) -> np.ndarray:
    """Inverse of a (2, 3) affine."""
    return cv2.invertAffineTransform(np.asarray(A, dtype=np.float64))


def warp_points(A: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Map (N, 2) pixel coordinates with a (2, 3) affine -> (N, 2) float64."""
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    return uv @ np.asarray(A, dtype=np.float64)[:, :2].T + np.asarray(A, dtype=np.float64)[:, 2]


def warp_image(img: np.ndarray, A: np.ndarray, out_size: tuple[int, int], nearest: bool = False,
               border_value: float = 0.0) -> np.ndarray:
    """Warp ``img`` (H, W[, C], any dtype cv2 supports; bool is handled) with the (2, 3) affine ``A`` into
    ``out_size`` = (width, height). ``nearest=True`` for labels, masks, xyz maps (no mixing across edges)."""
    is_bool = img.dtype == bool
    src = img.astype(np.uint8) if is_bool else img
    flags = cv2.INTER_NEAREST if (nearest or is_bool) else cv2.INTER_LINEAR
    out = cv2.warpAffine(src, np.asarray(A, dtype=np.float64), (int(out_size[0]), int(out_size[1])), flags=flags,
                         borderMode=cv2.BORDER_CONSTANT, borderValue=border_value)
    return out.astype(bool) if is_bool else out


# ----------------------------------------------------------------------------------------------- occluders


def random_occluders(img: np.ndarray, rng: np.random.Generator, n_max: int = 3, max_area_frac: float = 0.08,
                     source: np.ndarray | None = None, region: tuple[int, int, int, int] | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Paste 1..``n_max`` occluders: random polygons filled with a patch cut from ``source`` (default: another
    region of ``img``) or a flat colour. ``region`` (x0, y0, x1, y1) restricts their centres.

    Returns (augmented image (H, W, 3) uint8, occluder mask (H, W) bool) — clear occluded target pixels with it.
    """
    _check_rgb(img)
    h, w = img.shape[:2]
    src = img if source is None else source
    _check_rgb(src)
    out = img.copy()
    occ = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = region if region is not None else (0, 0, w, h)
    for _ in range(int(rng.integers(1, n_max + 1))):
        area = rng.uniform(0.1, 1.0) * max_area_frac * h * w
        r = np.sqrt(area / np.pi)
        cx = rng.uniform(x0, max(x0 + 1, x1))
        cy = rng.uniform(y0, max(y0 + 1, y1))
        n = int(rng.integers(3, 9))
        angs = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        rad = r * rng.uniform(0.5, 1.5, size=n)
        poly = np.stack([cx + rad * np.cos(angs), cy + rad * np.sin(angs)], axis=1).round().astype(np.int32)
        m = np.zeros((h, w), dtype=np.uint8)
        cv2.fillPoly(m, [poly], 1)
        mb = m.astype(bool)
        if not mb.any():
            continue
        if rng.random() < 0.7:
            sh, sw = src.shape[:2]
            dy = int(rng.integers(-sh // 2, sh // 2 + 1))
            dx = int(rng.integers(-sw // 2, sw // 2 + 1))
            patch = np.roll(src, (dy, dx), axis=(0, 1))
            if patch.shape[:2] != (h, w):
                patch = cv2.resize(patch, (w, h))
            out[mb] = patch[mb]
        else:
            out[mb] = _random_color(rng).astype(np.uint8)
        occ |= mb
    return out, occ


# ----------------------------------------------------------------------------------------------- depth


@dataclass(frozen=True)
class DepthNoiseConfig:
    """Structured-light / ToF-like depth noise. sigma(z) = base + quad * z^2 metres."""

    sigma_base: float = 0.0005
    sigma_quad: float = 0.0015
    edge_threshold: float = 0.02  # metres: depth jump between neighbours that marks an edge
    edge_dropout: float = 0.5  # probability to drop an edge pixel
    edge_width: int = 2  # px around depth edges that may drop
    random_dropout: float = 0.003  # isolated missing pixels
    n_holes_max: int = 3  # small missing blobs
    quantise_mm: float = 0.0  # round to this step (0 = off)


def depth_noise(depth: np.ndarray, rng: np.random.Generator, cfg: DepthNoiseConfig | None = None) -> np.ndarray:
    """Noisy copy of ``depth`` (H, W) float32 metres: Gaussian noise growing with z^2, missing pixels along depth
    discontinuities and at random, optional quantisation. 0 stays 0."""
    cfg = cfg or DepthNoiseConfig()
    d = np.asarray(depth, dtype=np.float32)
    if d.ndim != 2:
        raise InvalidInputError(f"depth must be (H, W), got {d.shape}")
    valid = d > 0
    sigma = cfg.sigma_base + cfg.sigma_quad * d * d
    out = d + rng.standard_normal(d.shape, dtype=np.float32) * sigma
    # depth edges (including object/background boundaries with 0 depth)
    dd = np.where(valid, d, 0.0)
    gx = np.abs(np.diff(dd, axis=1, prepend=dd[:, :1]))
    gy = np.abs(np.diff(dd, axis=0, prepend=dd[:1, :]))
    edge = (np.maximum(gx, gy) > cfg.edge_threshold).astype(np.uint8)
    if cfg.edge_width > 1:
        edge = cv2.dilate(edge, np.ones((cfg.edge_width, cfg.edge_width), np.uint8))
    drop = (edge.astype(bool) & (rng.random(d.shape) < cfg.edge_dropout)) | (rng.random(d.shape) < cfg.random_dropout)
    h, w = d.shape
    for _ in range(int(rng.integers(0, cfg.n_holes_max + 1))):
        hole = np.zeros((h, w), np.uint8)
        cv2.ellipse(hole, (int(rng.integers(0, w)), int(rng.integers(0, h))),
                    (int(rng.integers(1, max(2, w // 40))), int(rng.integers(1, max(2, h // 40)))),
                    float(rng.uniform(0, 180)), 0, 360, 1, -1)
        drop |= hole.astype(bool)
    out[drop | ~valid] = 0.0
    out[out < 0] = 0.0
    if cfg.quantise_mm > 0:
        step = cfg.quantise_mm / 1000.0
        out = np.round(out / step) * step
    return out.astype(np.float32)
