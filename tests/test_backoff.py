"""The loop's backoff between failed passes: it reads `retryable` and `delay` from the error, and nothing else.

Pure arithmetic (no clock, no sleep): each test asserts on the delay `delay_after` returns.
"""

from __future__ import annotations

import math
import random

from hypothesis import given
from hypothesis import strategies as st

from reconciler.errors import ConfigError, PermanentError, ReconcilerError, SpecError, TemporaryError
from reconciler.loop.backoff import Backoff


def test_a_retry_after_is_a_floor_that_jitter_never_goes_under() -> None:
    delays = [
        Backoff(base=8.0, cap=300.0, jitter=0.25, rng=random.Random(seed)).delay_after(
            TemporaryError("rate limited", delay=10.0)
        )
        for seed in range(200)
    ]
    assert set(delays) == {10.0}  # the jittered 8 s (6 to 10 s) never beats the floor of 10


def test_the_errors_delay_is_capped_and_the_exponent_comes_back_after_it() -> None:
    backoff = Backoff(base=1.0, factor=2.0, cap=60.0, jitter=0.0)
    assert backoff.delay_after(TemporaryError("rate limited", delay=1e9)) == 60.0
    assert backoff.delay_after(TemporaryError("down")) == 2.0  # the second attempt: its own exponent, no hint
    assert backoff.delay_after(TemporaryError("busy", delay=3.0)) == 4.0  # the exponent is longer than the hint


def test_what_retrying_cannot_help_gets_no_delay_even_with_a_hint() -> None:
    backoff = Backoff()
    for error in (PermanentError("no"), ConfigError("no"), SpecError("no"), ValueError("not ours")):
        assert backoff.delay_after(error) is None
    assert backoff.attempts == 0


def test_a_hostile_delay_on_an_error_is_ignored() -> None:
    """`delay` is a plain attribute: a subclass or a caller could set anything there."""
    for hint in (-5.0, 0.0, math.nan, True, "30", None):
        error = TemporaryError("down")
        error.delay = hint  # type: ignore[assignment]
        delay = Backoff(base=1.0, jitter=0.0).delay_after(error)
        assert delay == 1.0, hint


@given(
    attempts=st.integers(min_value=0, max_value=40),
    hint=st.floats(min_value=0.001, max_value=1e6, allow_nan=False),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_every_delay_lies_between_the_hint_and_the_jittered_cap(attempts: int, hint: float, seed: int) -> None:
    backoff = Backoff(base=0.5, factor=2.0, cap=120.0, jitter=0.25, attempts=attempts, rng=random.Random(seed))
    error: ReconcilerError = TemporaryError("rate limited", delay=hint)
    delay = backoff.delay_after(error)
    assert delay is not None
    assert min(hint, 120.0) <= delay <= 120.0 * 1.25
    assert backoff.attempts == attempts + 1
