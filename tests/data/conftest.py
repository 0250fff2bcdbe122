"""Fixtures of the data tests: the real LC25000 lung tiles with their groups file (skip when absent)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import _real


@pytest.fixture(scope="session")
def lc25000_dir() -> Path:
    """9,000 real LC25000 lung tiles in 3 class folders, with ``groups.csv`` (image,label,group) at the root."""
    path = _real("lc25000_lung")
    if not (path / "groups.csv").is_file():
        pytest.skip(f"{path / 'groups.csv'} not found: the lung tiles come with their groups file")
    return path


@pytest.fixture(scope="session")
def lc25000_groups(lc25000_dir) -> list[dict[str, str]]:
    """The rows of the lung tiles' ``groups.csv`` (image paths relative to the dataset root)."""
    with open(lc25000_dir / "groups.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))
