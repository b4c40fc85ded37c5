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
    InputLossMonitor,
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


# ------------------------------------------------------------------------------------ input loss detector
def feed(mon: InputLossMonitor, stamps_ms: list[float], synced: int) -> None:
    for s in stamps_ms:
        mon.add_primary(int(round(s * MS)))
    for _ in range(synced):
        mon.add_synced()


def test_loss_monitor_quiet_on_a_clean_stream() -> None:
    mon = InputLossMonitor(threshold=0.2, min_expected=20)
    stamps = [33.3 * i for i in range(60)]
    feed(mon, stamps, synced=60)
    assert mon.take() is None


def test_loss_monitor_detects_stamp_gaps() -> None:
    """~5 of 20 frames delivered (what best-effort 640x480 over FastDDS did): the loss is seen from the
    rgb stamps alone (steps of 1..7 periods of 200 ms, 2 ms stamp jitter)."""
    steps = [1, 3, 5, 4, 2, 7, 1, 6, 3, 4] * 3
    idx = [0]
    for k in steps:
        idx.append(idx[-1] + k)
    jitter = [(-1.0) ** i * 2.0 for i in range(len(idx))]
    mon = InputLossMonitor(threshold=0.2, min_expected=20)
    feed(mon, [200.0 * i + j for i, j in zip(idx, jitter, strict=True)], synced=len(idx))
    rep = mon.take()
    assert rep is not None
    assert rep.period_s == pytest.approx(0.2, rel=0.03)
    assert rep.received == len(idx) and rep.unpaired == 0
    assert rep.expected == pytest.approx(idx[-1] + 1, rel=0.03)  # the missing frames are counted
    assert rep.rate == pytest.approx(1 - len(idx) / (idx[-1] + 1), abs=0.03)


def test_loss_monitor_detects_rgb_without_partners() -> None:
    mon = InputLossMonitor(threshold=0.2, min_expected=20)
    feed(mon, [100.0 * i for i in range(30)], synced=15)  # depth/camera_info of half the frames lost
    rep = mon.take()
    assert rep is not None and rep.gaps == 0 and rep.unpaired == 15 and rep.rate == pytest.approx(0.5)


def test_loss_monitor_ignores_pauses_and_waits_for_enough_frames() -> None:
    mon = InputLossMonitor(threshold=0.2, min_expected=20, max_gap_s=1.0)
    feed(mon, [100.0 * i for i in range(10)], synced=10)
    assert mon.take() is None  # 10 < min_expected: keeps accumulating
    feed(mon, [5000.0 + 100.0 * i for i in range(15)], synced=15)  # a 4 s pause (40 periods) is not a loss
    assert mon.take() is None
    mon.reset_stream()
    feed(mon, [100.0 * i for i in range(25)], synced=25)  # stamps restarted (rosbag loop)
    assert mon.take() is None


def test_loss_monitor_not_fooled_by_late_frames_and_bursts() -> None:
    """A publisher that falls behind and catches up (short stamp steps, as seen on a loaded machine with
    reliable QoS and no frame lost) must not look like loss (it once estimated 65 Hz for a 5 Hz stream)."""
    stamps, t = [], 0.0
    for i in range(60):
        if i % 10 == 5:
            t += 600.0  # late ...
        elif i % 10 in (6, 7):
            t += 15.0  # ... then two frames back to back
        else:
            t += 200.0
        stamps.append(t)
    mon = InputLossMonitor(threshold=0.2, min_expected=20)
    feed(mon, stamps, synced=len(stamps))
    assert mon.take() is None
    assert mon._period_locked() == pytest.approx(200 * MS)
