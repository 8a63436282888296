"""The job scheduler on its own (no model, no gRPC): the queue bound, withdrawing queued and running jobs, deadlines
noticed by polling, and the drain operations. Jobs here are plain functions that poll their token like generation
and the engine do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from linlens.server.scheduler import (
    CancelToken,
    JobStopped,
    QueueFullError,
    Scheduler,
    SchedulerClosed,
    StopReason,
)

pytestmark = pytest.mark.timeout(60)


def blocker(release: threading.Event) -> Callable[[CancelToken], str]:
    """A job that runs until released or stopped, polling its token like real work does."""

    def work(token: CancelToken) -> str:
        while not release.is_set():
            if token.should_stop():
                raise JobStopped(token.reason or StopReason.CANCELLED)
            time.sleep(0.005)
        return "done"

    return work


def test_queue_bound_counts_waiting_jobs_only_and_reports_depth() -> None:
    depths: list[int] = []
    scheduler = Scheduler(workers=1, max_queue=1, on_queue_depth=depths.append)
    release = threading.Event()
    running = scheduler.submit(blocker(release), CancelToken())
    deadline = time.monotonic() + 5
    while scheduler.running != 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    waiting = scheduler.submit(blocker(release), CancelToken())
    assert scheduler.queued == 1
    with pytest.raises(QueueFullError, match="queue limit"):
        scheduler.submit(blocker(release), CancelToken())
    release.set()
    assert running.result(5) == "done" and waiting.result(5) == "done"
    assert waiting.queue_wait > 0 and 1 in depths and depths[-1] == 0
    assert scheduler.wait_idle(5)


def test_withdrawing_a_queued_job_frees_its_slot_at_once() -> None:
    scheduler = Scheduler(workers=1, max_queue=1)
    release = threading.Event()
    first = scheduler.submit(blocker(release), CancelToken())
    while scheduler.running != 1:
        time.sleep(0.005)
    queued = scheduler.submit(blocker(release), CancelToken())
    scheduler.withdraw(queued, StopReason.CANCELLED)
    with pytest.raises(JobStopped) as info:
        queued.result(1)
    assert info.value.reason is StopReason.CANCELLED and scheduler.queued == 0
    again = scheduler.submit(blocker(release), CancelToken())  # the slot is free again
    scheduler.withdraw(first, StopReason.DEADLINE_EXCEEDED)  # a running job stops at its next check
    with pytest.raises(JobStopped) as info:
        first.result(5)
    assert info.value.reason is StopReason.DEADLINE_EXCEEDED
    release.set()
    assert again.result(5) == "done"


def test_a_deadline_is_noticed_by_polling_and_skips_queued_work() -> None:
    token = CancelToken.with_timeout(0.05)
    assert not token.should_stop() and token.remaining() is not None
    assert token.wait(5) and token.reason is StopReason.DEADLINE_EXCEEDED
    scheduler = Scheduler(workers=1, max_queue=4)
    ran = threading.Event()
    job = scheduler.submit(lambda t: ran.set(), CancelToken(deadline=time.monotonic() - 1))
    with pytest.raises(JobStopped):
        job.result(5)
    assert not ran.is_set()


def test_close_refuses_new_jobs_and_cancel_all_stops_running_ones() -> None:
    scheduler = Scheduler(workers=1, max_queue=2)
    release = threading.Event()
    running = scheduler.submit(blocker(release), CancelToken())
    queued = scheduler.submit(blocker(release), CancelToken())
    scheduler.close()
    with pytest.raises(SchedulerClosed):
        scheduler.submit(blocker(release), CancelToken())
    scheduler.cancel_all(StopReason.SHUTDOWN)
    for job in (running, queued):
        with pytest.raises(JobStopped) as info:
            job.result(5)
        assert info.value.reason is StopReason.SHUTDOWN
    assert scheduler.wait_idle(5)


def test_a_failing_job_hands_its_exception_to_the_waiter() -> None:
    scheduler = Scheduler(workers=2, max_queue=0)

    def boom(token: CancelToken) -> None:
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        scheduler.submit(boom, CancelToken()).result(5)
    assert scheduler.submit(lambda t: 42, CancelToken()).result(5) == 42
