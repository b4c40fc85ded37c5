"""Approximate-time synchroniser: matching, queue limits, duplicated/out-of-order stamps (no DDS)."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace
from typing import Any

import pytest

from osop_ros.core.types import InvalidInputError
from osop_ros.ros.sync import (
    ACCEPTED,
    DUPLICATE,
    OUT_OF_ORDER,
    RESET,
    ApproxTimeSync,
    FrameSynchronizer,
)

MS = 1_000_000


def msg(stamp_ms: float, tag: str = "") -> SimpleNamespace:
    ns = int(round(stamp_ms * MS))
    return SimpleNamespace(header=SimpleNamespace(stamp=SimpleNamespace(sec=ns // 10**9, nanosec=ns % 10**9)), tag=tag)


def stamps_ms(out: list[list[Any]]) -> list[list[float]]:
    return [[(m.header.stamp.sec * 10**9 + m.header.stamp.nanosec) / MS for m in s] for s in out]


def make(n: int = 3, **kw: Any) -> tuple[FrameSynchronizer, list[list[Any]]]:
    out: list[list[Any]] = []
    kw.setdefault("backend", "builtin")
    return FrameSynchronizer(n, out.append, **kw), out


def test_exact_and_approximate_matches() -> None:
    sync, out = make(slop_s=0.01)
    sync.add(0, msg(100))
    sync.add(1, msg(100))
    assert out == []
    sync.add(2, msg(100))
    assert stamps_ms(out) == [[100, 100, 100]]
    sync.add(0, msg(133))
    sync.add(2, msg(140))
    sync.add(1, msg(128))  # spread 12 ms > 10 ms slop: no set
    assert len(out) == 1
    sync.add(1, msg(135))  # 133/135/140 spans 7 ms
    assert stamps_ms(out)[-1] == [133, 135, 140]
    assert sync.stats.synced == 2


def test_zero_slop_is_exact_sync() -> None:
    sync, out = make(2, slop_s=0.0)
    sync.add(0, msg(10))
    sync.add(1, msg(10.000001))
    assert out == []
    sync.add(1, msg(20))
    sync.add(0, msg(20))
    assert stamps_ms(out) == [[20, 20]]


def test_closest_candidate_wins() -> None:
    sync, out = make(2, slop_s=0.02)
    for s in (90, 96, 103):
        sync.add(1, msg(s))
    sync.add(0, msg(100))
    assert stamps_ms(out) == [[100, 103]]


def test_queue_size_evicts_oldest() -> None:
    sync, out = make(2, slop_s=0.005, queue_size=2)
    for s in (10, 20, 30):
        sync.add(0, msg(s))
    sync.add(1, msg(10))  # 10 was evicted from input 0
    assert out == []
    sync.add(1, msg(30))
    assert stamps_ms(out) == [[30, 30]]
    assert sync.stats.unmatched >= 1


def test_duplicates_and_out_of_order_dropped_and_counted() -> None:
    sync, out = make(2, slop_s=0.005)
    assert sync.add(0, msg(100, "a")) == ACCEPTED
    assert sync.add(0, msg(100, "b")) == DUPLICATE
    assert sync.add(0, msg(90)) == OUT_OF_ORDER
    assert sync.add(1, msg(100)) == ACCEPTED
    assert [m.tag for m in out[0]] == ["a", ""]  # the duplicate did not replace the first message
    st = sync.stats
    assert (st.duplicates, st.out_of_order, st.received) == (1, 1, [3, 1])


def test_never_emits_older_set_than_previous() -> None:
    sync, out = make(2, slop_s=0.05)
    sync.add(0, msg(100))
    sync.add(0, msg(200))
    sync.add(1, msg(205))  # -> (200, 205)
    sync.add(1, msg(210))  # input 1 in order, but the only partner left is 100 (too old): no older set
    assert stamps_ms(out) == [[200, 205]]
    sync.add(0, msg(300))
    sync.add(1, msg(301))
    assert stamps_ms(out) == [[200, 205], [300, 301]]


def test_large_backward_jump_resets() -> None:
    sync, out = make(2, slop_s=0.005, reset_jump_s=1.0)
    sync.add(0, msg(10_000))
    sync.add(1, msg(10_000))
    assert sync.add(0, msg(500)) == RESET  # bag restarted
    sync.add(1, msg(500))
    assert stamps_ms(out) == [[10_000, 10_000], [500, 500]]
    assert sync.stats.resets == 1


def test_approx_time_sync_class_directly() -> None:
    out: list[list[Any]] = []
    core = ApproxTimeSync(3, queue_size=5, slop_ns=5 * MS, emit=out.append)
    core.add(0, 100 * MS, "rgb")
    core.add(2, 103 * MS, "info")
    core.add(1, 101 * MS, "depth")
    assert out == [["rgb", "depth", "info"]]
    assert all(not q for q in core.queues)


def test_invalid_arguments() -> None:
    with pytest.raises(InvalidInputError):
        FrameSynchronizer(0, print)
    with pytest.raises(InvalidInputError):
        FrameSynchronizer(2, print, queue_size=0)
    with pytest.raises(InvalidInputError):
        FrameSynchronizer(2, print, slop_s=-1)
    with pytest.raises(InvalidInputError):
        FrameSynchronizer(2, print, backend="magic")


def test_message_filters_backend_used_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a stand-in ``message_filters`` module the adapter feeds it through SimpleFilter inputs."""
    calls: dict[str, Any] = {}

    class SimpleFilter:
        def __init__(self) -> None:
            self.callbacks: list[Any] = []

        def registerCallback(self, cb: Any, *args: Any) -> None:  # noqa: N802 - message_filters API
            self.callbacks.append((cb, args))

        def signalMessage(self, *m: Any) -> None:  # noqa: N802
            for cb, args in self.callbacks:
                cb(*(m + args))

    class ApproximateTimeSynchronizer(SimpleFilter):
        def __init__(self, fs: list[SimpleFilter], queue_size: int, slop: float) -> None:
            super().__init__()
            calls["args"] = (len(fs), queue_size, slop)
            self.latest: dict[int, Any] = {}
            for i, f in enumerate(fs):
                f.registerCallback(self.add, i)

        def add(self, m: Any, i: int) -> None:  # toy policy: emit when every input has one message
            self.latest[i] = m
            if len(self.latest) == calls["args"][0]:
                self.signalMessage(*[self.latest.pop(k) for k in sorted(self.latest)])

    fake = types.ModuleType("message_filters")
    fake.SimpleFilter = SimpleFilter
    fake.ApproximateTimeSynchronizer = ApproximateTimeSynchronizer
    monkeypatch.setitem(sys.modules, "message_filters", fake)
    sync, out = make(2, slop_s=0.03, queue_size=7, backend="auto")
    assert sync.backend_name == "message_filters" and calls["args"] == (2, 7, 0.03)
    sync.add(0, msg(100))
    assert sync.add(0, msg(100)) == DUPLICATE  # stamp checks happen before message_filters
    sync.add(1, msg(101))
    assert stamps_ms(out) == [[100, 101]]


def test_message_filters_backend_requested_but_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "message_filters", None)
    with pytest.raises(InvalidInputError, match="not importable"):
        FrameSynchronizer(2, print, backend="message_filters")
    assert FrameSynchronizer(2, print, backend="auto").backend_name == "builtin"
