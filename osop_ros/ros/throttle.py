"""Per-kind warning throttle for the node (no rclpy: unit-testable).

Every warning has a *kind* (``input.<error kind>``, ``camera_info``, ``stamps``, ...). A kind is logged
at most once per period; the warnings of that kind suppressed meanwhile are reported on that kind's
next logged message (``(N similar suppressed)``) or, when none follows, by :meth:`WarnThrottle.flush`
(called periodically), so the last burst of a kind is never lost and never attributed to another kind.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|[-+]?\d[\w.+-]*|\b(?:nan|inf)\b", re.IGNORECASE)


def error_kind(exc: BaseException) -> str:
    """A throttle kind for an exception: its class and message with values (quoted strings, numbers,
    sizes such as ``64x48``) masked, so that the same check failing on different values is one kind."""
    return f"{type(exc).__name__}: {_VARIABLE.sub('#', str(exc))[:80]}"


@dataclass
class _Kind:
    last_logged: float
    suppressed: int = 0
    first_suppressed: float = 0.0
    last_message: str = ""
    error: bool = False
    once: bool = False


class WarnThrottle:
    """Decides which warnings are logged now; thread-safe.

    ``period`` is a number of seconds or a callable returning it (a live parameter).
    """

    def __init__(self, period: float | Callable[[], float]) -> None:
        self._period = period if callable(period) else (lambda: float(period))
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    def offer(self, kind: str, message: str, now: float, *, error: bool = False, once: bool = False) -> str | None:
        """The text to log now for this warning, or None when it is suppressed.

        ``once``: log only the first warning of this kind ever (later ones are counted, never flushed).
        """
        with self._lock:
            k = self._kinds.get(kind)
            if k is None:
                self._kinds[kind] = _Kind(last_logged=now, error=error, once=once)
                return message
            if k.once or now - k.last_logged < self._period():
                if not k.suppressed:
                    k.first_suppressed = now
                k.suppressed += 1
                k.last_message, k.error = message, error
                return None
            n, k.suppressed, k.last_logged, k.error = k.suppressed, 0, now, error
        return message + (f" ({n} similar suppressed)" if n else "")

    def flush(self, now: float) -> list[tuple[str, bool]]:
        """``(text, is_error)`` for every kind whose suppressed warnings are due (period elapsed since
        it was last logged) and that no newer message of the same kind reported."""
        out = []
        period = self._period()
        with self._lock:
            for k in self._kinds.values():
                if k.once or not k.suppressed or now - k.last_logged < period:
                    continue
                out.append((f"{k.last_message} ({k.suppressed} similar in the last "
                            f"{now - k.first_suppressed:.1f} s)", k.error))
                k.suppressed, k.last_logged = 0, now
        return out

    def suppressed(self, kind: str) -> int:
        """Warnings of ``kind`` suppressed and not reported yet."""
        with self._lock:
            k = self._kinds.get(kind)
            return k.suppressed if k else 0
