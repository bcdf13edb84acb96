"""Fixtures shared by the whole suite. Helpers to import live in `tests.helpers` (imported as
`from tests.helpers.training import ...`); tests mirror the source tree (tests/<subpackage>/
test_<module>.py), each folder a package so same-named files never clash."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def train_workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny OLMoE + tokenizer on disk and a learnable 60-record data set (see tests.helpers.training)."""
    from tests.helpers.training import make_workspace

    return make_workspace(tmp_path_factory.mktemp("ws"), n_records=60)


@pytest.fixture
def seeded() -> int:
    """Seed torch's global generator for tests that draw from it; returns the seed."""
    torch.manual_seed(0)
    return 0
