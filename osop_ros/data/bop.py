"""Read BOP-format datasets and read/write BOP result CSV files.

Layout (https://github.com/thodan/bop_toolkit/blob/master/docs/bop_datasets_format.md)::

    ROOT/camera.json, models/{models_info.json, obj_XXXXXX.ply}, test_targets_bop19.json
    ROOT/<split>/<scene_id:06d>/{rgb|gray}/<im_id:06d>.{png|jpg|tif}, depth/<im_id:06d>.{png|tif},
        mask_visib/<im_id:06d>_<gt_idx:06d>.png, scene_camera.json, scene_gt.json, scene_gt_info.json

Units: BOP files are millimetres (``depth png * depth_scale = mm``, ``cam_t_m2c`` mm, diameters mm);
everything returned here is metres (:class:`Observation` depth, ``T_cam_obj``, diameters).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from osop_ros.core.geometry import make_T
from osop_ros.core.types import CameraIntrinsics, InvalidInputError, Observation, OsopError, Symmetries

log = logging.getLogger(__name__)

RGB_DIRS = ("rgb", "gray")
RGB_EXTS = (".png", ".jpg", ".jpeg", ".tif")
DEPTH_EXTS = (".png", ".tif")


class BopFormatError(OsopError, ValueError):
    """A BOP dataset directory or result file is malformed; the message names the file."""


def _load_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as exc:
        raise BopFormatError(f"{path}: file not found") from exc
    except json.JSONDecodeError as exc:
        raise BopFormatError(f"{path}: invalid JSON ({exc})") from exc


@dataclass(frozen=True)
class BopTarget:
    """One estimation target: ``inst_count`` instances of ``obj_id`` in image (scene_id, im_id)."""

    scene_id: int
    im_id: int
    obj_id: int
    inst_count: int = 1


@dataclass
class BopGt:
    """One ground-truth instance of an image.

    gt_index:    position in ``scene_gt.json[im_id]`` (also the mask_visib file index).
    T_cam_obj:   (4, 4) float64 metres.
    visib_fract: visible fraction (from scene_gt_info.json; 1.0 if absent).
    bbox_obj, bbox_visib: (x, y, w, h) pixels, None if absent.
    """

    gt_index: int
    obj_id: int
    T_cam_obj: np.ndarray
    visib_fract: float = 1.0
    bbox_obj: tuple[int, int, int, int] | None = None
    bbox_visib: tuple[int, int, int, int] | None = None
    px_count_visib: int | None = None


@dataclass
class BopFrame:
    """One loaded image with its annotations. ``obs.depth`` is None when the frame has no depth image."""

    scene_id: int
    im_id: int
    obs: Observation
    gts: list[BopGt]
    depth_scale: float
    has_depth: bool


def pose_from_bop(R: Iterable[float], t_mm: Iterable[float]) -> np.ndarray:
    """BOP ``cam_R_m2c`` (9 floats row-major) and ``cam_t_m2c`` (mm) -> (4, 4) T_cam_obj in metres."""
    R = np.asarray(list(R), dtype=np.float64).reshape(3, 3)
    t = np.asarray(list(t_mm), dtype=np.float64).reshape(3) * 0.001
    return make_T(R, t)


class BopDataset:
    """Lazy reader of one split of a BOP dataset.

    root:       dataset directory (holds ``models/`` and the split folder).
    split:      split folder name (``test``, ``val``, ``test_primesense``...).
    models_dir: object models folder (default ``root/models``; ``models_eval`` is not used automatically).
    targets_file: JSON list of targets (default ``root/test_targets_bop19.json`` if present, else all GT).
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "test",
        models_dir: str | Path | None = None,
        targets_file: str | Path | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise BopFormatError(f"{self.root}: dataset directory not found")
        self.split = split
        self.split_dir = self.root / split
        if not self.split_dir.is_dir():
            raise BopFormatError(f"{self.split_dir}: split folder not found")
        self.models_dir = Path(models_dir) if models_dir is not None else self.root / "models"
        if targets_file is None:
            cand = self.root / "test_targets_bop19.json"
            self.targets_file: Path | None = cand if (cand.is_file() and split.startswith("test")) else None
        else:
            self.targets_file = Path(targets_file)
            if not self.targets_file.is_file():
                raise BopFormatError(f"{self.targets_file}: targets file not found")
        self._scene_cache: dict[tuple[int, str], dict[int, Any]] = {}

    # -- dataset-level ------------------------------------------------------------------------------
    @cached_property
    def scene_ids(self) -> list[int]:
        """Sorted scene ids of the split (folders with a numeric name)."""
        ids = sorted(int(p.name) for p in self.split_dir.iterdir() if p.is_dir() and p.name.isdigit())
        if not ids:
            raise BopFormatError(f"{self.split_dir}: no scene folders")
        return ids

    @cached_property
    def camera_info(self) -> dict[str, Any]:
        """Contents of ``root/camera.json`` ({} if absent)."""
        path = self.root / "camera.json"
        return _load_json(path) if path.is_file() else {}

    @cached_property
    def models_info(self) -> dict[int, dict[str, Any]]:
        """``models_info.json`` keyed by int obj_id (values as in the file, millimetres)."""
        raw = _load_json(self.models_dir / "models_info.json")
        if not isinstance(raw, dict):
            raise BopFormatError(f"{self.models_dir / 'models_info.json'}: expected a JSON object")
        return {int(k): v for k, v in raw.items()}

    @property
    def obj_ids(self) -> list[int]:
        return sorted(self.models_info)

    def diameter(self, obj_id: int) -> float:
        """Object diameter in metres (models_info.json)."""
        try:
            return float(self.models_info[obj_id]["diameter"]) * 0.001
        except KeyError as exc:
            raise BopFormatError(f"{self.models_dir / 'models_info.json'}: no diameter for object {obj_id}") from exc

    def symmetries(self, obj_id: int) -> Symmetries:
        """Symmetries of an object (metres) from models_info.json."""
        return Symmetries.from_bop_info(self.models_info.get(obj_id, {}), unit_scale=0.001)

    def model_path(self, obj_id: int) -> Path:
        """Path of the object model file (``obj_XXXXXX.ply``)."""
        for ext in (".ply", ".obj", ".glb"):
            p = self.models_dir / f"obj_{obj_id:06d}{ext}"
            if p.is_file():
                return p
        raise BopFormatError(f"{self.models_dir}: no model file for object {obj_id}")

    # -- scene-level --------------------------------------------------------------------------------
    def _scene_dir(self, scene_id: int) -> Path:
        d = self.split_dir / f"{scene_id:06d}"
        if not d.is_dir():
            raise BopFormatError(f"{d}: scene folder not found")
        return d

    def _scene_json(self, scene_id: int, name: str, required: bool = True) -> dict[int, Any]:
        key = (scene_id, name)
        if key not in self._scene_cache:
            path = self._scene_dir(scene_id) / f"{name}.json"
            if not path.is_file():
                if required:
                    raise BopFormatError(f"{path}: file not found")
                self._scene_cache[key] = {}
            else:
                raw = _load_json(path)
                self._scene_cache[key] = {int(k): v for k, v in raw.items()}
        return self._scene_cache[key]

    def image_ids(self, scene_id: int) -> list[int]:
        """Sorted image ids of a scene that have an RGB (or gray) image."""
        d = self._scene_dir(scene_id)
        ids = set()
        for sub in RGB_DIRS:
            if (d / sub).is_dir():
                ids |= {int(p.stem) for p in (d / sub).iterdir() if p.suffix.lower() in RGB_EXTS and p.stem.isdigit()}
        return sorted(ids)

    def images(self) -> list[tuple[int, int]]:
        """All (scene_id, im_id) with an image, sorted."""
        return [(s, i) for s in self.scene_ids for i in self.image_ids(s)]

    @cached_property
    def targets(self) -> list[BopTarget]:
        """Estimation targets: from the targets file, else one per (image, object) with GT (all instances)."""
        if self.targets_file is not None:
            raw = _load_json(self.targets_file)
            if not isinstance(raw, list):
                raise BopFormatError(f"{self.targets_file}: expected a JSON list of targets")
            try:
                return [
                    BopTarget(int(t["scene_id"]), int(t["im_id"]), int(t["obj_id"]), int(t.get("inst_count", 1)))
                    for t in raw
                ]
            except (KeyError, TypeError, ValueError) as exc:
                raise BopFormatError(f"{self.targets_file}: malformed target entry ({exc})") from exc
        out = []
        for s in self.scene_ids:
            gt = self._scene_json(s, "scene_gt")
            for im_id in sorted(gt):
                counts: dict[int, int] = {}
                for g in gt[im_id]:
                    counts[int(g["obj_id"])] = counts.get(int(g["obj_id"]), 0) + 1
                out += [BopTarget(s, im_id, o, c) for o, c in sorted(counts.items())]
        return out

    def camera(self, scene_id: int, im_id: int) -> tuple[CameraIntrinsics, float]:
        """Intrinsics of an image and its depth scale (depth png * scale = mm)."""
        cams = self._scene_json(scene_id, "scene_camera")
        if im_id not in cams:
            raise BopFormatError(f"{self._scene_dir(scene_id) / 'scene_camera.json'}: no entry for image {im_id}")
        c = cams[im_id]
        w = int(self.camera_info.get("width", 0))
        h = int(self.camera_info.get("height", 0))
        if "im_size" in c:  # some datasets store the size per image
            w, h = int(c["im_size"][0]), int(c["im_size"][1])
        if w <= 0 or h <= 0:
            img = self.rgb_path(scene_id, im_id)
            im = cv2.imread(str(img), cv2.IMREAD_UNCHANGED)
            if im is None:
                raise BopFormatError(f"{img}: cannot read image")
            h, w = im.shape[:2]
        scale = float(c.get("depth_scale", self.camera_info.get("depth_scale", 1.0)))
        try:
            return CameraIntrinsics.from_K(c["cam_K"], w, h), scale
        except KeyError as exc:
            raise BopFormatError(f"scene {scene_id} image {im_id}: cam_K missing") from exc

    def gt(self, scene_id: int, im_id: int) -> list[BopGt]:
        """Ground-truth instances of an image (empty list if the split has no GT for it)."""
        gts = self._scene_json(scene_id, "scene_gt", required=False).get(im_id, [])
        infos = self._scene_json(scene_id, "scene_gt_info", required=False).get(im_id, [])
        out = []
        for i, g in enumerate(gts):
            info = infos[i] if i < len(infos) else {}
            bo = info.get("bbox_obj")
            bv = info.get("bbox_visib")
            out.append(
                BopGt(
                    gt_index=i,
                    obj_id=int(g["obj_id"]),
                    T_cam_obj=pose_from_bop(g["cam_R_m2c"], g["cam_t_m2c"]),
                    visib_fract=float(info.get("visib_fract", 1.0)),
                    bbox_obj=tuple(int(x) for x in bo) if bo is not None else None,
                    bbox_visib=tuple(int(x) for x in bv) if bv is not None else None,
                    px_count_visib=int(info["px_count_visib"]) if "px_count_visib" in info else None,
                )
            )
        return out

    # -- files --------------------------------------------------------------------------------------
    def rgb_path(self, scene_id: int, im_id: int) -> Path:
        d = self._scene_dir(scene_id)
        for sub in RGB_DIRS:
            for ext in RGB_EXTS:
                p = d / sub / f"{im_id:06d}{ext}"
                if p.is_file():
                    return p
        raise BopFormatError(f"{d}: no rgb/gray image for image id {im_id}")

    def depth_path(self, scene_id: int, im_id: int) -> Path | None:
        d = self._scene_dir(scene_id) / "depth"
        for ext in DEPTH_EXTS:
            p = d / f"{im_id:06d}{ext}"
            if p.is_file():
                return p
        return None

    def has_depth(self, scene_id: int, im_id: int) -> bool:
        return self.depth_path(scene_id, im_id) is not None

    def load_rgb(self, scene_id: int, im_id: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB (gray images are replicated to 3 channels; 16-bit images scaled to 8 bits)."""
        p = self.rgb_path(scene_id, im_id)
        im = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if im is None:
            raise BopFormatError(f"{p}: cannot read image")
        if im.dtype == np.uint16:
            im = (im / 257.0).round().astype(np.uint8)
        if im.ndim == 2:
            im = np.repeat(im[:, :, None], 3, axis=2)
        elif im.shape[2] == 4:
            im = cv2.cvtColor(im, cv2.COLOR_BGRA2RGB)
        else:
            im = cv2.cvtColor(im, cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(im)

    def load_depth(self, scene_id: int, im_id: int) -> np.ndarray | None:
        """(H, W) float32 metres (0 = missing) or None when the frame has no depth image."""
        p = self.depth_path(scene_id, im_id)
        if p is None:
            return None
        d = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if d is None or d.ndim != 2:
            raise BopFormatError(f"{p}: cannot read a single-channel depth image")
        _, scale = self.camera(scene_id, im_id)
        return (d.astype(np.float32) * np.float32(scale * 0.001)).astype(np.float32)

    def load_observation(self, scene_id: int, im_id: int, with_depth: bool = True) -> Observation:
        cam, _ = self.camera(scene_id, im_id)
        rgb = self.load_rgb(scene_id, im_id)
        depth = self.load_depth(scene_id, im_id) if with_depth else None
        obs = Observation(rgb, cam, depth)
        obs.validate()
        return obs

    def load_frame(self, scene_id: int, im_id: int, with_depth: bool = True) -> BopFrame:
        obs = self.load_observation(scene_id, im_id, with_depth)
        _, scale = self.camera(scene_id, im_id)
        return BopFrame(scene_id, im_id, obs, self.gt(scene_id, im_id), scale, obs.depth is not None)

    def mask_visib(self, scene_id: int, im_id: int, gt_index: int) -> np.ndarray | None:
        """(H, W) bool visible mask of one GT instance from ``mask_visib/``, None if the dataset has none."""
        p = self._scene_dir(scene_id) / "mask_visib" / f"{im_id:06d}_{gt_index:06d}.png"
        if not p.is_file():
            return None
        m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        if m is None:
            raise BopFormatError(f"{p}: cannot read mask")
        return m > 0

    def summary(self) -> dict[str, Any]:
        """Counts for logs: scenes, images, images with depth, targets, objects."""
        ims = self.images()
        return {
            "root": str(self.root),
            "split": self.split,
            "scenes": len(self.scene_ids),
            "images": len(ims),
            "images_with_depth": sum(self.has_depth(s, i) for s, i in ims),
            "targets": len(self.targets),
            "targets_file": str(self.targets_file) if self.targets_file else None,
            "objects": self.obj_ids,
        }


# ---------------------------------------------------------------------------------------------------
# Result files (BOP19 CSV)
# ---------------------------------------------------------------------------------------------------

CSV_HEADER = ("scene_id", "im_id", "obj_id", "score", "R", "t", "time")


@dataclass
class BopResult:
    """One pose estimate. ``T_cam_obj`` in metres (written as R row-major and t in mm); ``time`` in seconds
    per image (the same for every estimate of an image; -1 if unknown)."""

    scene_id: int
    im_id: int
    obj_id: int
    score: float
    T_cam_obj: np.ndarray
    time: float = -1.0


def write_bop_csv(path: str | Path, results: Iterable[BopResult]) -> Path:
    """Write a BOP19 results CSV. Raises :class:`BopFormatError` if one image has differing times."""
    path = Path(path)
    results = list(results)
    times: dict[tuple[int, int], float] = {}
    for r in results:
        key = (r.scene_id, r.im_id)
        if key in times and abs(times[key] - r.time) > 1e-3:
            raise BopFormatError(f"image {key}: estimates have different times ({times[key]} vs {r.time})")
        times[key] = r.time
        if not np.all(np.isfinite(r.T_cam_obj)):
            raise BopFormatError(f"image {key} object {r.obj_id}: non-finite pose")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        f.write(",".join(CSV_HEADER) + "\n")
        for r in results:
            R = " ".join(f"{v:.9g}" for v in r.T_cam_obj[:3, :3].reshape(-1))
            t = " ".join(f"{v:.6f}" for v in r.T_cam_obj[:3, 3] * 1000.0)
            f.write(f"{r.scene_id},{r.im_id},{r.obj_id},{r.score:.6f},{R},{t},{r.time:.6f}\n")
    tmp.replace(path)
    return path


def read_bop_csv(path: str | Path) -> list[BopResult]:
    """Read a BOP19 results CSV (R row-major, t mm -> metres)."""
    path = Path(path)
    if not path.is_file():
        raise BopFormatError(f"{path}: results file not found")
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != CSV_HEADER:
            raise BopFormatError(f"{path}: expected header {','.join(CSV_HEADER)}, got {header}")
        for n, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                R = np.array([float(v) for v in row[4].split()], dtype=np.float64)
                t = np.array([float(v) for v in row[5].split()], dtype=np.float64)
                if R.size != 9 or t.size != 3:
                    raise ValueError(f"R has {R.size} values, t has {t.size}")
                score, tm = float(row[3]), float(row[6])
                if not (math.isfinite(score) and np.all(np.isfinite(R)) and np.all(np.isfinite(t))):
                    raise ValueError("non-finite values")
                out.append(BopResult(int(row[0]), int(row[1]), int(row[2]), score, pose_from_bop(R, t), tm))
            except (IndexError, ValueError) as exc:
                raise BopFormatError(f"{path}:{n}: malformed row ({exc})") from exc
    return out


def write_bop_json_dict(path: str | Path, data: dict[str, Any]) -> None:
    """Write a JSON file atomically (used for scene_* files of synthetic datasets)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    tmp.replace(path)


def bop_gt_entry(obj_id: int, T_cam_obj: np.ndarray) -> dict[str, Any]:
    """A ``scene_gt.json`` entry (mm) for a pose in metres."""
    if T_cam_obj.shape != (4, 4):
        raise InvalidInputError(f"T_cam_obj must be (4, 4), got {T_cam_obj.shape}")
    return {
        "cam_R_m2c": [float(v) for v in T_cam_obj[:3, :3].reshape(-1)],
        "cam_t_m2c": [float(v) for v in T_cam_obj[:3, 3] * 1000.0],
        "obj_id": int(obj_id),
    }
