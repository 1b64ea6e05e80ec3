"""Benchmarks P1 (fan-out goodput) and P5 (manager memory): one WPK pushed to N agents over
mutual TLS by a real manager process.

Set-up, all on loopback, in a temporary folder:

* a transport CA (EC), the manager's server certificate and one client certificate per agent
  (``CN=agent:NNN``; real agent processes get their own key from ``wpk-upgrade ca``, simulated
  agents share one EC key to keep the set-up short);
* the manager as a real process (``python -m wpk_upgrade.cli manager``), SQLite store,
  ``[upgrade] max_threads`` at the schema's cap (256) unless told otherwise;
* ``real`` agents as real processes (``python -m wpk_upgrade.agent``) and the rest simulated:
  ``swarm`` processes, each holding many agents on one event loop, every one with its own TLS
  connection and the agent's real ``CommandHandler`` (open / offset writes / close / sha1 write
  the WPK into that agent's own home on disk). Simulated agents answer the final ``upgrade``
  command without running the installer (the transfer is what is measured).

P1 times ``upgrade_custom`` of one WPK to every agent until the manager has delivered it to all
(its log says "installer started on agent N": every byte acknowledged, the SHA1 checked, the
``upgrade`` command answered; a task's stored progress is checked afterwards), and divides
the aggregate goodput by the raw TLS throughput measured in the same run between the same
number of connections and processes: one sender process (like the manager) pushing the same
bytes to each connection, received (and discarded) by as many receiver processes as there were
agent processes, connection counts split the same way. Goal >= 0.6.

P5 reads the manager process's ``VmHWM`` (peak RSS) from ``/proc/<pid>/status`` after pushing
to every agent, with ``max_threads`` transfers in flight at a time (goal <= 200 MB).

Run: ``.venv/bin/python bench/bench_fanout.py [--agents 500] [--real 20] [--wpk-mb 1]``;
``bench/run.py`` calls ``run()``. Subcommands ``swarm`` and ``sink`` are the helper processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

GOAL_RATIO = 0.6
GOAL_RSS_MB = 200.0
PLATFORM = {"os_platform": "ubuntu", "os_major": "22", "os_minor": "04", "os_arch": "x86_64"}
FINAL = {"Updated", "Error", "Cancelled", "Timeout", "Legacy"}
FIRST_ID = 1001
HERE = Path(__file__).resolve()
INSTALLER_STARTED = re.compile(rb"installer started on agent (\d+)")


# --------------------------------------------------------------------------- certificates


def _sim_certs(ca_dir: Path, root: Path, ids: list[int]) -> None:
    """Client certificates ``CN=agent:NNN`` for ``ids`` on one shared EC key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from wpk_upgrade import pki

    ca_cert = pki.load_certificate(ca_dir / "ca.pem")
    ca_key = pki.load_private_key(ca_dir / "ca.key")
    key = ec.generate_private_key(ec.SECP256R1())
    root.mkdir(parents=True, exist_ok=True)
    (root / "agent.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    begin = datetime.now(UTC) - timedelta(minutes=5)
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    for agent_id in ids:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"agent:{agent_id:03d}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(begin)
            .not_valid_after(begin + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (root / f"{agent_id}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# --------------------------------------------------------------------------- helper processes


def _agent_handler(home: Path, agent_id: int) -> Any:
    from wpk_upgrade.agent.commands import CommandHandler
    from wpk_upgrade.agent.config import AgentConfigSchema
    from wpk_upgrade.agent.result import UpgradeGate
    from wpk_upgrade.config import load_data

    config = load_data(
        {
            "home": str(home),
            "agent": {"id": agent_id, **PLATFORM},
            "upgrade": {"installer_timeout": 5, "ca_verification": {"enabled": False}},
        },
        AgentConfigSchema(),
        "bench",
    )
    for directory in config.layout_dirs():
        directory.mkdir(parents=True, exist_ok=True)
    return CommandHandler(config, UpgradeGate(True))


async def _swarm(args: argparse.Namespace) -> None:
    """Simulated agents: one TLS connection and one real command handler each."""
    from wpk_transport_tcp import TcpOptions, TcpTransport

    from wpk_upgrade.models import AgentInfo

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    connected: set[int] = set()
    certs = Path(args.certs)
    home = Path(args.home)
    status = home / "connected"

    async def one(agent_id: int) -> None:
        handler = _agent_handler(home / str(agent_id), agent_id)
        options = TcpOptions(
            address=args.address,
            ca=args.ca,
            cert=str(certs / f"{agent_id}.pem"),
            key=str(certs / "agent.key"),
            heartbeat=30.0,
            hello_timeout=120.0,
            reconnect_min=0.5,
            reconnect_max=3.0,
        )
        info = AgentInfo(
            agent_id=agent_id, name=f"sim{agent_id}", version="Wazuh v4.9.0", **PLATFORM
        )

        async def handle(target: str, payload: str) -> str:
            if target == "upgrade" and '"upgrade"' in payload:
                if json.loads(payload).get("command") == "upgrade":
                    return json.dumps({"error": 0, "message": "0", "data": []})
            reply: str = await handler.handle(target, payload)
            return reply

        # announce what the real agent announces (windowed, resumable transfers, binary
        # attachments): the transport reads ``features`` off the request handler
        handle.features = handler.features  # type: ignore[attr-defined]

        async def on_connected(channel: Any) -> None:
            connected.add(agent_id)

        await TcpTransport(options).run_agent(lambda: info, handle, on_connected, stop)

    async def report() -> None:
        while not stop.is_set():
            status.write_text(str(len(connected)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    ids = range(args.first, args.last + 1)
    tasks = [asyncio.create_task(one(i)) for i in ids]
    reporter = asyncio.create_task(report())
    await stop.wait()
    await asyncio.wait(tasks, timeout=10)
    reporter.cancel()


async def _sink(args: argparse.Namespace) -> None:
    """Baseline receivers: ``conns`` TLS connections, each reads ``size`` bytes then acks."""
    from wpk_transport_tcp import tls

    context = tls.client_context(args.ca, args.cert, args.key)
    host, port = args.address.rsplit(":", 1)

    async def one() -> None:
        reader, writer = await asyncio.open_connection(
            host, int(port), ssl=context, server_hostname=host
        )
        left = args.size
        while left > 0:
            data = await reader.read(1 << 18)
            if not data:
                raise ConnectionError("sender closed early")
            left -= len(data)
        writer.write(b"k")
        await writer.drain()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    await asyncio.gather(*(one() for _ in range(args.conns)))


# --------------------------------------------------------------------------- baseline


async def _tls_sender(pki_files: dict[str, str], conns: int, size: int, start_sinks: Any) -> float:
    """Accept ``conns`` mutual-TLS connections, then push ``size`` bytes on each; the seconds
    from the first byte until every receiver acknowledged the last."""
    from wpk_transport_tcp import tls

    context = tls.server_context(pki_files["ca"], pki_files["cert"], pki_files["key"])
    ready = asyncio.Event()
    go = asyncio.Event()
    done: list[float] = []
    peers: list[Any] = []
    chunk = os.urandom(1 << 16)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peers.append(writer)
        if len(peers) == conns:
            ready.set()
        await go.wait()
        left = size
        while left > 0:
            piece = chunk if left >= len(chunk) else chunk[:left]
            writer.write(piece)
            left -= len(piece)
            await writer.drain()
        await reader.readexactly(1)
        done.append(time.perf_counter())
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    sinks = start_sinks(f"127.0.0.1:{port}")
    try:
        await asyncio.wait_for(ready.wait(), 300)
        started = time.perf_counter()
        go.set()
        while len(done) < conns:
            await asyncio.sleep(0.01)
            if any(p.poll() not in (None, 0) for p in sinks):
                raise RuntimeError("a baseline receiver failed")
        return max(done) - started
    finally:
        server.close()
        for proc in sinks:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(30)


def tls_baseline(
    pki_files: dict[str, str], agent_pki: dict[str, str], split: list[int], size: int
) -> float:
    """Raw TLS loopback seconds to push ``size`` bytes on ``sum(split)`` connections, with
    ``split[i]`` connections in receiver process ``i``."""

    def start_sinks(address: str) -> list[subprocess.Popen[bytes]]:
        return [
            subprocess.Popen(
                [
                    *(sys.executable, str(HERE), "sink", "--address", address),
                    *("--conns", str(n), "--size", str(size), "--ca", agent_pki["ca"]),
                    *("--cert", agent_pki["cert"], "--key", agent_pki["key"]),
                ]
            )
            for n in split
            if n
        ]

    return asyncio.run(_tls_sender(pki_files, sum(split), size, start_sinks))


# --------------------------------------------------------------------------- the fleet


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(path: Path, message: dict[str, Any]) -> dict[str, Any]:
    from wpk_upgrade.framing import request_unix

    reply: dict[str, Any] = json.loads(request_unix(str(path), json.dumps(message).encode()))
    return reply


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by ``pid`` (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    """``VmHWM`` and ``VmRSS`` of ``pid`` in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Fleet:
    """A manager process with ``agents`` connected agents (``real`` of them processes)."""

    def __init__(
        self,
        root: Path,
        agents: int,
        real: int,
        swarms: int,
        max_threads: int = 256,
        upgrade: dict[str, Any] | None = None,
        ssl_buffer: int | None = None,
    ) -> None:
        self.upgrade = upgrade or {}
        self.ssl_buffer = ssl_buffer
        self.root = root
        self.agents = agents
        self.real = min(real, agents)
        self.swarms = swarms if agents > self.real else 0
        self.max_threads = max_threads
        self.ids = list(range(FIRST_ID, FIRST_ID + agents))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.manager: subprocess.Popen[bytes] | None = None
        self.split: list[int] = []

    def _spawn(self, cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("ab") as fh:
            return subprocess.Popen(
                cmd,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start(self) -> float:
        """Start everything; returns the seconds until every agent was connected."""
        from wpk_upgrade import cli_ca

        root = self.root
        ca_dir = root / "ca"
        cli_ca.init_ca(ca_dir, key_type="ec")
        manager = cli_ca.issue_manager(ca_dir, root / "mcert", ["127.0.0.1"], key_type="ec")
        self.manager_pki = {
            "ca": str(ca_dir / "ca.pem"),
            "cert": str(manager.cert),
            "key": str(manager.key),
        }
        real_ids = self.ids[: self.real]
        sim_ids = self.ids[self.real :]
        real_certs = {}
        for agent_id in real_ids:
            issued = cli_ca.issue_agent(
                ca_dir, agent_id, root / "acert" / str(agent_id), key_type="ec"
            )
            real_certs[agent_id] = {
                "ca": str(issued.ca),
                "cert": str(issued.cert),
                "key": str(issued.key),
            }
        if sim_ids:
            _sim_certs(ca_dir, root / "simcert", sim_ids)
        self.agent_pki = (
            real_certs[real_ids[0]]
            if real_ids
            else {
                "ca": str(ca_dir / "ca.pem"),
                "cert": str(root / "simcert" / f"{sim_ids[0]}.pem"),
                "key": str(root / "simcert" / "agent.key"),
            }
        )

        home = root / "manager"
        home.mkdir()
        port = _free_port()
        self.address = f"127.0.0.1:{port}"
        opts = {
            "listen": self.address,
            "heartbeat": 30.0,
            "hello_timeout": 120.0,
            "backlog": 4096,
            **self.manager_pki,
        }
        rendered = ", ".join(f"{k} = {json.dumps(v)}" for k, v in opts.items())
        config = home / "manager.toml"
        config.write_text(
            f'home = {json.dumps(str(home))}\nnode_name = "node01"\n'
            f"[upgrade]\nmax_threads = {self.max_threads}\ncommand_timeout = 120.0\n"
            + "".join(f"{k} = {v}\n" for k, v in self.upgrade.items())
            + '[task_manager]\nsweep_interval = 5\ntask_timeout = "30m"\n'
            f'[transport]\nname = "tcp"\noptions = {{ {rendered} }}\n'
        )
        self.upgrade_socket = home / "queue" / "tasks" / "upgrade"
        self.task_socket = home / "queue" / "tasks" / "task"
        self.manager = self._spawn(
            [*self._manager_command(), "manager", "--config", str(config)],
            home / "manager.log",
        )
        _wait(
            lambda: self.upgrade_socket.exists() and self.task_socket.exists(),
            60,
            "the manager sockets",
        )

        started = time.monotonic()
        for agent_id in real_ids:
            self.procs.append(self._start_agent(agent_id, real_certs[agent_id]))
        n_sim = len(sim_ids)
        chunks = [
            sim_ids[n * n_sim // self.swarms : (n + 1) * n_sim // self.swarms]
            for n in range(self.swarms)
        ]
        self.split = [1] * len(real_ids)
        for n, chunk in enumerate(chunks):
            shome = root / f"swarm{n}"
            shome.mkdir()
            self.procs.append(
                self._spawn(
                    [
                        sys.executable,
                        str(HERE),
                        "swarm",
                        "--address",
                        self.address,
                        "--ca",
                        self.manager_pki["ca"],
                        "--certs",
                        str(root / "simcert"),
                        "--first",
                        str(chunk[0]),
                        "--last",
                        str(chunk[-1]),
                        "--home",
                        str(shome),
                    ],
                    shome / "swarm.log",
                )
            )
            self.split.append(len(chunk))
        self.swarm_homes = [root / f"swarm{n}" for n in range(len(chunks))]
        _wait(lambda: self.connected() >= self.agents, 600, "the agents to connect", 0.5)
        return time.monotonic() - started

    def _manager_command(self) -> list[str]:
        """The manager's command line; with ``ssl_buffer``, asyncio's per-connection TLS read
        buffer (``SSLProtocol.max_size``, 256 KiB) is set first (an experiment for P5)."""
        if self.ssl_buffer is None:
            return [sys.executable, "-m", "wpk_upgrade.cli"]
        code = (
            "import sys, asyncio.sslproto as s; "
            f"s.SSLProtocol.max_size = {int(self.ssl_buffer)}; "
            "from wpk_upgrade.cli import main; sys.argv[0] = 'wpk-upgrade'; main()"
        )
        return [sys.executable, "-c", code]

    def _start_agent(self, agent_id: int, tls_opts: dict[str, str]) -> subprocess.Popen[bytes]:
        home = self.root / "agents" / str(agent_id)
        (home / "etc").mkdir(parents=True)
        (home / "etc" / "version").write_text("v4.9.0\n")
        opts = {
            "address": self.address,
            "reconnect_min": 0.5,
            "reconnect_max": 3.0,
            "heartbeat": 30.0,
            **tls_opts,
        }
        rendered = ", ".join(
            f"{k} = {json.dumps(v)}" if isinstance(v, str) else f"{k} = {v}"
            for k, v in opts.items()
        )
        config = home / "etc" / "agent.toml"
        config.write_text(
            f"home = {json.dumps(str(home))}\n"
            f'[agent]\nid = {agent_id}\nname = "proc{agent_id}"\n'
            + "".join(f'{k} = "{v}"\n' for k, v in PLATFORM.items())
            + f'[manager]\ntransport = "tcp"\noptions = {{ {rendered} }}\n'
            + "[upgrade]\nresult_wait = 0.2\nnotification_wait_start = 0.5\n"
            "installer_timeout = 10\nca_verification = { enabled = false }\n"
        )
        return self._spawn(
            [sys.executable, "-m", "wpk_upgrade.agent", "--config", str(config)],
            home / "agent.log",
        )

    def connected(self) -> int:
        """Agents connected as the agents see it (state file / swarm counters)."""
        count = 0
        for agent_id in self.ids[: self.real]:
            state = self.root / "agents" / str(agent_id) / "var" / "run" / "agent.state"
            with contextlib.suppress(OSError):
                count += "status=connected" in state.read_text()
        for shome in getattr(self, "swarm_homes", []):
            with contextlib.suppress(OSError, ValueError):
                count += int((shome / "connected").read_text() or 0)
        if self.manager is not None and self.manager.poll() is not None:
            raise RuntimeError(f"the manager exited ({self.root / 'manager' / 'manager.log'})")
        return count

    def push(self, package: Path, size: int, timeout: float = 600) -> dict[str, Any]:
        """``upgrade_custom`` to every agent; seconds until it was delivered to every one."""
        pending = list(self.ids)
        assert self.manager is not None
        cpu0 = cpu_seconds(self.manager.pid), sum(cpu_seconds(p.pid) for p in self.procs)
        started = time.perf_counter()
        deadline = time.monotonic() + 60
        while pending:
            reply = _request(
                self.upgrade_socket,
                {
                    "origin": {"module": "api"},
                    "command": "upgrade_custom",
                    "parameters": {
                        "agents": pending,
                        "file_path": str(package),
                        "installer": "upgrade.sh",
                    },
                },
            )
            pending = [i["agent"] for i in reply.get("data", []) if i.get("error")]
            if pending:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"agents refused the upgrade: {reply['data'][:3]}")
                time.sleep(0.5)
        query = {
            "origin": {"module": "api"},
            "command": "upgrade_result",
            "parameters": {"agents": self.ids},
        }
        peak = 0
        end = time.monotonic() + timeout
        log = self.root / "manager" / "manager.log"
        log_offset = 0
        delivered: set[int] = set()
        # Completion is read from the manager's log ("installer started on agent N": the WPK
        # was delivered, its SHA1 checked and the upgrade command answered), not by polling
        # upgrade_result for every agent: at 10,000 agents that poll costs the manager more
        # than the pushes do.
        while len(delivered) < len(self.ids):
            if time.monotonic() > end:
                raise TimeoutError(f"the push did not finish in time ({len(delivered)} done)")
            assert self.manager is not None
            if self.manager.poll() is not None:
                raise RuntimeError(f"the manager exited ({log})")
            peak = max(peak, proc_status(self.manager.pid)["VmRSS"])
            with log.open("rb") as fh:
                fh.seek(log_offset)
                chunk = fh.read()
            cut = chunk.rfind(b"\n") + 1
            log_offset += cut
            for match in INSTALLER_STARTED.finditer(chunk[:cut]):
                delivered.add(int(match.group(1)))
            if b"ERROR" in chunk[:cut] or b"failed" in chunk[:cut]:
                items = _request(self.task_socket, query)["data"]
                errors = [i for i in items if i.get("status") in FINAL - {"Updated"}]
                if errors:
                    raise RuntimeError(f"{len(errors)} tasks failed: {errors[:2]}")
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        items = _request(self.task_socket, query)["data"]
        stale = sum((i.get("progress") or {}).get("sent") != size for i in items)
        return {
            "seconds": seconds,
            "rss_peak_sampled": peak,
            "stale_progress_tasks": stale,
            "manager_cpu_seconds": cpu_seconds(self.manager.pid) - cpu0[0],
            "agents_cpu_seconds": sum(cpu_seconds(p.pid) for p in self.procs) - cpu0[1],
        }

    def stop(self) -> None:
        for proc in [*self.procs, *([self.manager] if self.manager else [])]:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in [*self.procs, *([self.manager] if self.manager else [])]:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)


def _make_wpk(root: Path, size_bytes: int) -> tuple[Path, int]:
    from wpk_upgrade import pki, wpk

    ca = pki.create_ca(root / "wpkca")
    signer = pki.issue_certificate(ca.cert, ca.key, root / "signer", "bench signer", "code")
    src = root / "wpksrc"
    src.mkdir()
    (src / "upgrade.sh").write_text("#!/bin/sh\nexit 0\n")
    (src / "data.bin").write_bytes(os.urandom(size_bytes))
    packed = wpk.pack(
        root / "fanout.wpk",
        signer.cert,
        signer.key,
        [src / "upgrade.sh", src / "data.bin"],
        installer="upgrade.sh",
    )
    return root / "fanout.wpk", packed.size


def run(
    agents: int = 500,
    *,
    real: int = 20,
    swarms: int = 2,
    wpk_mb: float = 1.0,
    max_threads: int = 256,
    upgrade: dict[str, Any] | None = None,
    ssl_buffer: int | None = None,
    baseline: bool = True,
    label: str = "P1",
    quiet: bool = False,
) -> dict[str, Any]:
    """Push one WPK to ``agents`` agents (``real`` of them processes) and, unless ``baseline``
    is false, measure the raw TLS baseline; returns the figures (printed unless quiet)."""
    with tempfile.TemporaryDirectory(prefix="bench-fanout-") as tmp:
        root = Path(tmp)
        package, size = _make_wpk(root, int(wpk_mb * 1_000_000))
        fleet = Fleet(root, agents, real, swarms, max_threads, upgrade, ssl_buffer)
        try:
            connect_seconds = fleet.start()
            assert fleet.manager is not None
            idle = proc_status(fleet.manager.pid)
            pushed = fleet.push(package, size)
            mem = proc_status(fleet.manager.pid)
        finally:
            fleet.stop()
        base_seconds = (
            tls_baseline(fleet.manager_pki, fleet.agent_pki, fleet.split, size) if baseline else 0.0
        )
    total = size * agents
    goodput = total / pushed["seconds"]
    figures: dict[str, Any] = {
        "agents": agents,
        "real_processes": fleet.real,
        "simulated": agents - fleet.real,
        "swarm_processes": fleet.swarms,
        "max_threads": max_threads,
        "upgrade_settings": upgrade or {},
        "manager_ssl_read_buffer": ssl_buffer,
        "manager_cpu_seconds": pushed["manager_cpu_seconds"],
        "stale_progress_tasks": pushed["stale_progress_tasks"],
        "agents_cpu_seconds": pushed["agents_cpu_seconds"],
        "wpk_bytes": size,
        "connect_seconds": connect_seconds,
        "push_seconds": pushed["seconds"],
        "goodput_mb_per_s": goodput / 1e6,
        "manager_rss_idle_mb": idle["VmRSS"] / 1e6,
        "manager_vmhwm_mb": mem["VmHWM"] / 1e6,
        "manager_rss_sampled_peak_mb": pushed["rss_peak_sampled"] / 1e6,
    }
    if baseline:
        raw = total / base_seconds
        figures.update(
            baseline_seconds=base_seconds,
            baseline_mb_per_s=raw / 1e6,
            ratio=goodput / raw,
            goal=GOAL_RATIO,
            ok=goodput / raw >= GOAL_RATIO,
        )
    if not quiet:
        print(describe(label, figures))
    return figures


def describe(label: str, f: dict[str, Any]) -> str:
    """The one-line summary of a run's figures."""
    who = (
        f"{f['agents']} agents ({f['real_processes']} real processes + {f['simulated']} simulated"
        f" in {f['swarm_processes']} processes), mutual TLS"
    )
    stale = (
        f"; {f['stale_progress_tasks']} tasks' stored progress short of the total"
        if f.get("stale_progress_tasks")
        else ""
    )
    if "ratio" in f:
        return (
            f"{label} fan-out: goodput/raw TLS {f['ratio']:.2f} (goal >= {GOAL_RATIO}) "
            f"[{who}, {f['wpk_bytes'] / 1e6:.1f} MB WPK, max_threads {f['max_threads']}: "
            f"{f['goodput_mb_per_s']:.1f} MB/s in {f['push_seconds']:.1f} s vs raw TLS "
            f"{f['baseline_mb_per_s']:.1f} MB/s; CPU s manager {f['manager_cpu_seconds']:.1f}, "
            f"agents {f['agents_cpu_seconds']:.1f}; connect {f['connect_seconds']:.1f} s"
            f"{stale}]"
        )
    return (
        f"{label} memory: manager peak RSS {f['manager_vmhwm_mb']:.0f} MB (goal <= "
        f"{GOAL_RSS_MB:.0f}) [{who}, up to {min(f['max_threads'], f['agents'])} transfers "
        f"in flight (max_threads), "
        f"{f['wpk_bytes'] / 1e6:.1f} MB WPK; idle connected {f['manager_rss_idle_mb']:.0f} MB; "
        f"push {f['push_seconds']:.1f} s]"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode")
    swarm = sub.add_parser("swarm")
    for name in ("--address", "--ca", "--certs", "--home"):
        swarm.add_argument(name, required=True)
    swarm.add_argument("--first", type=int, required=True)
    swarm.add_argument("--last", type=int, required=True)
    sink = sub.add_parser("sink")
    for name in ("--address", "--ca", "--cert", "--key"):
        sink.add_argument(name, required=True)
    sink.add_argument("--conns", type=int, required=True)
    sink.add_argument("--size", type=int, required=True)
    parser.add_argument("--agents", type=int, default=500)
    parser.add_argument("--real", type=int, default=20)
    parser.add_argument("--wpk-mb", type=float, default=1.0)
    parser.add_argument("--max-threads", type=int, default=256)
    parser.add_argument("--chunk-size", type=int)
    parser.add_argument("--window", type=int)
    parser.add_argument("--ssl-buffer", type=int, help="manager's asyncio TLS read buffer")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    upgrade = {k: v for k, v in (("chunk_size", args.chunk_size), ("window", args.window)) if v}
    if args.mode == "swarm":
        asyncio.run(_swarm(args))
    elif args.mode == "sink":
        asyncio.run(_sink(args))
    else:
        figures = run(
            args.agents,
            real=args.real,
            wpk_mb=args.wpk_mb,
            max_threads=args.max_threads,
            upgrade=upgrade,
            ssl_buffer=args.ssl_buffer,
            baseline=not args.no_baseline,
            label="P1" if not args.no_baseline else "P5",
        )
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
