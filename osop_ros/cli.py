"""The ``osop`` command line: ``osop <command> [<sub-command>] [options]``.

Every sub-command lives in :mod:`osop_ros.commands` and registers itself through
``register(subparsers)``; handlers import heavy modules (torch, open3d, GL) lazily so that
``osop --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = (
    "osop_ros.commands.templates",
    "osop_ros.commands.data",
    "osop_ros.commands.heldout",
    "osop_ros.commands.train",
    "osop_ros.commands.eval",
    "osop_ros.commands.calibrate",
    "osop_ros.commands.estimate",
    "osop_ros.commands.demo",
    "osop_ros.commands.bench",
)


def build_parser() -> argparse.ArgumentParser:
    """Parser with every registered sub-command."""
    parser = argparse.ArgumentParser(prog="osop", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not implemented in this build
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``osop`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line for expected errors, a traceback with -v
        from osop_ros.core.types import OsopError

        if isinstance(exc, OsopError) and not args.verbose:
            print(f"osop: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
