"""Shared pytest configuration. Component fixtures live in tests/support/ and are registered here."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.support.dockerd", "tests.support.nvml", "tests.support.fakepve", "tests.support.reallab"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo_root() -> Path:
    return ROOT
