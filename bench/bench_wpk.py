"""Benchmark P6: agent-side verify + unpack of a WPK against ``sha256sum`` + ``gunzip``.

Builds a WPK of about ``size_mb`` MB (its content is half random bytes, half compressible text,
about 1.9 times as large, plus an installer), then times:

* baseline: ``sha256sum payload.gz`` followed by ``gunzip -c payload.gz > /dev/null``, on the
  gzip payload cut out of the WPK into its own file;
* ours: ``wpk.verify_and_unpack`` (signature + CA chain + whole-file SHA1/SHA-256, then gunzip,
  unmerge into a private directory and move into the destination, re-hashing the payload).

Each side is timed ``repeat`` times and the best run kept. The ratio is our speed over the
baseline's speed (baseline seconds / our seconds); the issue's goal is >= 0.5.

Run: ``.venv/bin/python bench/bench_wpk.py [--size-mb 50]``; ``bench/run.py`` calls ``run()``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from wpk_upgrade import pki, wpk

GOAL = 0.5
#: Content bytes per WPK byte for the half random / half text mix (gzip level 6).
CONTENT_FACTOR = 1.9


def _make_content(path: Path, size: int) -> None:
    """Half random bytes, half compressible text, interleaved in 1 MiB pieces."""
    line = 0
    with open(path, "wb") as fh:
        written = 0
        piece = 0
        while written < size:
            want = min(1 << 20, size - written)
            if piece % 2 == 0:
                data = os.urandom(want)
            else:
                chunks = []
                total = 0
                while total < want:
                    text = b"%08d agent upgrade payload line, mostly repetitive text\n" % line
                    chunks.append(text)
                    total += len(text)
                    line += 1
                data = b"".join(chunks)[:want]
            fh.write(data)
            written += len(data)
            piece += 1


def _best(func: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - started)
    return best


def run(size_mb: int = 50, *, repeat: int = 3, quiet: bool = False) -> dict[str, Any]:
    """Build the WPK, time both sides and return the figures (also printed unless quiet)."""
    for tool in ("sha256sum", "gunzip"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"the baseline needs '{tool}' on PATH")
    with tempfile.TemporaryDirectory(prefix="bench-wpk-") as tmp:
        base = Path(tmp)
        ca = pki.create_ca(base / "ca")
        signer = pki.issue_certificate(ca.cert, ca.key, base / "signer", "bench signer", "code")
        src = base / "src"
        src.mkdir()
        _make_content(src / "wazuh-agent.pkg", int(size_mb * 1_000_000 * CONTENT_FACTOR))
        (src / "upgrade.sh").write_text("#!/bin/sh\nexit 0\n")
        package = base / "bench.wpk"
        started = time.perf_counter()
        packed = wpk.pack(
            package,
            signer.cert,
            signer.key,
            [src / "wazuh-agent.pkg", src / "upgrade.sh"],
            installer="upgrade.sh",
        )
        pack_seconds = time.perf_counter() - started

        header = wpk.read_header(package)
        payload = base / "payload.gz"
        with open(package, "rb") as fin, open(payload, "wb") as fout:
            fin.seek(header.payload_offset)
            shutil.copyfileobj(fin, fout, 1 << 20)

        def baseline() -> None:
            subprocess.run(["sha256sum", str(payload)], check=True, stdout=subprocess.DEVNULL)
            with open(os.devnull, "wb") as null:
                subprocess.run(["gunzip", "-c", str(payload)], check=True, stdout=null)

        dest = base / "var" / "upgrade"
        dest.parent.mkdir()

        def ours() -> None:
            wpk.verify_and_unpack(package, [ca.cert], dest, "upgrade.sh")

        ours()  # warm the page cache for both sides
        baseline()
        baseline_seconds = _best(baseline, repeat)
        ours_seconds = _best(ours, repeat)
    ratio = baseline_seconds / ours_seconds
    figures = {
        "size_bytes": packed.size,
        "unpacked_bytes": sum(m.size for m in packed.members),
        "pack_seconds": pack_seconds,
        "baseline_seconds": baseline_seconds,
        "ours_seconds": ours_seconds,
        "ours_mb_per_s": packed.size / ours_seconds / 1e6,
        "ratio": ratio,
        "goal": GOAL,
        "ok": ratio >= GOAL,
    }
    if not quiet:
        print(
            f"P6 agent verify+unpack: ratio {ratio:.2f} (goal >= {GOAL}) "
            f"[{packed.size / 1e6:.1f} MB WPK: ours {ours_seconds:.3f} s, "
            f"sha256sum+gunzip {baseline_seconds:.3f} s]"
        )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    run(args.size_mb, repeat=args.repeat)


if __name__ == "__main__":
    main()
