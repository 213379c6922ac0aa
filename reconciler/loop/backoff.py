"""Exponential backoff with jitter for passes that ended in a temporary error.

The controller asks `delay_after(error)` once a pass fails: an error whose
`retryable` is false gets None (the loop waits for its next trigger instead);
a retryable one gets base * factor**attempt, capped, spread by jitter so
that several daemons behind one API do not retry in step, and never less
than the error's own `delay` (a rate limit's `Retry-After`, capped too): the
jitter never brings the wait under what the server asked for.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    base: float = 1.0  # seconds before the first retry
    factor: float = 2.0
    cap: float = 300.0
    jitter: float = 0.25  # the delay is spread over +/- this fraction
    attempts: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def delay_after(self, error: BaseException) -> float | None:
        """Seconds to wait before retrying after `error`, or None when retrying cannot help."""
        if not getattr(error, "retryable", False):
            return None
        delay = min(self.cap, self.base * self.factor**self.attempts)
        self.attempts += 1
        delay *= 1.0 + self.rng.uniform(-self.jitter, self.jitter)
        hint = getattr(error, "delay", None)
        if isinstance(hint, int | float) and not isinstance(hint, bool) and hint > 0:
            delay = max(delay, min(float(hint), self.cap))
        return delay

    def reset(self) -> None:
        """A pass succeeded: the next failure starts from `base` again."""
        self.attempts = 0
