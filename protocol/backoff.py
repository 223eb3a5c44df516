"""Capped exponential backoff with optional jitter, for every retry loop.

Jitter spreads a fleet's retries after a shared outage (a broker restart) so the devices do not
all come back in the same second.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays `initial`, `initial*factor`, ... up to `maximum`; `reset()` after a success.

    `jitter` 0.2 scales each delay returned by a random factor in [0.8, 1.2] (the progression
    itself stays exact, so jitter never compounds).
    """

    def __init__(self, initial: float = 1.0, maximum: float = 60.0, *, factor: float = 2.0,
                 jitter: float = 0.0) -> None:
        if not 0 < initial <= maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, got {initial} and {maximum}")
        if factor < 1:
            raise ValueError(f"backoff factor must be >= 1, got {factor}")
        if not 0 <= jitter < 1:
            raise ValueError(f"backoff jitter must be in [0, 1), got {jitter}")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._delay = initial

    @property
    def current(self) -> float:
        """The delay the next `next()` returns, before jitter."""
        return self._delay

    def next(self) -> float:
        """The delay to wait now; the one after it grows by `factor`, capped at `maximum`."""
        delay = self._delay
        self._delay = min(self.maximum, self._delay * self.factor)
        if self.jitter:
            delay *= random.uniform(1 - self.jitter, 1 + self.jitter)
        return delay

    def reset(self) -> None:
        self._delay = self.initial
