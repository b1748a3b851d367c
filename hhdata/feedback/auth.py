"""Small security helpers of the web app: constant-time secret checks and a rate limit."""

from __future__ import annotations

import collections
import hmac
import threading
import time


def same_secret(given: str, expected: str) -> bool:
    """True when both are the same non-empty secret (constant time: no timing leak)."""
    return bool(given) and bool(expected) and hmac.compare_digest(str(given), str(expected))


class RateLimit:
    """At most `limit` events per key in any window of `per_seconds` (a sliding window)."""

    def __init__(self, limit: int, per_seconds: float = 60.0):
        self.limit, self.per_seconds = limit, per_seconds
        self._events: dict[object, collections.deque] = collections.defaultdict(collections.deque)
        self._lock = threading.Lock()

    def allow(self, key, now: float | None = None) -> bool:
        """Count one event for key; False (not counted) when the key is over its limit."""
        now = time.monotonic() if now is None else now
        with self._lock:
            events = self._events[key]
            while events and events[0] <= now - self.per_seconds:
                events.popleft()
            if len(events) >= self.limit:
                return False
            events.append(now)
            return True
