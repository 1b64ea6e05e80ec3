"""Run the benchmarks P1-P6 and write ``bench/results.json``.

Every figure is a ratio to a baseline measured in the same run (P5 is an absolute peak RSS),
because the machines are shared and noisy. One line per benchmark is printed, e.g.
``P2 latency: windowed 1.12 x bound (goal <= 1.3); reference/ours 14.3 (goal >= 10)``.

* P1 fan-out (``bench_fanout``): one WPK to N agents over mutual TLS, goodput / raw TLS.
* P2 latency (``bench_transfer``): windowed vs bandwidth-delay bound and vs stop-and-wait.
* P3 intake and P4 results (``bench_store``): SQLite and PostgreSQL over 1M tasks.
* P5 memory (``bench_fanout``): the manager process's VmHWM with 1,000 agents connected and
  ``max_threads`` transfers in flight.
* P6 agent (``bench_wpk``): verify + unpack vs ``sha256sum`` + ``gunzip``.

``--growth`` adds how P1 (connections, push, manager memory) and P3/P4 grow with N agents.
A benchmark whose module is missing or that fails prints its line with the reason and the
others still run. Usage: ``.venv/bin/python bench/run.py [--only P1,P4] [--quick]``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

ALL = ("P1", "P2", "P3", "P4", "P5", "P6")
NAMES = {
    "P1": "fan-out",
    "P2": "latency",
    "P3": "intake",
    "P4": "results",
    "P5": "memory",
    "P6": "agent",
}
DEFAULTS: dict[str, Any] = {
    "agents": 500,
    "real": 20,
    "fanout_mb": 1.0,
    "memory_agents": 1000,
    "memory_mb": 0.5,
    "wpk_mb": 50,
    "tasks": 1_000_000,
    "result_agents": 1000,
    "intake_agents": 10_000,
    "dialects": "sqlite,postgresql",
    "repeat": 3,
}
QUICK: dict[str, Any] = {
    "agents": 12,
    "real": 2,
    "fanout_mb": 0.2,
    "memory_agents": 16,
    "memory_mb": 0.1,
    "wpk_mb": 2,
    "tasks": 20_000,
    "result_agents": 100,
    "intake_agents": 300,
    "dialects": "sqlite",
    "repeat": 1,
}


def machine() -> dict[str, Any]:
    """Cores, RAM, CPU model, Python version, OS and date of this run."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def _module(name: str) -> Any:
    return importlib.import_module(name)


# --------------------------------------------------------------------------- each benchmark


def p1(opts: dict[str, Any]) -> tuple[dict[str, Any], str]:
    fanout = _module("bench_fanout")
    figures = fanout.run(
        opts["agents"], real=opts["real"], wpk_mb=opts["fanout_mb"], label="P1", quiet=True
    )
    return figures, fanout.describe("P1", figures)


def p5(opts: dict[str, Any]) -> tuple[dict[str, Any], str]:
    fanout = _module("bench_fanout")
    figures = fanout.run(
        opts["memory_agents"],
        real=0,
        wpk_mb=opts["memory_mb"],
        baseline=False,
        label="P5",
        quiet=True,
    )
    figures["goal_mb"] = fanout.GOAL_RSS_MB
    figures["ok"] = figures["manager_vmhwm_mb"] <= fanout.GOAL_RSS_MB
    return figures, fanout.describe("P5", figures)


def p2(opts: dict[str, Any]) -> tuple[dict[str, Any], str]:
    transfer = _module("bench_transfer")
    kwargs: dict[str, Any] = {"quiet": True}
    if opts["quick"]:
        kwargs.update(getattr(transfer, "QUICK", {}))
    figures: dict[str, Any] = transfer.run(**kwargs)
    line = figures.get("line") if isinstance(figures, dict) else None
    if not line:
        bound = figures.get("bound_ratio", figures.get("ratio_bound"))
        ref = figures.get("reference_ratio", figures.get("ratio_reference"))
        line = (
            f"P2 latency: windowed {bound:.2f} x bound (goal <= 1.3); "
            f"reference/ours {ref:.1f} (goal >= 10)"
            if isinstance(bound, float) and isinstance(ref, float)
            else f"P2 latency: {json.dumps(figures, default=str)[:300]}"
        )
    return figures, line


_store_cache: dict[str, Any] = {}


def _store(opts: dict[str, Any]) -> dict[str, Any]:
    if "out" not in _store_cache:
        store = _module("bench_store")
        dialects = tuple(d.strip() for d in opts["dialects"].split(",") if d.strip())
        _store_cache["out"] = store.run(
            dialects,
            tasks=opts["tasks"],
            result_agents=opts["result_agents"],
            intake_agents=opts["intake_agents"],
            repeat=opts["repeat"],
            quiet=True,
        )
    out: dict[str, Any] = _store_cache["out"]
    return out


def _store_line(label: str, out: dict[str, Any], key: str, what: str, goal: str) -> str:
    parts = []
    detail = []
    for dialect, f in out.items():
        if "skipped" in f:
            parts.append(f"{dialect} skipped ({f['skipped']})")
            continue
        parts.append(f"{dialect} {f[f'{key}_ratio']:.2f}")
        ours, base = f[f"{key}_seconds"], f[f"{key}_baseline_seconds"]
        detail.append(f"{dialect}: ours {ours * 1000:.1f} ms vs {base * 1000:.1f} ms")
    return f"{label}: ours/{what} {', '.join(parts)} (goal {goal}) [{'; '.join(detail)}]"


def p3(opts: dict[str, Any]) -> tuple[dict[str, Any], str]:
    out = _store(opts)
    figures = {
        d: {k: v for k, v in f.items() if k.startswith("intake") or k == "skipped"}
        for d, f in out.items()
    }
    what = f"bare bulk insert, upgrade of {opts['intake_agents']:,} agents"
    return figures, _store_line("P3 intake", out, "intake", what, "<= 1.5")


def p4(opts: dict[str, Any]) -> tuple[dict[str, Any], str]:
    out = _store(opts)
    figures = {
        d: {k: v for k, v in f.items() if k.startswith("result") or k == "skipped"}
        for d, f in out.items()
    }
    what = (
        f"raw indexed SQL, upgrade_result of {opts['result_agents']:,} agents over "
        f"{opts['tasks']:,} tasks"
    )
    return figures, _store_line("P4 results", out, "result", what, "<= 2")


def p6(opts: dict[str, Any]) -> tuple[dict[str, Any], str]:
    wpk = _module("bench_wpk")
    f: dict[str, Any] = wpk.run(opts["wpk_mb"], repeat=opts["repeat"], quiet=True)
    line = (
        f"P6 agent: verify+unpack speed / sha256sum+gunzip {f['ratio']:.2f} (goal >= "
        f"{f['goal']}) [{f['size_bytes'] / 1e6:.1f} MB WPK: ours {f['ours_seconds']:.3f} s, "
        f"baseline {f['baseline_seconds']:.3f} s]"
    )
    return f, line


RUNNERS: dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], str]]] = {
    "P1": p1,
    "P2": p2,
    "P3": p3,
    "P4": p4,
    "P5": p5,
    "P6": p6,
}


def growth(opts: dict[str, Any], sizes: list[int], what: str = "P1,P3P4") -> dict[str, Any]:
    """P1 (connect, push of a small WPK, manager memory) and P3/P4 at each N in ``sizes``."""
    fanout = _module("bench_fanout")
    store = _module("bench_store")
    out: dict[str, Any] = {"P1": {}, "P3P4": {}}
    for n in sizes if "P1" in what else []:
        f = fanout.run(n, real=0, wpk_mb=0.1, baseline=False, label=f"N={n}", quiet=True)
        out["P1"][n] = f
        print(
            f"growth P1 N={n:,}: connect {f['connect_seconds']:.1f} s, push of "
            f"{f['wpk_bytes'] / 1e6:.1f} MB to all {f['push_seconds']:.1f} s "
            f"({f['goodput_mb_per_s']:.1f} MB/s), manager RSS idle "
            f"{f['manager_rss_idle_mb']:.0f} MB, peak {f['manager_vmhwm_mb']:.0f} MB",
            flush=True,
        )
    dialects = tuple(d.strip() for d in opts["dialects"].split(",") if d.strip())
    for n in sizes if "P3P4" in what else []:
        s = store.run(
            dialects,
            tasks=opts["tasks"],
            result_agents=n,
            intake_agents=n,
            repeat=opts["repeat"],
            quiet=True,
        )
        out["P3P4"][n] = s
        for dialect, f in s.items():
            if "skipped" in f:
                continue
            print(
                f"growth P3/P4 N={n:,} [{dialect}]: intake {f['intake_seconds'] * 1000:.1f} ms "
                f"(ratio {f['intake_ratio']:.2f}), upgrade_result "
                f"{f['result_seconds'] * 1000:.1f} ms (ratio {f['result_ratio']:.2f})",
                flush=True,
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ALL), help="e.g. P1,P4")
    parser.add_argument("--quick", action="store_true", help="small smoke sizes")
    parser.add_argument("--agents", type=int, help="P1 agents (default 500)")
    parser.add_argument("--real", type=int, help="P1 real agent processes (default 20)")
    parser.add_argument("--fanout-mb", type=float, help="P1 WPK size (default 1)")
    parser.add_argument("--memory-agents", type=int, help="P5 agents (default 1000)")
    parser.add_argument("--memory-mb", type=float, help="P5 WPK size (default 0.5)")
    parser.add_argument("--wpk-mb", type=int, help="P6 WPK size (default 50)")
    parser.add_argument("--tasks", type=int, help="P3/P4 stored tasks (default 1,000,000)")
    parser.add_argument("--result-agents", type=int, help="P4 agents (default 1000)")
    parser.add_argument("--intake-agents", type=int, help="P3 agents (default 10,000)")
    parser.add_argument("--dialects", help="P3/P4 databases (default sqlite,postgresql)")
    parser.add_argument("--repeat", type=int, help="P3/P4/P6 repetitions (default 3)")
    parser.add_argument("--growth", help="also grow P1/P3/P4 over these N, e.g. 100,1000,10000")
    parser.add_argument("--growth-of", default="P1,P3P4", help="P1, P3P4 or both")
    parser.add_argument("--output", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)

    opts = dict(QUICK if args.quick else DEFAULTS)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            opts[key] = value
    opts["quick"] = args.quick
    only = [p.strip().upper() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in only if p not in RUNNERS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    info = machine()
    print(
        f"machine: {info['cores']} cores, {info.get('ram_gib', '?')} GiB RAM, "
        f"Python {info['python']}, {info['date']}",
        flush=True,
    )
    results: dict[str, Any] = {"machine": info, "options": opts, "figures": {}, "lines": {}}
    started = time.monotonic()
    for key in ALL:
        if key not in only:
            continue
        t0 = time.monotonic()
        try:
            figures, line = RUNNERS[key](opts)
        except ModuleNotFoundError as exc:
            figures = {"error": f"not available: {exc}"}
            line = f"{key} {NAMES[key]}: not available ({exc})"
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not stop the rest
            figures = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            line = f"{key} {NAMES[key]}: failed ({type(exc).__name__}: {exc})"
        figures["elapsed_seconds"] = time.monotonic() - t0
        results["figures"][key] = figures
        results["lines"][key] = line
        print(line, flush=True)
    if args.growth:
        sizes = [int(n) for n in args.growth.split(",") if n.strip()]
        results["growth"] = growth(opts, sizes, args.growth_of.upper())
    results["elapsed_seconds"] = time.monotonic() - started
    Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"total {results['elapsed_seconds']:.0f} s; figures in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
