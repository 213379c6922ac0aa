"""Skip a test whose real component is missing, except under CI, where that is a failure.

CI must never pass by skipping the real tests: with CI set, `missing()` fails
the test instead of skipping it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

__all__ = ["COMPONENTS", "in_ci", "missing"]

COMPONENTS: dict[str, str] = {
    "Docker engine": "Debian docker.io (dockerd, started by tests/support/dockerd.py)",
    "busybox": "Debian busybox-static",
    "cc": "Debian gcc, libc6-dev",
    "git": "Debian git",
    "fakepve": "pip fakepve (the dev extra)",
    "sshd": "Debian openssh-server (/usr/sbin/sshd, started by tests/support/sshd.py)",
    "ssh-keygen": "Debian openssh-client (signed commits, ssh signing)",
    "gpg": "Debian gnupg (signed commits, GPG signing)",
}
"""Every real component a test may need, and what provides it (.ci/run installs them)."""


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(component: str, reason: str) -> NoReturn:
    """Skip (locally) or fail (under CI) because `component` is not available."""
    provider = COMPONENTS.get(component)
    message = f"{component} is not available: {reason}" + (f" (from {provider})" if provider else "")
    if in_ci():
        pytest.fail(f"{message} (CI must run the real tests)", pytrace=False)
    pytest.skip(message)
