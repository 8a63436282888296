"""Bounded execution of model work, off the gRPC threads, with cancellation.

Why a scheduler of our own rather than a bare ThreadPoolExecutor:

- the queue must be *bounded*: when it is full a new request is refused at once (RESOURCE_EXHAUSTED) so that clients
  back off, instead of waiting behind minutes of queued explanations;
- a request whose caller has gone away (cancelled, deadline passed) must leave the queue immediately and, when it is
  already running, stop at the next check point (between generated tokens, between vector-Jacobian products) so that
  its worker and memory are free for the next request;
- queue wait is a number operators need (it is reported in every response and in metrics).

A gRPC handler thread submits a function, then waits for the job while watching its :class:`CancelToken`; the
function runs on one of ``workers`` threads and polls the same token through ``token.should_stop``.
"""

from __future__ import annotations

import collections
import enum
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Generic, TypeVar

T = TypeVar("T")

_log = logging.getLogger(__name__)


class StopReason(str, enum.Enum):
    """Why a job was asked to stop; the service maps it to a gRPC status."""

    CANCELLED = "cancelled"  # the client cancelled the call (or the connection dropped)
    DEADLINE_EXCEEDED = "deadline_exceeded"  # the call's deadline passed
    SHUTDOWN = "shutdown"  # the server is shutting down and the grace period is over


class CancelToken:
    """A one-way flag that tells running work to stop, with the reason, plus an optional deadline.

    The deadline is checked lazily in :meth:`should_stop`, so work notices a passed deadline even when no callback
    fires (gRPC's own deadline callback can come late on a busy server).
    """

    def __init__(self, deadline: float | None = None) -> None:
        #: time.monotonic() value after which the work is no longer wanted, or None.
        self.deadline = deadline
        self._event = threading.Event()
        self._reason: StopReason | None = None
        self._lock = threading.Lock()

    @classmethod
    def with_timeout(cls, seconds: float | None) -> CancelToken:
        return cls(None if seconds is None else time.monotonic() + seconds)

    def cancel(self, reason: StopReason = StopReason.CANCELLED) -> None:
        """Ask the work to stop. The first reason wins; later calls change nothing."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
        self._event.set()

    @property
    def reason(self) -> StopReason | None:
        """Why the work should stop, or None while it is still wanted."""
        if self._reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.cancel(StopReason.DEADLINE_EXCEEDED)
        return self._reason

    def should_stop(self) -> bool:
        """The polling predicate handed to the engine and to generation's stopping criteria."""
        return self.reason is not None

    def remaining(self) -> float | None:
        """Seconds until the deadline (never negative), or None without one."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    def wait(self, timeout: float | None) -> bool:
        """Sleep until cancelled or ``timeout`` seconds pass; True if cancelled."""
        remaining = self.remaining()
        if remaining is not None:
            timeout = remaining if timeout is None else min(timeout, remaining)
        self._event.wait(timeout)
        return self.should_stop()


class JobStopped(Exception):
    """The job stopped (or never started) because its token was cancelled."""

    def __init__(self, reason: StopReason) -> None:
        super().__init__(f"job stopped: {reason.value}")
        self.reason = reason


class QueueFullError(Exception):
    """The queue holds ``max_queue`` waiting jobs already."""

    def __init__(self, max_queue: int, running: int) -> None:
        super().__init__(
            f"the server is busy: {running} job(s) running and {max_queue} waiting, which is the queue limit; "
            "retry with backoff, or raise max_queue / max_concurrent_jobs on the server"
        )
        self.max_queue = max_queue


class SchedulerClosed(Exception):
    """The scheduler no longer accepts jobs (the server is draining)."""


class Job(Generic[T]):
    """One unit of model work: its function, its token, its result and when it waited and ran."""

    def __init__(self, fn: Callable[[CancelToken], T], token: CancelToken, label: str) -> None:
        self.fn = fn
        self.token = token
        self.label = label
        self.future: Future[T] = Future()
        self.enqueued_at = time.monotonic()
        self.started_at: float | None = None
        self.finished_at: float | None = None

    @property
    def queue_wait(self) -> float:
        """Seconds between submission and start (up to now while still queued)."""
        end = self.started_at if self.started_at is not None else time.monotonic()
        return end - self.enqueued_at

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> T:
        """Block for the outcome: the value, or the function's exception, or JobStopped."""
        return self.future.result(timeout)


class Scheduler:
    """A fixed set of worker threads fed from a bounded FIFO queue.

    ``max_queue`` counts jobs *waiting*, not running: with 1 worker and max_queue 16, 17 jobs can be accepted.
    ``on_queue_depth`` is called (outside the lock) with the new number of waiting jobs whenever it changes.
    """

    def __init__(
        self,
        workers: int,
        max_queue: int,
        *,
        on_queue_depth: Callable[[int], None] | None = None,
        name: str = "linlens-worker",
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        if max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        self.workers = workers
        self.max_queue = max_queue
        self._on_queue_depth = on_queue_depth
        self._queue: collections.deque[Job[object]] = collections.deque()
        self._cond = threading.Condition()
        self._running = 0
        self._active: set[Job[object]] = set()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    # --- submission ---------------------------------------------------------------------------------------------

    def submit(self, fn: Callable[[CancelToken], T], token: CancelToken, label: str = "job") -> Job[T]:
        """Queue ``fn(token)``; raise QueueFullError or SchedulerClosed instead of queueing past the limits."""
        job: Job[T] = Job(fn, token, label)
        with self._cond:
            if self._closed:
                raise SchedulerClosed("the server is shutting down and accepts no new work")
            idle = self.workers - self._running - len(self._queue)
            if idle <= 0 and len(self._queue) >= self.max_queue:
                raise QueueFullError(self.max_queue, self._running)
            self._queue.append(job)  # type: ignore[arg-type]
            depth = len(self._queue)
            self._cond.notify()
        self._report_depth(depth)
        return job

    def withdraw(self, job: Job[T], reason: StopReason) -> None:
        """Cancel ``job``: drop it from the queue if it is still waiting, else ask it to stop at its next check."""
        job.token.cancel(reason)
        removed = False
        with self._cond:
            try:
                self._queue.remove(job)  # type: ignore[arg-type]
                removed = True
            except ValueError:
                pass
            depth = len(self._queue)
        if removed:
            job.future.set_exception(JobStopped(reason))
            self._report_depth(depth)

    # --- state --------------------------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    @property
    def running(self) -> int:
        with self._cond:
            return self._running

    def close(self) -> None:
        """Accept no new jobs; queued and running ones still complete (the drain)."""
        with self._cond:
            self._closed = True

    def cancel_all(self, reason: StopReason = StopReason.SHUTDOWN) -> None:
        """Stop everything: drop queued jobs and ask running ones to stop (the end of the grace period)."""
        with self._cond:
            pending = list(self._queue)
            self._queue.clear()
            self._closed = True
            active = list(self._active)
        for job in pending:
            job.token.cancel(reason)
            job.future.set_exception(JobStopped(reason))
        for job in active:
            job.token.cancel(reason)
        self._report_depth(0)

    def wait_idle(self, timeout: float | None) -> bool:
        """Wait until no job is queued or running; True if that happened within ``timeout`` seconds."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
            return True

    # --- workers ------------------------------------------------------------------------------------------------

    def _report_depth(self, depth: int) -> None:
        if self._on_queue_depth is not None:
            try:
                self._on_queue_depth(depth)
            except Exception:  # a metrics hook must never break scheduling
                _log.exception("queue-depth hook failed")

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                job = self._queue.popleft()
                self._running += 1
                self._active.add(job)
                depth = len(self._queue)
            self._report_depth(depth)
            try:
                self._run(job)
            finally:
                with self._cond:
                    self._running -= 1
                    self._active.discard(job)
                    self._cond.notify_all()

    @staticmethod
    def _run(job: Job[object]) -> None:
        job.started_at = time.monotonic()
        try:
            reason = job.token.reason
            if reason is not None:  # the caller left while the job waited
                job.future.set_exception(JobStopped(reason))
                return
            if not job.future.set_running_or_notify_cancel():
                return
            try:
                value = job.fn(job.token)
            except BaseException as exc:  # handed to the waiting RPC thread, which maps it to a status
                job.future.set_exception(exc)
            else:
                job.future.set_result(value)
        finally:
            job.finished_at = time.monotonic()


class Lanes:
    """Several schedulers seen as one by the server's lifecycle: the explanation workers and the generation lane.

    ``running`` and ``queued`` are the sums; closing, cancelling and waiting act on every lane.
    """

    def __init__(self, *lanes: Scheduler) -> None:
        self.lanes = lanes

    @property
    def running(self) -> int:
        return sum(lane.running for lane in self.lanes)

    @property
    def queued(self) -> int:
        return sum(lane.queued for lane in self.lanes)

    def close(self) -> None:
        for lane in self.lanes:
            lane.close()

    def cancel_all(self, reason: StopReason = StopReason.SHUTDOWN) -> None:
        for lane in self.lanes:
            lane.cancel_all(reason)

    def wait_idle(self, timeout: float | None) -> bool:
        end = None if timeout is None else time.monotonic() + timeout
        for lane in self.lanes:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not lane.wait_idle(left):
                return False
        return True


__all__ = [
    "CancelToken",
    "Job",
    "JobStopped",
    "Lanes",
    "QueueFullError",
    "Scheduler",
    "SchedulerClosed",
    "StopReason",
]
