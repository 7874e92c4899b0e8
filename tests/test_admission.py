"""The waiting-time admission rule on its own, with a hand-driven clock: a queue that drains
within the interval is never shed, one that stands past the target for a whole interval is,
and admission resumes the moment the oldest wait falls under the target."""

from __future__ import annotations

import pytest

from gateway.backpressure import WaitAdmission
from shared.errors import Overloaded


class Queue:
    """The oldest queued request's arrival time, or None when nothing waits."""

    def __init__(self) -> None:
        self.oldest: float | None = None
        self.now = 0.0

    def wait(self, now: float) -> float:
        return 0.0 if self.oldest is None else now - self.oldest


def admission(queue: Queue, target: float = 0.1, interval: float = 1.0) -> WaitAdmission:
    return WaitAdmission(
        queue.wait, target_seconds=target, interval_seconds=interval, clock=lambda: queue.now
    )


def test_a_burst_that_drains_within_the_interval_is_never_shed() -> None:
    queue = Queue()
    gate = admission(queue)
    queue.oldest = 0.0
    for step in range(1, 10):  # above the target for 0.9 s, then the queue is empty
        queue.now = step * 0.1
        gate.check()
    queue.oldest = None
    queue.now = 1.0
    gate.check()
    queue.oldest, queue.now = 1.5, 1.7  # a second burst starts the interval afresh
    gate.check()
    queue.now = 2.6
    gate.check()


def test_a_standing_queue_is_shed_until_it_falls_under_the_target() -> None:
    queue = Queue()
    gate = admission(queue)
    queue.oldest = 0.0
    queue.now = 0.2
    gate.check()  # above the target: the interval starts
    queue.now = 1.19
    gate.check()
    queue.now = 1.2
    with pytest.raises(Overloaded, match="1200 ms"):
        gate.check()
    queue.oldest = 1.15  # drained down to requests 50 ms old: under the target
    gate.check()
    queue.now = 1.3  # above again: a fresh interval, not at once
    gate.check()


def test_target_zero_turns_it_off() -> None:
    queue = Queue()
    gate = admission(queue, target=0.0)
    queue.oldest, queue.now = 0.0, 100.0
    gate.check()
