"""R3: a real agent process killed at each step of an upgrade (open, write, close, sha1,
upgrade, inside the install switch, after its installer before its report), see
``r3_agent_faults.py``."""

from __future__ import annotations

import r3_agent_faults
from hardlib import Size, assert_figures


def test_r3_agent_killed_at_each_step() -> None:
    assert_figures(r3_agent_faults.measure(Size()))
