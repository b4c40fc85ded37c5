"""Per-kind warning throttle of the node (issue 13.6; no DDS)."""

from __future__ import annotations

from osop_ros.ros.throttle import WarnThrottle, error_kind


def test_kinds_are_throttled_independently() -> None:
    th = WarnThrottle(5.0)
    assert th.offer("a", "A1", 0.0) == "A1"
    assert th.offer("a", "A2", 1.0) is None
    assert th.offer("a", "A3", 2.0) is None
    assert th.offer("b", "B1", 2.5) == "B1"  # another kind: logged, without A's count
    assert th.offer("a", "A4", 6.0) == "A4 (2 similar suppressed)"  # A's count on A's next message
    assert th.offer("b", "B2", 6.0) is None


def test_flush_reports_the_last_burst_once() -> None:
    th = WarnThrottle(lambda: 2.0)
    th.offer("a", "A1", 0.0)
    for t in (0.5, 1.0, 1.5):
        th.offer("a", f"A@{t}", t)
    assert th.flush(1.9) == []  # not due yet
    assert th.flush(2.0) == [("A@1.5 (3 similar in the last 1.5 s)", False)]
    assert th.flush(10.0) == []  # reported once
    assert th.suppressed("a") == 0
    assert th.offer("a", "A5", 3.0) is None  # the flush counts as a log of the kind


def test_once_and_error_kinds() -> None:
    th = WarnThrottle(0.0)
    assert th.offer("model", "M1", 0.0, once=True) == "M1"
    assert th.offer("model", "M2", 100.0, once=True) is None
    assert th.flush(1000.0) == []  # once-kinds are never flushed
    assert th.suppressed("model") == 1
    th = WarnThrottle(5.0)
    th.offer("w", "W1", 0.0, error=True)
    th.offer("w", "W2", 1.0, error=True)
    assert th.flush(6.0) == [("W2 (1 similar in the last 5.0 s)", True)]


def test_error_kind_masks_values() -> None:
    a = error_kind(ValueError("depth image is 32x24 but rgb is 64x48"))
    b = error_kind(ValueError("depth image is 16x12 but rgb is 640x480"))
    c = error_kind(ValueError("colour image has encoding 'yuv422'; expected one of rgb8"))
    d = error_kind(ValueError("colour image has encoding 'nv12'; expected one of rgb8"))
    assert a == b and c == d and a != c
    assert error_kind(KeyError("x")) != error_kind(ValueError("x"))
