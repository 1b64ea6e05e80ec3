"""P2 latency: one WPK through a link with delay and limited bandwidth, windowed vs reference.

Set-up (all real processes but the proxy): a lab transport CA (``wpk-upgrade ca`` functions,
EC keys), one agent process (``python -m wpk_upgrade.agent``) with its own certificate, that
reaches the manager through ``bench/delay_proxy.py`` (``rtt / 2`` of delay each way,
``bandwidth`` bytes per second each way), and a manager process (``python -m wpk_upgrade.cli
manager``) over mutual TLS. The same ``upgrade_custom`` of a ``size_mb`` WPK is run twice, by a
manager with ``transfer_mode = "windowed"`` (``window`` writes of ``chunk_size`` bytes in
flight) and by one with ``transfer_mode = "reference"`` (stop-and-wait, ``reference_chunk``
bytes per write). Times come from the manager's log line for the push: ``writes`` (first write
sent to last write answered) and the whole delivery (``lock_restart`` to the digest checks).

Figures:

* ``bound_ratio``: windowed writes time / the bandwidth-delay bound ``size / bandwidth + rtt``
  (goal <= 1.3); ``whole_bound_ratio`` the same with the whole delivery (five more round
  trips: lock_restart, open, close, sha1, sha256);
* ``reference_ratio``: reference whole delivery / windowed whole delivery (goal >= 10).

``run(...)`` returns the figures (and ``line``); run alone it prints one line per figure::

    .venv/bin/python bench/bench_transfer.py [--size-mb 10] [--rtt 0.05] [--bandwidth 12.5e6]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from delay_proxy import ProxyThread  # noqa: E402

from wpk_upgrade import cli_ca, pki, wpk  # noqa: E402
from wpk_upgrade.framing import request_unix  # noqa: E402

#: Smaller sizes for smoke runs (``bench/run.py --quick``).
QUICK: dict[str, Any] = {"size_mb": 1.0, "rtt": 0.02}
GOAL_BOUND = 1.3
GOAL_REFERENCE = 10.0
DONE = re.compile(
    r"(windowed|reference) transfer of \S+ done: (\d+) bytes, (\d+) bytes sent, .*?"
    r"([\d.]+) s \(writes ([\d.]+) s\)"
)
AGENT_ID = 1
PLATFORM = {"os_platform": "ubuntu", "os_major": "22", "os_minor": "04", "os_arch": "x86_64"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _toml_inline(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())


class _Lab:
    """Certificates, the WPK, and the agent's home under ``root``."""

    def __init__(self, root: Path, size: int) -> None:
        self.root = root
        ca_dir = root / "ca"
        cli_ca.init_ca(ca_dir, key_type="ec")
        manager = cli_ca.issue_manager(ca_dir, root / "manager-tls", ["127.0.0.1"], key_type="ec")
        agent = cli_ca.issue_agent(ca_dir, AGENT_ID, root / "agent-tls", key_type="ec")
        self.manager_tls = {"ca": str(ca_dir / "ca.pem"), "cert": str(manager.cert)}
        self.manager_tls["key"] = str(manager.key)
        self.agent_tls = {"ca": str(agent.ca), "cert": str(agent.cert), "key": str(agent.key)}
        signer_ca = pki.create_ca(root / "signer-ca")
        signer = pki.issue_certificate(
            signer_ca.cert, signer_ca.key, root / "signer", "bench signer", "code"
        )
        src = root / "src"
        src.mkdir()
        (src / "upgrade.sh").write_text("#!/bin/sh\nexit 0\n")
        (src / "payload.bin").write_bytes(os.urandom(size))
        self.wpk = wpk.pack(
            root / "agent_bench.wpk",
            signer.cert,
            signer.key,
            [src / "upgrade.sh", src / "payload.bin"],
        )
        self.agent_home = root / "agent"
        (self.agent_home / "etc").mkdir(parents=True)
        (self.agent_home / "etc" / "version").write_text("v4.9.0\n")
        shutil.copy(signer_ca.cert, self.agent_home / "etc" / "wpk_root.pem")


def _agent_config(lab: _Lab, address: str) -> Path:
    options = {
        "address": address,
        "heartbeat": 5.0,
        "reconnect_min": 0.05,
        "reconnect_max": 0.5,
        **lab.agent_tls,
    }
    path = lab.agent_home / "etc" / "agent.toml"
    path.write_text(
        f"home = {json.dumps(str(lab.agent_home))}\n"
        f'[agent]\nid = {AGENT_ID}\nname = "bench"\n'
        + "".join(f'{k} = "{v}"\n' for k, v in PLATFORM.items())
        + f'[manager]\ntransport = "tcp"\noptions = {{ {_toml_inline(options)} }}\n'
        "[upgrade]\nresult_wait = 0.2\ninstaller_timeout = 60\n"
    )
    return path


def _manager_config(lab: _Lab, mode: str, port: int, chunk: int, window: int) -> Path:
    home = lab.root / f"manager-{mode}"
    home.mkdir()
    options = {"listen": f"127.0.0.1:{port}", "heartbeat": 5.0, **lab.manager_tls}
    path = home / "manager.toml"
    path.write_text(
        f"home = {json.dumps(str(home))}\n"
        f'[upgrade]\ntransfer_mode = "{mode}"\nchunk_size = {chunk}\nwindow = {window}\n'
        "command_timeout = 60\nopen_retry_delay = 0.1\n"
        f'[transport]\nname = "tcp"\noptions = {{ {_toml_inline(options)} }}\n'
    )
    return path


def _start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as fh:
        return subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _push(
    lab: _Lab, mode: str, port: int, chunk: int, window: int, agent_log: Path
) -> dict[str, Any]:
    """One ``upgrade_custom`` by a manager in ``mode``; the times of its push."""
    config = _manager_config(lab, mode, port, chunk, window)
    home = config.parent
    log = home / "manager.log"
    proc = _start(
        [sys.executable, "-m", "wpk_upgrade.cli", "manager", "--config", str(config)], log
    )
    try:
        _wait(lambda: f"agent {AGENT_ID:03d} connected" in _read(log), 60, "the agent")
        installs = _read(agent_log).count("exited with status 0")
        message = {
            "origin": {"module": "api"},
            "command": "upgrade_custom",
            "parameters": {
                "agents": [AGENT_ID],
                "file_path": str(lab.wpk.path),
                "installer": "upgrade.sh",
            },
        }
        for _ in range(100):  # the agent's start-up check may not have allowed upgrades yet
            reply = json.loads(
                request_unix(
                    str(home / "queue" / "tasks" / "upgrade"), json.dumps(message).encode()
                )
            )
            if reply.get("error") == 0:
                break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"upgrade_custom refused: {reply}")
        _wait(lambda: DONE.search(_read(log)) is not None, 600, f"the {mode} push")
        _wait(
            lambda: _read(agent_log).count("exited with status 0") > installs, 60, "the installer"
        )
        match = DONE.search(_read(log))
        assert match is not None
        return {
            "mode": match.group(1),
            "bytes": int(match.group(2)),
            "bytes_sent": int(match.group(3)),
            "seconds": float(match.group(4)),
            "writes_seconds": float(match.group(5)),
        }
    finally:
        _stop(proc)


def run(
    size_mb: float = 10.0,
    rtt: float = 0.05,
    bandwidth: float = 12_500_000.0,
    window: int = 32,
    chunk_size: int = 32768,
    reference_chunk: int = 32768,
    quiet: bool = False,
    keep: bool = False,
) -> dict[str, Any]:
    """Measure both modes; the figures (see the module docstring) and ``line``."""
    root = Path(tempfile.mkdtemp(prefix="bench-transfer-"))
    agent_proc: subprocess.Popen[bytes] | None = None
    proxy: ProxyThread | None = None
    try:
        lab = _Lab(root, int(size_mb * 1_000_000))
        port = _free_port()
        proxy = ProxyThread(("127.0.0.1", port), delay=rtt / 2, bandwidth=bandwidth).start()
        agent_log = root / "agent.log"
        agent_proc = _start(
            [
                sys.executable,
                "-m",
                "wpk_upgrade.agent",
                "--config",
                str(_agent_config(lab, proxy.address)),
            ],
            agent_log,
        )
        windowed = _push(lab, "windowed", port, chunk_size, window, agent_log)
        reference = _push(lab, "reference", port, reference_chunk, window, agent_log)
    finally:
        if agent_proc is not None:
            _stop(agent_proc)
        if proxy is not None:
            proxy.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    size = windowed["bytes"]
    bound = size / bandwidth + rtt
    figures: dict[str, Any] = {
        "size_bytes": size,
        "rtt_seconds": rtt,
        "bandwidth_bytes_per_second": bandwidth,
        "window": window,
        "chunk_size": chunk_size,
        "reference_chunk": reference_chunk,
        "bound_seconds": bound,
        "windowed_writes_seconds": windowed["writes_seconds"],
        "windowed_seconds": windowed["seconds"],
        "reference_seconds": reference["seconds"],
        "reference_writes_seconds": reference["writes_seconds"],
        "bound_ratio": windowed["writes_seconds"] / bound,
        "whole_bound_ratio": windowed["seconds"] / bound,
        "reference_ratio": reference["seconds"] / windowed["seconds"],
    }
    figures["ok"] = (
        figures["bound_ratio"] <= GOAL_BOUND and figures["reference_ratio"] >= GOAL_REFERENCE
    )
    figures["lines"] = [
        f"P2 windowed: {size / 1e6:.1f} MB, rtt {rtt * 1000:.0f} ms, "
        f"{bandwidth * 8 / 1e6:.0f} Mbit/s, window {window} x {chunk_size} B: writes "
        f"{windowed['writes_seconds']:.2f} s = {figures['bound_ratio']:.2f} x bound "
        f"{bound:.2f} s (goal <= {GOAL_BOUND}); whole delivery {windowed['seconds']:.2f} s = "
        f"{figures['whole_bound_ratio']:.2f} x bound",
        f"P2 reference: stop-and-wait, {reference_chunk} B chunks: whole delivery "
        f"{reference['seconds']:.2f} s = {figures['reference_ratio']:.1f} x ours "
        f"(goal >= {GOAL_REFERENCE:g})",
    ]
    figures["line"] = (
        f"P2 latency: windowed {figures['bound_ratio']:.2f} x bound (goal <= {GOAL_BOUND}); "
        f"reference/ours {figures['reference_ratio']:.1f} (goal >= {GOAL_REFERENCE:g}) "
        f"[{size / 1e6:.0f} MB, rtt {rtt * 1000:.0f} ms, {bandwidth * 8 / 1e6:.0f} Mbit/s, "
        f"window {window}: writes {windowed['writes_seconds']:.2f} s vs bound {bound:.2f} s; "
        f"delivery {windowed['seconds']:.2f} s vs reference {reference['seconds']:.2f} s]"
    )
    if not quiet:
        for line in figures["lines"]:
            print(line, flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=10.0)
    parser.add_argument("--rtt", type=float, default=0.05, help="round-trip time, seconds")
    parser.add_argument("--bandwidth", type=float, default=12_500_000.0, help="bytes/s each way")
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=32768)
    parser.add_argument("--reference-chunk", type=int, default=32768)
    parser.add_argument("--quick", action="store_true", help="1 MB, 20 ms")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args(argv)
    kwargs: dict[str, Any] = {
        "size_mb": args.size_mb,
        "rtt": args.rtt,
        "bandwidth": args.bandwidth,
        "window": args.window,
        "chunk_size": args.chunk_size,
        "reference_chunk": args.reference_chunk,
        "keep": args.keep,
    }
    if args.quick:
        kwargs.update(QUICK)
    figures = run(**kwargs)
    if args.json:
        print(json.dumps(figures, indent=2))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
