"""Approximate-time synchronisation of (rgb, depth, camera_info) messages.

:class:`FrameSynchronizer` is what the node uses. It

1. drops messages whose header stamp repeats (``duplicates``) or goes back in time
   (``out_of_order``) on their own input; a backward jump larger than ``reset_jump_s`` (a rosbag
   restarting, a simulator reset) instead resets the synchroniser (``resets``);
2. matches messages across inputs with ``message_filters.ApproximateTimeSynchronizer`` when that
   package is importable, else with :class:`ApproxTimeSync`, a small re-implementation of the same
   policy: every input keeps the newest ``queue_size`` messages keyed by stamp (older ones are
   evicted, counted as ``unmatched``); when a message arrives, the candidates of every other input
   within ``slop`` of it are tried closest first and the first combination whose stamps span at most
   ``slop`` is emitted and removed from the queues;
3. never emits a set whose stamp is not newer than the previous emitted set (``out_of_order``).

Stamps are compared as integer nanoseconds. No rclpy import: unit-testable without DDS.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from osop_ros.core.types import InvalidInputError

ACCEPTED, RESET, DUPLICATE, OUT_OF_ORDER = "accepted", "reset", "duplicate", "out_of_order"


def header_stamp_ns(msg: Any) -> int:
    """``msg.header.stamp`` as integer nanoseconds."""
    st = msg.header.stamp
    return int(st.sec) * 1_000_000_000 + int(st.nanosec)


@dataclass
class SyncStats:
    """Counters of a :class:`FrameSynchronizer` (monotonic, never reset except by ``reset_stats``)."""

    received: list[int] = field(default_factory=list)  # per input
    duplicates: int = 0
    out_of_order: int = 0
    unmatched: int = 0
    synced: int = 0
    resets: int = 0

    def copy(self) -> SyncStats:
        return SyncStats(list(self.received), self.duplicates, self.out_of_order, self.unmatched, self.synced,
                         self.resets)


class ApproxTimeSync:
    """Own approximate-time policy (used when ``message_filters`` is missing). Not thread-safe.

    ``emit(msgs)`` receives one message per input, in input order.
    """

    def __init__(self, n_inputs: int, queue_size: int, slop_ns: int, emit: Callable[[list[Any]], None]) -> None:
        self.queues: list[dict[int, Any]] = [{} for _ in range(n_inputs)]
        self.queue_size = queue_size
        self.slop_ns = slop_ns
        self.emit = emit
        self.evicted = 0

    def clear(self) -> None:
        for q in self.queues:
            q.clear()

    def add(self, index: int, stamp_ns: int, msg: Any) -> None:
        q = self.queues[index]
        q[stamp_ns] = msg
        while len(q) > self.queue_size:
            del q[min(q)]
            self.evicted += 1
        candidates: list[list[int]] = []
        for j, other in enumerate(self.queues):
            if j == index:
                continue
            near = sorted((abs(s - stamp_ns), s) for s in other if abs(s - stamp_ns) <= self.slop_ns)
            if not near:
                return
            candidates.append([s for _, s in near])
        for combo in itertools.product(*candidates):
            stamps = list(combo)
            stamps.insert(index, stamp_ns)
            if max(stamps) - min(stamps) <= self.slop_ns:
                msgs = [self.queues[k].pop(s) for k, s in enumerate(stamps)]
                oldest = min(stamps)
                for other in self.queues:  # anything older than an emitted set can only come out of order
                    for s in [s for s in other if s < oldest]:
                        del other[s]
                        self.evicted += 1
                self.emit(msgs)
                return


class _MessageFiltersBackend:
    """Adapter over ``message_filters.ApproximateTimeSynchronizer`` fed through ``SimpleFilter`` inputs."""

    def __init__(self, mf: Any, n_inputs: int, queue_size: int, slop_s: float,
                 emit: Callable[[list[Any]], None]) -> None:
        self._mf = mf
        self._args = (n_inputs, queue_size, slop_s, emit)
        self.evicted = 0  # message_filters does not report evictions
        self.clear()

    def clear(self) -> None:
        n_inputs, queue_size, slop_s, emit = self._args
        self._inputs = [self._mf.SimpleFilter() for _ in range(n_inputs)]
        self._sync = self._mf.ApproximateTimeSynchronizer(self._inputs, queue_size, slop_s)
        self._sync.registerCallback(lambda *msgs: emit(list(msgs)))

    def add(self, index: int, stamp_ns: int, msg: Any) -> None:
        self._inputs[index].signalMessage(msg)


def _import_message_filters() -> Any | None:
    try:
        import message_filters
    except ImportError:
        return None
    if not hasattr(message_filters, "ApproximateTimeSynchronizer") or not hasattr(message_filters, "SimpleFilter"):
        return None
    return message_filters


class FrameSynchronizer:
    """Thread-safe approximate-time synchroniser with stamp sanity checks (see module docstring).

    callback: called with one message per input (input order) for every synchronised set; it runs
              under the synchroniser lock, so it must be quick (e.g. put the set into a buffer).
    backend:  ``"auto"`` (message_filters if importable), ``"message_filters"`` or ``"builtin"``.
    """

    def __init__(
        self,
        n_inputs: int,
        callback: Callable[[list[Any]], None],
        queue_size: int = 10,
        slop_s: float = 0.05,
        backend: str = "auto",
        reset_jump_s: float = 3.0,
        stamp_fn: Callable[[Any], int] = header_stamp_ns,
    ) -> None:
        if n_inputs < 1:
            raise InvalidInputError(f"need at least one input, got {n_inputs}")
        if queue_size < 1:
            raise InvalidInputError(f"sync queue_size must be >= 1, got {queue_size}")
        if not slop_s >= 0:
            raise InvalidInputError(f"sync slop must be >= 0 seconds, got {slop_s}")
        self.n_inputs = n_inputs
        self.callback = callback
        self.stamp_fn = stamp_fn
        self.reset_jump_ns = int(reset_jump_s * 1e9)
        self._lock = threading.Lock()
        self._last_in: list[int | None] = [None] * n_inputs
        self._last_out: int | None = None
        self._stats = SyncStats(received=[0] * n_inputs)
        mf = _import_message_filters() if backend in ("auto", "message_filters") else None
        if backend == "message_filters" and mf is None:
            raise InvalidInputError("sync backend 'message_filters' requested but message_filters is not importable")
        if backend not in ("auto", "message_filters", "builtin"):
            raise InvalidInputError(f"unknown sync backend {backend!r} (auto, message_filters, builtin)")
        if mf is not None:
            self._backend: ApproxTimeSync | _MessageFiltersBackend = _MessageFiltersBackend(
                mf, n_inputs, queue_size, slop_s, self._on_synced)
            self.backend_name = "message_filters"
        else:
            self._backend = ApproxTimeSync(n_inputs, queue_size, int(round(slop_s * 1e9)), self._on_synced)
            self.backend_name = "builtin"

    @property
    def stats(self) -> SyncStats:
        """Snapshot of the counters."""
        with self._lock:
            s = self._stats.copy()
            s.unmatched += self._backend.evicted
            return s

    def add(self, index: int, msg: Any) -> str:
        """Feed one message of input ``index``.

        Returns ``ACCEPTED``, ``RESET`` (accepted after a large backward jump) or the reason it was
        dropped: ``DUPLICATE`` / ``OUT_OF_ORDER``.
        """
        stamp = self.stamp_fn(msg)
        result = ACCEPTED
        with self._lock:
            self._stats.received[index] += 1
            last = self._last_in[index]
            if last is not None and stamp <= last:
                if last - stamp > self.reset_jump_ns:
                    self._reset_locked()
                    result = RESET
                elif stamp == last:
                    self._stats.duplicates += 1
                    return DUPLICATE
                else:
                    self._stats.out_of_order += 1
                    return OUT_OF_ORDER
            self._last_in[index] = stamp
            self._backend.add(index, stamp, msg)
            return result

    def reset(self) -> None:
        """Forget queued messages and stamp history (counters are kept)."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        self._backend.clear()
        self._last_in = [None] * self.n_inputs
        self._last_out = None
        self._stats.resets += 1

    def _on_synced(self, msgs: Sequence[Any]) -> None:  # called with self._lock held
        stamp = self.stamp_fn(msgs[0])
        if self._last_out is not None and stamp <= self._last_out:
            self._stats.out_of_order += 1
            return
        self._last_out = stamp
        self._stats.synced += 1
        self.callback(list(msgs))


@dataclass
class LossReport:
    """Input losses estimated by :class:`InputLossMonitor` over one evaluation window."""

    received: int  # primary (rgb) messages received
    gaps: int  # primary frames missing from the stamp sequence (stamp-period estimate)
    unpaired: int  # received primary frames that never synchronised (depth/camera_info partner lost)
    period_s: float  # estimated stamp period of the primary input (0 when unknown)

    @property
    def expected(self) -> int:
        return self.received + self.gaps

    @property
    def lost(self) -> int:
        return self.gaps + self.unpaired

    @property
    def rate(self) -> float:
        """Fraction of the camera's frames that did not reach the pipeline's input."""
        return self.lost / self.expected if self.expected else 0.0


class InputLossMonitor:
    """Detects lossy transport (e.g. best-effort QoS dropping large images) from the inputs alone.

    Two symptoms are counted: gaps in the primary input's stamp sequence (the frame slots spanned by
    the stamp steps, at the estimated stamp period, minus the frames seen, so a late frame followed
    by a catch-up burst cancels out; steps longer than both ``max_gap_s`` and ``max_gap_periods``
    periods are a paused stream, not losses) and primary messages that never found their partners
    (the depth image or camera_info of that frame was lost). :meth:`take` evaluates once at least
    ``min_expected`` frames were expected and returns a :class:`LossReport` when the lost fraction
    exceeds ``threshold``. Thread-safe, no rclpy.
    """

    def __init__(self, threshold: float = 0.2, min_expected: int = 20, max_gap_s: float = 1.0,
                 max_gap_periods: int = 20, history: int = 100) -> None:
        self.threshold = threshold
        self.min_expected = min_expected
        self.max_gap_ns = int(max_gap_s * 1e9)
        self.max_gap_periods = max_gap_periods
        self._steps: list[int] = []
        self._history = history
        self._last: int | None = None
        self._lock = threading.Lock()
        self._pending_steps: list[int] = []
        self._received = 0
        self._synced = 0

    def add_primary(self, stamp_ns: int) -> None:
        """One accepted (not duplicate / out-of-order) primary message."""
        with self._lock:
            self._received += 1
            if self._last is not None and stamp_ns > self._last:
                step = stamp_ns - self._last
                self._steps.append(step)
                del self._steps[: -self._history]
                self._pending_steps.append(step)
            self._last = stamp_ns

    def add_synced(self) -> None:
        """One synchronised set (its primary message was paired)."""
        with self._lock:
            self._synced += 1

    def reset_stream(self) -> None:
        """Forget the stamp history (the stream restarted); counts are kept."""
        with self._lock:
            self._last = None
            self._steps.clear()

    def _period_locked(self) -> int:
        """The stamp period: the mean of the shortest common step value (a cluster of steps within
        +15 % of each other holding at least half as many steps as the largest cluster). Loss turns
        steps into multiples of the period, which stays a common step while up to ~75 % of the frames
        are lost; a few short steps (a driver catching up) are not common. 0 while unknown."""
        if len(self._steps) < 5:
            return 0
        steps = sorted(self._steps)
        clusters = [(bisect.bisect_right(steps, 1.15 * s, lo=i) - i, i) for i, s in enumerate(steps)]
        best = max(n for n, _ in clusters)
        n, i = next((n, i) for n, i in clusters if n >= 0.5 * best)
        return round(sum(steps[i : i + n]) / n)

    def take(self) -> LossReport | None:
        """Evaluate the frames seen since the last evaluation; a report only when losses are high."""
        with self._lock:
            period = self._period_locked()
            gaps = 0
            if period:  # frame slots covered by the stamp steps minus the steps seen (pauses excluded)
                max_gap = max(self.max_gap_ns, self.max_gap_periods * period)
                steps = [st for st in self._pending_steps if st <= max_gap]
                gaps = max(0, round(sum(steps) / period) - len(steps))
            report = LossReport(self._received, gaps, max(0, self._received - self._synced), period / 1e9)
            if report.expected < self.min_expected:
                return None  # keep accumulating
            self._pending_steps.clear()
            self._received = self._synced = 0
        return report if report.rate > self.threshold else None
