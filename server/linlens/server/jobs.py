"""Model work of a gRPC call, run on the scheduler and tied to the call: its deadline, its cancellation, its stream.

:class:`JobRunner` submits a work function with a :class:`CancelToken` that the call's deadline and termination set
(a caller who leaves frees the worker at the next check point), waits for it on the gRPC thread (or forwards its
events as they come, for a stream), notes the queue wait on the call's record, and turns a failed job into the
status the call ends with.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Generator
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import grpc

from linlens.contract import StreamEvent
from linlens.server.calls import current_call
from linlens.server.generation import GenerationStopped
from linlens.server.scheduler import CancelToken, Job, Scheduler, StopReason
from linlens.server.status import failure_for

T = TypeVar("T")

#: How often a waiting gRPC thread re-checks its call, as a safety net behind the termination callback.
POLL_S = 0.25


class JobRunner:
    """Runs a call's model work on the scheduler; see the module docstring."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def run(self, context: grpc.ServicerContext, work: Callable[[CancelToken], T]) -> T:
        """Run ``work(token)`` on a worker and return its result (RpcFailure when it fails or is stopped)."""
        job = self._submit(context, work)
        while True:
            try:
                value = job.result(timeout=POLL_S)
                break
            except FutureTimeout:
                self._withdraw_if_gone(job, context)
            except BaseException as exc:
                raise self._failure(job, exc) from None
        current_call().queue_s = job.queue_wait
        return value

    def stream(
        self, context: grpc.ServicerContext, work: Callable[[CancelToken, Callable[[StreamEvent], None]], T]
    ) -> Generator[StreamEvent, None, T]:
        """Run ``work(token, emit)`` on a worker; yield every event it emits as it comes, and return its result."""
        events: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        job = self._submit(context, lambda token: work(token, events.put))
        try:
            while True:
                try:
                    event = events.get(timeout=POLL_S)
                except queue.Empty:
                    if job.done() and events.empty():
                        break
                    self._withdraw_if_gone(job, context)
                    continue
                current_call().queue_s = job.queue_wait
                yield event
            try:
                result = job.result()
            except BaseException as exc:
                raise self._failure(job, exc) from None
            current_call().queue_s = job.queue_wait
            return result
        finally:
            if not job.done():  # the stream was closed early (the caller left): stop the work
                self.scheduler.withdraw(job, job.token.reason or StopReason.CANCELLED)

    # -- plumbing ----------------------------------------------------------------------------------------------

    def _submit(self, context: grpc.ServicerContext, work: Callable[[CancelToken], Any]) -> Job[Any]:
        record = current_call()
        remaining = context.time_remaining()
        # grpc reports "no deadline" as a huge number of seconds
        token = CancelToken.with_timeout(remaining if remaining is not None and remaining < 1e8 else None)
        try:
            job = self.scheduler.submit(work, token, label=f"{record.method}:{record.request_id}")
        except Exception as exc:  # a full queue, a closed scheduler
            raise failure_for(exc, record.request_id) from None

        def on_done() -> None:  # runs when the call ends for any reason; only matters if the job is unfinished
            if job.done():
                return
            reason = token.reason
            if reason is None and token.deadline is not None and time.monotonic() >= token.deadline - 0.05:
                reason = StopReason.DEADLINE_EXCEEDED  # gRPC's timer can fire a hair before ours
            self.scheduler.withdraw(job, reason or StopReason.CANCELLED)

        if not context.add_callback(on_done):
            on_done()  # the call had already ended
        return job

    def _withdraw_if_gone(self, job: Job[Any], context: grpc.ServicerContext) -> None:
        if not context.is_active() or job.token.should_stop():
            self.scheduler.withdraw(job, job.token.reason or StopReason.CANCELLED)

    def _failure(self, job: Job[Any], exc: BaseException) -> Exception:
        record = current_call()
        record.queue_s = job.queue_wait
        if isinstance(exc, GenerationStopped):
            record.completion_tokens = len(exc.tokens)
        return failure_for(exc, record.request_id, job.token.reason)


__all__ = ["POLL_S", "JobRunner"]
