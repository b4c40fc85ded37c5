"""``osop templates build``: render (or load from the cache) the template bank of a mesh."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.templates import TemplateConfig

log = logging.getLogger(__name__)


def _grid(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected ELxAZxIP with positive integers (e.g. 16x36x5), got {text!r}")
    return parts  # type: ignore[return-value]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("templates", help="template banks (render, cache, inspect)")
    sub = parser.add_subparsers(dest="templates_command", required=True)
    b = sub.add_parser(
        "build",
        help="build the template bank of a mesh (or load it from the cache)",
        description="Render the template bank of a mesh into <out>/<key>/bank.npz, reusing a cached bank "
        "built from the same mesh bytes, units, settings and code version.",
    )
    b.add_argument("--mesh", required=True, type=Path, help="mesh file (.ply .obj .stl .glb .gltf)")
    b.add_argument("--units", choices=("mm", "m", "auto"), default="auto", help="mesh units (default: auto)")
    b.add_argument("--out", type=Path, default=None,
                   help="cache directory (default: $OSOP_CACHE_DIR or ~/.cache/osop/templates)")
    b.add_argument("--crop-size", type=int, default=64, help="template side in pixels (default: 64)")
    b.add_argument("--grid", type=_grid, default=None, metavar="ELxAZxIP",
                   help="elevations x azimuths x in-plane rotations (default: 16x36x5 = 2880 views)")
    b.add_argument("--rebuild", action="store_true", help="ignore a cached bank and render again")
    b.add_argument("--contact-sheet", type=Path, default=None, metavar="PNG",
                   help="also write a PNG grid of 64 templates spread over the bank")
    b.set_defaults(func=_build_handler)


def _build_handler(args: argparse.Namespace) -> int:
    from osop_ros.core.mesh import ObjectModel
    from osop_ros.core.render import Renderer
    from osop_ros.core.templates import TemplateBank, TemplateCache, TemplateConfig
    from osop_ros.core.types import InvalidInputError
    from osop_ros.core.views import ViewGridConfig

    if args.contact_sheet is not None and args.contact_sheet.suffix.lower() != ".png":
        raise InvalidInputError(f"--contact-sheet must name a .png file, got {args.contact_sheet}")
    views = ViewGridConfig() if args.grid is None else ViewGridConfig(*args.grid)
    config = TemplateConfig(views=views, crop_size=args.crop_size)
    model = ObjectModel.load(args.mesh, units=args.units)
    colours = "vertex colours" if model.vertex_colors is not None else "none"
    colours = "texture" if model.texture is not None else colours
    print(f"mesh: {model.path} ({len(model.vertices)} vertices, {len(model.faces)} faces, "
          f"diameter {model.diameter * 1000:.1f} mm, colours: {colours})")
    cache = TemplateCache(args.out)
    path = cache.bank_path(model, config)
    t0 = time.perf_counter()
    bank = None if args.rebuild else cache.get(model, config)
    built = bank is None
    if bank is None:
        with Renderer() as renderer:
            bank = TemplateBank.build(model, renderer, config)
        bank.save(path)
    took = time.perf_counter() - t0
    t1 = time.perf_counter()
    TemplateBank.load(path, expected_key=bank.key)
    reload_s = time.perf_counter() - t1
    size_mb = path.stat().st_size / 1e6
    print(f"bank: {path}")
    print(f"  {'built' if built else 'loaded from cache'} in {took:.2f} s"
          + (f" (rendering {bank.meta['render_s']:.2f} s)" if built else ""))
    print(f"  views: {len(bank)} ({views.n_elevations}x{views.n_azimuths}x{views.n_inplane}), "
          f"crop {bank.crop_size}x{bank.crop_size}")
    print(f"  size on disk: {size_mb:.1f} MB, reload: {reload_s:.2f} s")
    if args.contact_sheet is not None:
        write_contact_sheet(bank, args.contact_sheet)
        print(f"  contact sheet: {args.contact_sheet}")
    return 0


def write_contact_sheet(bank: Any, path: Path, n: int = 64, cols: int = 8) -> Path:
    """PNG grid of ``n`` templates (rgb over dark grey) for a person to look at."""
    from PIL import Image

    from osop_ros.core.templates import make_contact_sheet

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_contact_sheet(bank, n=n, cols=cols)).save(path)
    return path


def benchmark_template_bank(model: ObjectModel, config: TemplateConfig, out_dir: str | Path) -> dict[str, float]:
    """Build ``model``'s bank from scratch into ``out_dir/bank.npz`` and time it.

    Returns build_s (render loop incl. cropping, excl. GL context creation), render_s (time inside
    ``Renderer.render``), renderer_init_s, save_s, size_mb, reload_s, n_views.
    """
    from osop_ros.core.render import Renderer
    from osop_ros.core.templates import BANK_FILENAME, TemplateBank

    path = Path(out_dir) / BANK_FILENAME
    t0 = time.perf_counter()
    renderer = Renderer()
    init_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        bank = TemplateBank.build(model, renderer, config, progress=False)
        build_s = time.perf_counter() - t0
    finally:
        renderer.release()
    t0 = time.perf_counter()
    bank.save(path)
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    TemplateBank.load(path)
    reload_s = time.perf_counter() - t0
    return {
        "build_s": build_s,
        "render_s": float(bank.meta["render_s"]),
        "renderer_init_s": init_s,
        "save_s": save_s,
        "size_mb": path.stat().st_size / 1e6,
        "reload_s": reload_s,
        "n_views": len(bank),
    }
