"""R2: ``kill -9`` of a real manager process at random moments during upgrades, restarted
each time: no task lost, none stuck, every history consistent, no installer run twice (see
``r2_crash.py``)."""

from __future__ import annotations

import r2_crash
from hardlib import Size, assert_figures


def test_r2_manager_killed_during_upgrades() -> None:
    assert_figures(r2_crash.measure(Size()))
