"""Retry policy for transient failures.

Only UNAVAILABLE (server unreachable, restarting, draining) and RESOURCE_EXHAUSTED (queue full) are retried by
default: they mean "the request was not worked on", so repeating it is safe and cannot double any work. A failure the
server marks as final (a request over one of its size limits, :mod:`linlens.contract.retry_hint`) is not retried:
the same request would fail the same way. Backoff is
exponential with jitter so that many clients rejected together do not come back together.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Any

import grpc

from linlens.client.errors import DeadlineExceededError, from_rpc_error, status_code_of
from linlens.contract.retry_hint import is_final

_DEFAULT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a call is repeated after a retryable status.

    The n-th retry (n = 1, 2, ...) waits ``min(max_backoff, initial_backoff * multiplier ** (n - 1))`` seconds,
    scaled by a random factor in ``[1 - jitter, 1 + jitter]``. A call never sleeps past its own deadline.
    """

    #: Attempts in total, the first one included; 1 disables retries.
    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    #: Relative spread of each wait, 0 <= jitter <= 1.
    jitter: float = 0.2
    retryable_codes: tuple[grpc.StatusCode, ...] = _DEFAULT_CODES

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ValueError("backoffs must be >= 0")
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must lie in [0, 1], got {self.jitter}")

    def should_retry(self, code: grpc.StatusCode | None, attempt: int) -> bool:
        """Whether to try again after ``attempt`` (1-based) attempts failed with ``code``."""
        return code is not None and code in self.retryable_codes and attempt < self.max_attempts

    def backoff(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1.0 + spread))


class Attempts:
    """The attempts of one call under a policy and a deadline: how long each may take, and whether and how long to
    wait after a failure. It does no I/O, so the sync and async clients share it and differ only in how they sleep::

        attempts = Attempts(policy, deadline)
        while True:
            try:
                return method(request, timeout=attempts.remaining())
            except grpc.RpcError as error:
                time.sleep(attempts.backoff_after(error))  # raises when the failure is final
    """

    def __init__(self, policy: RetryPolicy, deadline: float | None) -> None:
        self.policy = policy
        #: time.monotonic() value after which the call has failed, or None.
        self.deadline = deadline
        self.attempt = 0

    def remaining(self) -> float | None:
        """Seconds the next attempt may take (None: no deadline); starts that attempt. Raises when none is left."""
        self.attempt += 1
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed between retries")
        return left

    def backoff_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before retrying after ``error``; raises its LinlensError when it is not to be retried."""
        if not self.policy.should_retry(status_code_of(error), self.attempt) or _marked_final(error):
            raise from_rpc_error(error) from error
        wait = self.policy.backoff(self.attempt)
        if self.deadline is not None and time.monotonic() + wait >= self.deadline:
            raise from_rpc_error(error) from error
        return wait


def _marked_final(error: grpc.RpcError) -> bool:
    """Whether the server said that repeating this request cannot succeed."""
    trailing: Any = getattr(error, "trailing_metadata", None)
    return callable(trailing) and is_final(trailing())


#: The policy clients use unless told otherwise.
DEFAULT_RETRY = RetryPolicy()
#: A policy that never retries.
NO_RETRY = RetryPolicy(max_attempts=1)
