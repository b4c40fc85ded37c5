"""Template bank: the object rendered from every view of a :class:`~osop_ros.core.views.ViewGrid`.

Each template is rendered once, directly at ``crop_size x crop_size`` with the intrinsics of a tight
square crop around the projected model (no resampling), so that ``K[i]`` and ``poses[i]`` describe
the template pixels exactly: projecting the model with them lands on the rendered mask.

Storage: ``<dir>/bank.npz`` (arrays + a JSON metadata blob, no pickle), written atomically. Network
features live next to it in ``<dir>/features-<features_key>.npz`` so that features of different
network weights coexist. :class:`TemplateCache` keys directories by :func:`bank_cache_key`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from osop_ros.core.geometry import CropBox, project
from osop_ros.core.types import InvalidInputError, OsopError
from osop_ros.core.views import ViewGrid, ViewGridConfig

if TYPE_CHECKING:
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer

log = logging.getLogger(__name__)

TEMPLATE_CODE_VERSION = "1"  # bump whenever rendering/cropping/storage changes what a bank contains
BANK_FILENAME = "bank.npz"
NOMINAL_FOCAL_PX = 2000.0  # focal of the virtual camera used only to frame the crop (result is scale-free)
_META_KEY = "meta_json"
_ARRAYS = ("poses", "K", "rgb", "mask", "xyz", "view_index")
_FEATURE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class TemplateBankError(OsopError):
    """A template bank or feature file is corrupt, incomplete or does not match what was asked for."""


@dataclass(frozen=True)
class TemplateConfig:
    """How templates are rendered.

    views: the viewpoint grid.
    crop_size: template side in pixels.
    pad: crop side = pad x the larger side of the projected model's bounding box.
    distance_factor: camera distance from the bbox centre = distance_factor x model diameter.
    ambient, diffuse, specular: renderer shading weights.
    light_dir_cam: (3,) light travel direction in the camera frame, or None for a headlight.
    """

    views: ViewGridConfig = field(default_factory=ViewGridConfig)
    crop_size: int = 64
    pad: float = 1.2
    distance_factor: float = 5.0
    ambient: float = 0.5
    diffuse: float = 0.5
    specular: float = 0.0
    light_dir_cam: tuple[float, float, float] | None = None

    def __post_init__(self) -> None:
        if int(self.crop_size) < 8:
            raise InvalidInputError(f"TemplateConfig.crop_size must be >= 8, got {self.crop_size}")
        if not self.pad >= 1.0:
            raise InvalidInputError(f"TemplateConfig.pad must be >= 1.0, got {self.pad}")
        if not self.distance_factor >= 1.0:
            raise InvalidInputError(f"TemplateConfig.distance_factor must be >= 1.0, got {self.distance_factor}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "views": self.views.to_dict(),
            "crop_size": int(self.crop_size),
            "pad": float(self.pad),
            "distance_factor": float(self.distance_factor),
            "ambient": float(self.ambient),
            "diffuse": float(self.diffuse),
            "specular": float(self.specular),
            "light_dir_cam": None if self.light_dir_cam is None else [float(v) for v in self.light_dir_cam],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TemplateConfig:
        light = d.get("light_dir_cam")
        return cls(
            views=ViewGridConfig.from_dict(d["views"]),
            crop_size=int(d["crop_size"]),
            pad=float(d["pad"]),
            distance_factor=float(d["distance_factor"]),
            ambient=float(d.get("ambient", 0.5)),
            diffuse=float(d.get("diffuse", 0.5)),
            specular=float(d.get("specular", 0.0)),
            light_dir_cam=None if light is None else tuple(float(v) for v in light),  # type: ignore[arg-type]
        )


def bank_cache_key(model: ObjectModel, config: TemplateConfig) -> str:
    """sha256 hex of the mesh content hash, the config and :data:`TEMPLATE_CODE_VERSION`."""
    if not model.content_hash:
        raise InvalidInputError(f"model {model.name!r} has no content_hash; cannot key a template cache")
    blob = json.dumps(
        {"mesh": model.content_hash, "config": config.to_dict(), "code": TEMPLATE_CODE_VERSION}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _features_filename(features_key: str) -> str:
    """``features-<key>.npz``; keys with characters unsafe in file names are slugged + hashed."""
    if not features_key:
        raise InvalidInputError("features_key must be a non-empty string")
    if _FEATURE_NAME.match(features_key) and len(features_key) <= 100:
        return f"features-{features_key}.npz"
    slug = re.sub(r"[^A-Za-z0-9_.\-]+", "_", features_key)[:60].strip("_.") or "key"
    return f"features-{slug}-{hashlib.sha256(features_key.encode()).hexdigest()[:16]}.npz"


def _atomic_savez(path: Path, arrays: dict[str, np.ndarray], compress: bool) -> None:
    """Write an npz to ``path`` through a temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    try:
        with open(tmp, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_array(obj: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), dtype=np.uint8)


def _read_npz(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All arrays + decoded JSON meta of an npz written by this module; raises TemplateBankError."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except FileNotFoundError as exc:
        raise TemplateBankError(f"{path}: file not found") from exc
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise TemplateBankError(f"{path}: unreadable npz ({type(exc).__name__}: {exc})") from exc
    raw = arrays.pop(_META_KEY, None)
    if raw is None:
        raise TemplateBankError(f"{path}: missing metadata entry {_META_KEY!r}")
    try:
        meta = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise TemplateBankError(f"{path}: corrupt metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise TemplateBankError(f"{path}: metadata is not a JSON object")
    return arrays, meta


class _ViewRenderer:
    """Renders object-centred template crops of one model (the rule shared by banks and training data)."""

    def __init__(self, renderer: Renderer, obj_key: str, model: ObjectModel, config: TemplateConfig) -> None:
        self.renderer, self.obj_key, self.config = renderer, obj_key, config
        self.dist = config.distance_factor * model.diameter
        self.center = np.asarray(model.center, dtype=np.float64)
        self.hull = model.hull_points()  # extremes of a projection are attained on convex-hull vertices
        self.K_nom = np.array([[NOMINAL_FOCAL_PX, 0.0, 0.0], [0.0, NOMINAL_FOCAL_PX, 0.0], [0.0, 0.0, 1.0]])
        radius = float(np.linalg.norm(model.extent)) / 2.0
        self.znear = max(self.dist - radius, 1e-4) * 0.5
        self.zfar = (self.dist + radius) * 2.0
        self.light = None if config.light_dir_cam is None else np.asarray(config.light_dir_cam, dtype=np.float64)

    def __call__(self, R_cam_obj: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """rgb (S,S,3) u8, mask (S,S) bool, xyz (S,S,3) f32 (0 off-object), T_cam_obj (4,4), K (3,3)."""
        S = int(self.config.crop_size)
        T = np.eye(4)
        T[:3, :3] = R_cam_obj
        T[:3, 3] = np.array([0.0, 0.0, self.dist]) - R_cam_obj @ self.center
        uv = project(self.K_nom, self.hull @ T[:3, :3].T + T[:3, 3])
        Kc = CropBox.from_points(uv, pad=self.config.pad).crop_K(self.K_nom, S)
        c = self.config
        out = self.renderer.render(Kc, S, S, [(self.obj_key, T)], light_dir_cam=self.light, ambient=c.ambient,
                                   diffuse=c.diffuse, specular=c.specular, znear=self.znear, zfar=self.zfar)
        return out.rgb, out.mask, np.where(out.mask[..., None], out.xyz, 0.0), T, Kc


def render_view(
    renderer: Renderer, obj_key: str, model: ObjectModel, R_cam_obj: np.ndarray, config: TemplateConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One template crop at an arbitrary viewpoint ``R_cam_obj`` (object centre on the optical axis).

    ``obj_key`` must already be added to ``renderer``. Returns rgb (S,S,3) u8, mask (S,S) bool,
    xyz (S,S,3) float32 model coordinates (0 off-object), T_cam_obj (4,4), K (3,3) — exactly what
    :meth:`TemplateBank.build` stores for a grid view.
    """
    return _ViewRenderer(renderer, obj_key, model, config)(R_cam_obj)


class TemplateBank:
    """Rendered templates of one object (T templates of S x S pixels).

    poses: (T, 4, 4) float64 ``T_cam_obj`` of each template camera (metres).
    K: (T, 3, 3) float64 intrinsics of each S x S template.
    rgb: (T, S, S, 3) uint8 shaded colour, 0 on background.
    mask: (T, S, S) bool object silhouette.
    xyz: (T, S, S, 3) float16 model-frame coordinates (metres) of the visible surface, 0 on background.
    view_index: (T, 3) int16 grid cell (ie, ia, ii) of each template.
    features: named network features, e.g. "seg_o1" (T, C) float16; saved separately (:meth:`save_features`).
    meta: JSON-able dict (key, mesh hash/name/diameter, config, code version, timings).
    source_dir: directory the bank was loaded from / saved to (features are looked up there), or None.
    """

    def __init__(
        self,
        poses: np.ndarray,
        K: np.ndarray,
        rgb: np.ndarray,
        mask: np.ndarray,
        xyz: np.ndarray,
        view_index: np.ndarray,
        meta: dict[str, Any] | None = None,
        features: dict[str, np.ndarray] | None = None,
    ):
        self.poses = poses
        self.K = K
        self.rgb = rgb
        self.mask = mask
        self.xyz = xyz
        self.view_index = view_index
        self.meta: dict[str, Any] = dict(meta or {})
        self.features: dict[str, np.ndarray] = dict(features or {})
        self.source_dir: Path | None = None
        self._validate(where="TemplateBank")

    def __len__(self) -> int:
        return int(self.poses.shape[0])

    @property
    def crop_size(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def key(self) -> str | None:
        """Cache key stored in the metadata (None for banks not built through :meth:`build`)."""
        return self.meta.get("key")

    @property
    def config(self) -> TemplateConfig | None:
        cfg = self.meta.get("config")
        return TemplateConfig.from_dict(cfg) if cfg else None

    def _validate(self, where: Any) -> None:
        T = self.poses.shape[0] if self.poses.ndim == 3 else -1
        S = self.rgb.shape[1] if self.rgb.ndim == 4 else -1
        expected = {
            "poses": ((T, 4, 4), np.float64),
            "K": ((T, 3, 3), np.float64),
            "rgb": ((T, S, S, 3), np.uint8),
            "mask": ((T, S, S), np.bool_),
            "xyz": ((T, S, S, 3), np.float16),
            "view_index": ((T, 3), np.int16),
        }
        for name, (shape, dtype) in expected.items():
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dtype:
                got = (getattr(arr, "shape", None), getattr(arr, "dtype", None))
                raise TemplateBankError(f"{where}: array {name!r} should be {shape} {np.dtype(dtype)}, got {got}")
        if T < 1 or S < 1:
            raise TemplateBankError(f"{where}: empty template bank")

    # ------------------------------------------------------------------------------------------ build
    @classmethod
    def build(
        cls, model: ObjectModel, renderer: Renderer, config: TemplateConfig | None = None, progress: bool = True
    ) -> TemplateBank:
        """Render every view of ``config.views`` (one render call per template, at crop_size x crop_size)."""
        from tqdm import tqdm

        config = config or TemplateConfig()
        t_start = time.perf_counter()
        grid = ViewGrid(config.views)
        S = int(config.crop_size)
        n = len(grid)
        dist = config.distance_factor * model.diameter
        center = model.center
        obj_key = f"__template__{model.content_hash[:16] or model.name}"
        if not renderer.has_object(obj_key):
            renderer.add_object(obj_key, model)
        view = _ViewRenderer(renderer, obj_key, model, config)

        poses = np.empty((n, 4, 4), dtype=np.float64)
        Ks = np.empty((n, 3, 3), dtype=np.float64)
        rgb = np.empty((n, S, S, 3), dtype=np.uint8)
        mask = np.empty((n, S, S), dtype=bool)
        xyz = np.empty((n, S, S, 3), dtype=np.float16)
        render_s = 0.0
        for i in tqdm(range(n), desc=f"templates {model.name}", unit="view", disable=not progress, leave=False):
            T = grid.T_cam_obj(i, dist, center)
            t0 = time.perf_counter()
            rgb[i], mask[i], xyz_i, poses[i], Ks[i] = view(T[:3, :3])
            render_s += time.perf_counter() - t0
            xyz[i] = xyz_i
        build_s = time.perf_counter() - t_start
        empty = int((~mask.reshape(n, -1).any(axis=1)).sum())
        if empty:
            log.warning("%s: %d of %d templates rendered empty", model.name, empty, n)
        meta = {
            "key": bank_cache_key(model, config) if model.content_hash else None,
            "code_version": TEMPLATE_CODE_VERSION,
            "config": config.to_dict(),
            "mesh": {
                "name": model.name,
                "path": None if model.path is None else str(model.path),
                "content_hash": model.content_hash,
                "diameter": float(model.diameter),
                "center": [float(v) for v in center],
            },
            "n_templates": n,
            "crop_size": S,
            "build_s": round(build_s, 3),
            "render_s": round(render_s, 3),
            "created_unix": time.time(),
        }
        log.info("built %d templates of %s (%dx%d) in %.1f s (render %.1f s)", n, model.name, S, S, build_s, render_s)
        return cls(poses, Ks, rgb, mask, xyz, grid.index.astype(np.int16), meta=meta)

    # ------------------------------------------------------------------------------------------ I/O
    def save(self, path: str | Path, compress: bool = True) -> Path:
        """Write the bank (not the features) to ``path`` (.npz) atomically. Returns the path."""
        path = Path(path)
        t0 = time.perf_counter()
        arrays = {name: getattr(self, name) for name in _ARRAYS}
        arrays[_META_KEY] = _json_array(self.meta)
        _atomic_savez(path, arrays, compress=compress)
        self.source_dir = path.parent
        size_mb = path.stat().st_size / 1e6
        log.info("saved template bank %s (%.1f MB) in %.1f s", path, size_mb, time.perf_counter() - t0)
        return path

    @classmethod
    def load(cls, path: str | Path, expected_key: str | None = None) -> TemplateBank:
        """Load a bank written by :meth:`save`; raises :class:`TemplateBankError` if it is corrupt or
        (with ``expected_key``) was built for another mesh/config/code version."""
        path = Path(path)
        arrays, meta = _read_npz(path)
        missing = [name for name in _ARRAYS if name not in arrays]
        if missing:
            raise TemplateBankError(f"{path}: missing arrays {missing}")
        if expected_key is not None and meta.get("key") != expected_key:
            raise TemplateBankError(f"{path}: key {meta.get('key')!r} != expected {expected_key!r}")
        if meta.get("code_version") != TEMPLATE_CODE_VERSION:
            version = meta.get("code_version")
            raise TemplateBankError(f"{path}: built by template code {version!r}, current {TEMPLATE_CODE_VERSION!r}")
        try:
            bank = cls(*(arrays[name] for name in _ARRAYS), meta=meta)
        except TemplateBankError as exc:
            raise TemplateBankError(f"{path}: {exc}") from exc
        if meta.get("n_templates") not in (None, len(bank)):
            raise TemplateBankError(f"{path}: metadata says {meta['n_templates']} templates, arrays hold {len(bank)}")
        bank.source_dir = path.parent
        return bank

    # ------------------------------------------------------------------------------------------ features
    def save_features(self, directory: str | Path | None, features_key: str) -> Path:
        """Write ``self.features`` to ``<directory>/features-<features_key>.npz`` atomically (uncompressed).

        ``directory`` defaults to :attr:`source_dir`. Each feature must be a numeric array with
        ``len(self)`` rows. ``features_key`` identifies the network weights that produced them.
        """
        directory = Path(directory) if directory is not None else self.source_dir
        if directory is None:
            raise InvalidInputError("save_features: no directory given and the bank has no source_dir")
        if not self.features:
            raise InvalidInputError("save_features: bank.features is empty")
        arrays: dict[str, np.ndarray] = {}
        for name, arr in self.features.items():
            arr = np.asarray(arr)
            if not _FEATURE_NAME.match(name) or name == _META_KEY:
                raise InvalidInputError(f"feature name {name!r} must match {_FEATURE_NAME.pattern}")
            if arr.dtype.kind not in "fiub" or arr.ndim < 1 or arr.shape[0] != len(self):
                raise InvalidInputError(
                    f"feature {name!r} must be a numeric array with {len(self)} rows, got {arr.shape} {arr.dtype}"
                )
            arrays[name] = arr
        arrays[_META_KEY] = _json_array(
            {"features_key": features_key, "bank_key": self.key, "n_templates": len(self), "names": sorted(arrays)}
        )
        path = directory / _features_filename(features_key)
        _atomic_savez(path, arrays, compress=False)
        return path

    @classmethod
    def load_features(
        cls,
        directory: str | Path,
        features_key: str,
        n_templates: int | None = None,
        bank_key: str | None = None,
    ) -> dict[str, np.ndarray] | None:
        """Features saved by :meth:`save_features` under ``features_key``; None when there are none.

        A corrupt file, or one saved for another key / template count / bank, logs a warning and
        returns None (the caller recomputes).
        """
        path = Path(directory) / _features_filename(features_key)
        if not path.is_file():
            return None
        try:
            arrays, meta = _read_npz(path)
        except TemplateBankError as exc:
            log.warning("ignoring template features: %s", exc)
            return None
        problems = []
        if meta.get("features_key") != features_key:
            problems.append(f"features_key {meta.get('features_key')!r} != {features_key!r}")
        if bank_key is not None and meta.get("bank_key") != bank_key:
            problems.append(f"bank key {meta.get('bank_key')!r} != {bank_key!r}")
        if n_templates is not None and any(a.ndim < 1 or a.shape[0] != n_templates for a in arrays.values()):
            problems.append(f"row counts {[a.shape[:1] for a in arrays.values()]} != {n_templates}")
        if problems:
            log.warning("ignoring template features %s: %s", path, "; ".join(problems))
            return None
        return arrays

    def attach_features(self, features_key: str, directory: str | Path | None = None) -> bool:
        """Load features saved for this bank under ``features_key`` into :attr:`features`; True on success."""
        directory = Path(directory) if directory is not None else self.source_dir
        if directory is None:
            return False
        feats = self.load_features(directory, features_key, n_templates=len(self), bank_key=self.key)
        if feats is None:
            return False
        self.features.update(feats)
        return True


def default_cache_dir() -> Path:
    """``$OSOP_CACHE_DIR`` or ``~/.cache/osop/templates``."""
    env = os.environ.get("OSOP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "osop" / "templates"



class TemplateCache:
    """Banks on disk as ``<cache_dir>/<bank_cache_key>/bank.npz`` (+ feature files next to it)."""

    def __init__(self, cache_dir: str | Path | None = None):
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()

    def bank_dir(self, model: ObjectModel, config: TemplateConfig) -> Path:
        return self.cache_dir / bank_cache_key(model, config)

    def bank_path(self, model: ObjectModel, config: TemplateConfig) -> Path:
        return self.bank_dir(model, config) / BANK_FILENAME

    def get(self, model: ObjectModel, config: TemplateConfig) -> TemplateBank | None:
        """The cached bank, or None when absent; a corrupt/mismatched file logs a warning and gives None."""
        key = bank_cache_key(model, config)
        path = self.cache_dir / key / BANK_FILENAME
        if not path.exists():
            return None
        try:
            bank = TemplateBank.load(path, expected_key=key)
        except TemplateBankError as exc:
            log.warning("template cache entry unusable, rebuilding: %s", exc)
            return None
        if len(bank) != config.views.n_views or bank.crop_size != config.crop_size:
            log.warning("template cache entry %s has %d templates of %d px, expected %d of %d px; rebuilding",
                        path, len(bank), bank.crop_size, config.views.n_views, config.crop_size)
            return None
        return bank

    def get_or_build(
        self,
        model: ObjectModel,
        renderer_factory: Renderer | Callable[[], Renderer],
        config: TemplateConfig | None = None,
        progress: bool = True,
    ) -> TemplateBank:
        """Load the cached bank or build, save and return it.

        ``renderer_factory``: a zero-argument callable returning a Renderer (called only on a miss; the
        renderer it returns is released afterwards), or an existing Renderer (left open).
        """
        config = config or TemplateConfig()
        t0 = time.perf_counter()
        bank = self.get(model, config)
        if bank is not None:
            log.info("template cache hit for %s (%s, %.2f s)", model.name, bank.source_dir, time.perf_counter() - t0)
            return bank
        owned = isinstance(renderer_factory, type) or not hasattr(renderer_factory, "render")
        renderer = renderer_factory() if owned else renderer_factory  # type: ignore[operator]
        try:
            bank = TemplateBank.build(model, renderer, config, progress=progress)
        finally:
            if owned:
                renderer.release()
        bank.save(self.bank_path(model, config))
        return bank


def make_contact_sheet(bank: TemplateBank, n: int = 64, cols: int = 8, gap: int = 2, bg: int = 40) -> np.ndarray:
    """(H, W, 3) uint8 grid of ``n`` templates spread evenly over the bank (background shown as ``bg`` grey)."""
    n = max(1, min(int(n), len(bank)))
    cols = max(1, min(int(cols), n))
    rows = (n + cols - 1) // cols
    S = bank.crop_size
    ids = np.linspace(0, len(bank) - 1, n).round().astype(int)
    sheet = np.full((rows * (S + gap) + gap, cols * (S + gap) + gap, 3), 255, dtype=np.uint8)
    for k, i in enumerate(ids):
        r, c = divmod(k, cols)
        tile = np.where(bank.mask[i][..., None], bank.rgb[i], np.uint8(bg))
        y, x = gap + r * (S + gap), gap + c * (S + gap)
        sheet[y : y + S, x : x + S] = tile
    return sheet
