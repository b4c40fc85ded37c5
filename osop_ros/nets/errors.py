"""Errors of :mod:`osop_ros.nets` (the core wraps them into its own ``OsopError``)."""

from __future__ import annotations


class NetsError(RuntimeError):
    """Base of the errors of :mod:`osop_ros.nets`."""


class CheckpointError(NetsError):
    """A weights file is missing, unreadable or of the wrong architecture."""
