"""Route the ``osop_ros`` Python loggers (core, conversions, ...) through a node's rclpy logger.

The core logs with :mod:`logging` (template building, cache hits, onboarding). While a node runs,
:func:`attach` installs one :class:`RclpyLogHandler` on the ``osop_ros`` logger: records then go to
the node's rclpy logger, i.e. to the console, ``/rosout`` and the ROS log files, and honour
``--log-level`` (the Python logger level follows the node logger's effective level). Propagation to
the root logger is switched off meanwhile, so nothing is printed twice. :func:`detach` (at node
shutdown) restores the previous state when the last node detaches.

Several nodes in one process: a record goes to the node whose worker thread emitted it, else to the
most recently attached node.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

ROOT_LOGGER = "osop_ros"


@dataclass(eq=False)
class _Target:
    logger: Any  # rclpy RcutilsLogger
    thread: threading.Thread | None


class RclpyLogHandler(logging.Handler):
    """``logging.Handler`` forwarding records to rclpy loggers; severities map one to one
    (DEBUG, INFO, WARN(ING), ERROR, FATAL/CRITICAL share their numeric values)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.targets: list[_Target] = []

    def _logger_for(self, thread: threading.Thread) -> Any | None:
        targets = list(self.targets)
        for t in targets:
            if t.thread is thread:
                return t.logger
        return targets[-1].logger if targets else None

    def emit(self, record: logging.LogRecord) -> None:
        logger = self._logger_for(threading.current_thread())
        if logger is None:
            return
        try:
            text = f"[{record.name}] {self.format(record)}"
            # one call site per severity: rclpy refuses a second severity from the same line
            if record.levelno >= logging.CRITICAL:
                logger.fatal(text)
            elif record.levelno >= logging.ERROR:
                logger.error(text)
            elif record.levelno >= logging.WARNING:
                logger.warning(text)
            elif record.levelno >= logging.INFO:
                logger.info(text)
            else:
                logger.debug(text)
        except Exception:  # noqa: BLE001 - logging must never raise (e.g. during shutdown)
            pass


_lock = threading.Lock()
_handler: RclpyLogHandler | None = None
_saved: tuple[int, bool] = (logging.NOTSET, True)


def python_level(rclpy_logger: Any) -> int:
    """The Python logging level matching an rclpy logger's effective severity."""
    level = int(rclpy_logger.get_effective_level())
    return level if level > 0 else logging.INFO


def _apply_level_locked(handler: RclpyLogHandler) -> None:
    levels = [python_level(t.logger) for t in handler.targets]
    logging.getLogger(ROOT_LOGGER).setLevel(min(levels) if levels else _saved[0])


def attach(rclpy_logger: Any, thread: threading.Thread | None = None) -> object:
    """Start forwarding ``osop_ros.*`` records to ``rclpy_logger``; returns a token for :func:`detach`.
    ``thread``: records emitted on this thread always go to this logger (the node's worker)."""
    global _handler, _saved
    target = _Target(rclpy_logger, thread)
    with _lock:
        py_logger = logging.getLogger(ROOT_LOGGER)
        if _handler is None:
            _saved = (py_logger.level, py_logger.propagate)
            _handler = RclpyLogHandler()
            py_logger.addHandler(_handler)
            py_logger.propagate = False
        _handler.targets.append(target)
        _apply_level_locked(_handler)
    return target


def detach(token: object) -> None:
    """Stop forwarding to the logger of ``token``; the last detach removes the handler. Idempotent."""
    global _handler
    with _lock:
        if _handler is None or token not in _handler.targets:
            return
        _handler.targets.remove(token)
        py_logger = logging.getLogger(ROOT_LOGGER)
        if not _handler.targets:
            py_logger.removeHandler(_handler)
            _handler = None
            py_logger.setLevel(_saved[0])
            py_logger.propagate = _saved[1]
        else:
            _apply_level_locked(_handler)


def installed_handler() -> RclpyLogHandler | None:
    """The handler currently installed on the ``osop_ros`` logger (tests)."""
    return _handler
