"""bridge/runtime.py: the collector settings the services start with."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from bridge.runtime import THRESHOLDS, tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_gc_freezes_startup_objects_and_collects_less_often(restore_gc: None) -> None:
    """After tune_gc what existed is out of the collector's scans and young collections are rarer."""
    gc.unfreeze()
    tune_gc()
    assert gc.get_freeze_count() > 1000
    assert gc.get_threshold() == THRESHOLDS
    assert THRESHOLDS[0] > 700  # CPython's default, which set off a full collection about every second
