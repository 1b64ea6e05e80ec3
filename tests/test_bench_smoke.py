"""Smoke test of the benchmark runner: ``bench/run.py --quick`` as a process prints one line
per benchmark (P1-P6) and writes its results file with the machine's description. It checks
only that the run completes and reports; it never asserts on times or ratios (those depend on
the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_prints_every_figure_and_writes_results(tmp_path: Path) -> None:
    output = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for key in ("P1", "P2", "P3", "P4", "P5", "P6"):
        assert any(line.startswith(f"{key} ") for line in lines), (key, proc.stdout)
    assert not [line for line in lines if ": failed (" in line], proc.stdout
    results = json.loads(output.read_text())
    machine = results["machine"]
    for field in ("cores", "ram_gib", "python", "date"):
        assert machine.get(field), field
    assert set(results["figures"]) == {"P1", "P2", "P3", "P4", "P5", "P6"}
    assert set(results["lines"]) == set(results["figures"])
