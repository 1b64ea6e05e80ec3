"""Print the hardening figures, one line each: ``R1 fuzzing: tried N, failed M`` ...

    python tests/hardening/report.py            # CI-sized (what the pytest modules run)
    python tests/hardening/report.py --full     # full-sized (10,000 inputs per socket, ...)
    python tests/hardening/report.py --only R1,R4 --verbose

``--verbose`` adds each figure's notes and failures. The log of every component under test
goes to a file (its path is printed), not to the terminal. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hardlib import Figure, Size, remove_scratch

MEASUREMENTS: dict[str, str] = {
    "R1": "r1_fuzz",
    "R2": "r2_crash",
    "R3": "r3_agent_faults",
    "R4": "r4_packages",
    "R5": "r5_foreign",
    "R6": "r6_load",
    "R7": "r7_nodes",
}


def run(key: str, size: Size) -> list[Figure]:
    """The figures of one measurement (R1 gets its total line first)."""
    module = __import__(MEASUREMENTS[key])
    measure: Callable[[Size], list[Figure]] = module.measure
    figures = measure(size)
    if key == "R1":
        figures = [module.total(figures), *figures]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--full", action="store_true", help="full-sized runs (long)")
    parser.add_argument("--only", default="", help="comma-separated keys, e.g. R1,R4")
    parser.add_argument("--verbose", action="store_true", help="notes and failures too")
    args = parser.parse_args(argv)
    keys = [k.strip().upper() for k in args.only.split(",") if k.strip()] or list(MEASUREMENTS)
    log_file = Path(tempfile.mkstemp(prefix="wpk-hardening-", suffix=".log")[1])
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    size = Size(full=args.full)
    print(f"hardening figures ({'full' if args.full else 'CI'} size); log: {log_file}", flush=True)
    failed = False
    for key in keys:
        started = time.monotonic()
        try:
            figures = run(key, size)
        except Exception as exc:
            logging.getLogger(__name__).exception("%s could not be measured", key)
            figures = [Figure(key, MEASUREMENTS[key], failed=1, failures=[repr(exc)])]
        took = time.monotonic() - started
        for index, fig in enumerate(figures):
            indent = "  " if key == "R1" and index else ""
            suffix = f"  ({took:.0f} s)" if index == 0 else ""
            print(f"{indent}{fig.line()}{suffix}", flush=True)
            if args.verbose:
                for note in fig.notes:
                    print(f"{indent}    note: {note}")
                for failure in fig.failures:
                    print(f"{indent}    FAIL: {failure}")
            if not args.verbose and fig.failed and index == 0:
                for failure in fig.failures[:3]:
                    print(f"{indent}    FAIL: {failure[:300]}")
            failed = failed or fig.failed > 0
            if not fig.tried and fig.notes:
                print(f"{indent}    ({fig.notes[0]})")
    if not failed:
        remove_scratch()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
