"""Failed web logins, counted per account name and per client address: after `limit` failures
within `window` seconds, further attempts for that name or from that address are refused
(429) until the oldest of them is `window` seconds old. Monotonic time; at most `max_keys`
names and addresses are remembered (the least recently failed are forgotten first)."""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

MAX_KEYS = 10_000


class LoginThrottle:
    def __init__(
        self,
        limit: int,
        window: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.limit, self.window, self.clock, self.max_keys = limit, window, clock, max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def wait(self, keys: Iterable[str]) -> float:
        """Seconds until `keys` may try again (0: now)."""
        now = self.clock()
        with self._lock:
            waits = [self._wait(key, now) for key in keys]
        return max(waits, default=0.0)

    def _wait(self, key: str, now: float) -> float:
        failures = self._failures.get(key)
        if failures is None or len(failures) < self.limit:
            return 0.0
        return max(0.0, failures[0] + self.window - now)

    def failed(self, keys: Iterable[str]) -> None:
        """Count a failed login against each key (the last `limit` failures are kept)."""
        now = self.clock()
        with self._lock:
            for key in keys:
                failures = self._failures.pop(key, None) or deque(maxlen=self.limit)
                failures.append(now)
                self._failures[key] = failures  # most recently failed last
            while len(self._failures) > self.max_keys:
                self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        """A right password clears the account's count (not the address's)."""
        with self._lock:
            self._failures.pop(key, None)


def retry_after(seconds: float) -> str:
    """The Retry-After header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
