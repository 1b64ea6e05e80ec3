"""End to end with real processes: the demo (manager + agents + HTTPS repository)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_upgrades_every_agent() -> None:
    """`wpk-upgrade demo` must end with every agent Updated on the new version, and clean up."""
    proc = subprocess.run(
        [sys.executable, "-m", "wpk_upgrade.cli", "demo", "--agents", "3"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "SUCCESS: every agent Updated to v4.9.2" in out
    assert out.count('"status": "Updated"') == 6
    assert "agent versions now: {1: 'v4.9.1', 2: 'v4.9.1', 3: 'v4.9.1'}" in out
    assert "announced to the manager: {1: 'v4.9.2', 2: 'v4.9.2', 3: 'v4.9.2'}" in out
