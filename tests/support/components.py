"""Skip a test whose real component is missing, except under CI, where that is a failure.

CI must never pass by skipping the real tests: with CI set, `missing()` fails
the test instead of skipping it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["in_ci", "missing"]


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(component: str, reason: str) -> NoReturn:
    """Skip (locally) or fail (under CI) because `component` is not available."""
    message = f"{component} is not available: {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI must run the real tests)", pytrace=False)
    pytest.skip(message)
