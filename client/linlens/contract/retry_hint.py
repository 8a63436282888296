"""The server's word on whether a failed request is worth repeating, beyond its status code.

RESOURCE_EXHAUSTED means two things in gRPC: "not now" (a full queue, too many open streams: retry later) and "never
here" (a request larger than this server's limits: the same bytes fail the same way every time). The server marks
the second kind with this trailing metadata entry, and the SDK's retry loop does not repeat such a call.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: Trailing metadata key and value of a failure that repeating the same request cannot fix.
NO_RETRY_KEY = "linlens-retry"
NO_RETRY_VALUE = "never"


def is_final(trailing_metadata: Iterable[Any] | None) -> bool:
    """Whether a call's trailing metadata (pairs, or objects with ``key``/``value``) marks its failure as final."""
    for entry in trailing_metadata or ():
        key, value = (entry.key, entry.value) if hasattr(entry, "key") else entry
        if key == NO_RETRY_KEY and value == NO_RETRY_VALUE:
            return True
    return False
