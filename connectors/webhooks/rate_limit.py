"""Request allowances: a token bucket per route, and one per peer address for invalid signatures."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """Allows ``count`` requests per ``seconds`` on average, with bursts up to ``count``."""

    def __init__(self, count: int, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._capacity = float(count)
        self._rate = count / seconds
        self._tokens = float(count)
        self._clock = clock
        self._updated = clock()

    def wait(self) -> float:
        """Seconds until a token will be available (0: one is available now); takes nothing."""
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        return 0.0 if self._tokens >= 1.0 else (1.0 - self._tokens) / self._rate

    def take(self) -> float:
        """Take a token and return 0, or return the seconds until one will be available."""
        wait = self.wait()
        if wait == 0.0:
            self._tokens -= 1.0
        return wait


class FailureAllowance:
    """Requests with invalid signatures allowed per peer address; a peer past it is refused unread.

    Kept apart from the route's rate limit, so strangers' bad requests never spend the partner's
    allowance. At most ``MAX_PEERS`` addresses are tracked (least recently failing forgotten first),
    so a flood from many addresses cannot grow memory without bound.
    """

    MAX_PEERS = 4096

    def __init__(self, count: int, seconds: float) -> None:
        self._count = count
        self._seconds = seconds
        self._peers: OrderedDict[str, TokenBucket] = OrderedDict()

    def wait(self, peer: str) -> float:
        """Seconds until ``peer`` may be heard again (0: now)."""
        bucket = self._peers.get(peer)
        return 0.0 if bucket is None else bucket.wait()

    def spend(self, peer: str) -> None:
        """Count one invalid request from ``peer``."""
        bucket = self._peers.pop(peer, None) or TokenBucket(self._count, self._seconds)
        bucket.take()
        self._peers[peer] = bucket
        if len(self._peers) > self.MAX_PEERS:
            self._peers.popitem(last=False)
