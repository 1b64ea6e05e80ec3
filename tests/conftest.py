"""Shared pytest fixtures: a real manager node in-process, and the black-box cases."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from wpk_upgrade.testing.harness import ManagerHarness, manager_config


@pytest.fixture
def make_harness(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ManagerHarness]]:
    """Start real manager nodes (SQLite store, real sockets); stopped at teardown."""
    started: list[ManagerHarness] = []

    def make(**overrides: Any) -> ManagerHarness:
        home = tmp_path_factory.mktemp("manager")
        harness = ManagerHarness(manager_config(home, **overrides))
        harness.start()
        started.append(harness)
        return harness

    yield make
    for harness in started:
        harness.stop()


@pytest.fixture
def harness(make_harness: Callable[..., ManagerHarness]) -> ManagerHarness:
    """One manager node with default settings."""
    return make_harness()
