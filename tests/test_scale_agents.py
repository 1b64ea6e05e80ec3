"""Scale: one manager and many agents over mutual TLS.

* 2,000 simulated agents (in-process, several hundred per event loop, on four threads), each
  with its own certificate, connect to one manager over real TLS sockets: all are registered
  active in the store and answer commands;
* ``max_threads`` bounds the concurrent transfers, and every transfer of one WPK reads the
  one cached file;
* 20 real agent processes receive a WPK (windowed, over mutual TLS) with progress visible;
* (slow) a 10 MB WPK to 100 agent processes, progress seen while they receive it.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from test_cases_async import custom, pack_wpk, upgrade
from test_transfer_windowed import (
    AgentProcess,
    LiveAgent,
    issue_agents,
    processes,
    signer,
    tls_manager,
    transport_pki,
    wait_connected,
)
from wpk_transport_tcp import TcpOptions, TcpTransport

from wpk_upgrade import pki, transfer
from wpk_upgrade.interfaces import ManagerChannel
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.testing.harness import ManagerHarness

__all__ = ["processes", "signer", "transport_pki"]  # fixtures used here

MakeNode = Callable[..., ManagerHarness]
AGENTS = 2000
LOOPS = 4


# --------------------------------------------------------------------------- 2,000 agents


def fast_agent_certs(transport_pki: dict[str, Any], root: Path, ids: range) -> Path:
    """Client certificates ``CN=agent:NNN`` for ``ids``, signed by the transport CA, all on
    one EC key (the key is not what this test is about; 2,000 key pairs would be slow)."""
    ca_dir = transport_pki["ca_dir"]
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
    start = datetime.now(UTC) - timedelta(minutes=5)
    for agent_id in ids:
        cert = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"agent:{agent_id:03d}")])
            )
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        (root / f"{agent_id}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return root


class AgentSwarm:
    """Many simulated agents on one event loop thread (each its own transport and TLS
    context), answering every command with ``ok``."""

    def __init__(self, address: str, ca: str, certs: Path, ids: list[int]) -> None:
        self.ids = ids
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.stop_event = asyncio.Event()
        self.futures: list[Any] = []
        self.address, self.ca, self.certs = address, ca, certs
        self.requests = 0

    async def _handle(self, target: str, payload: str) -> str:
        self.requests += 1
        return "ok "

    async def _run(self, agent_id: int) -> None:
        options = TcpOptions(
            address=self.address,
            ca=self.ca,
            cert=str(self.certs / f"{agent_id}.pem"),
            key=str(self.certs / "agent.key"),
            heartbeat=5.0,
            hello_timeout=60.0,
            reconnect_min=0.2,
            reconnect_max=2.0,
        )
        info = AgentInfo(
            agent_id=agent_id,
            name=f"sim{agent_id}",
            version="Wazuh v4.9.0",
            os_platform="ubuntu",
            os_major="22",
            os_minor="04",
            os_arch="x86_64",
        )

        async def connected(channel: ManagerChannel) -> None:
            await asyncio.Event().wait()

        await TcpTransport(options).run_agent(
            lambda: info, self._handle, connected, self.stop_event
        )

    def start(self) -> None:
        self.thread.start()
        for agent_id in self.ids:
            self.futures.append(asyncio.run_coroutine_threadsafe(self._run(agent_id), self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        for future in self.futures:
            try:
                future.result(30)
            except Exception:  # noqa: BLE001 - a simulator that fails to stop is not the test
                pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_two_thousand_agents_over_mutual_tls(
    make_harness: MakeNode, transport_pki: dict[str, Any], tmp_path: Path
) -> None:
    ids = range(1, AGENTS + 1)
    certs = fast_agent_certs(transport_pki, tmp_path / "certs", ids)
    options = {
        "listen": "127.0.0.1:0",
        "heartbeat": 5.0,
        "hello_timeout": 60.0,
        **transport_pki["manager"],
    }
    h = make_harness(transport={"name": "tcp", "options": options})
    assert h.manager is not None
    hub = h.manager.hub
    swarms = [
        AgentSwarm(h.transport_address, transport_pki["manager"]["ca"], certs, list(ids[i::LOOPS]))
        for i in range(LOOPS)
    ]
    started = time.monotonic()
    try:
        for swarm in swarms:
            swarm.start()
        h.wait_for(lambda: len(hub.connected) == AGENTS, timeout=240, interval=0.2)
        connect_time = time.monotonic() - started

        def all_active() -> bool:
            agents = h.store.list_agents()
            return len(agents) == AGENTS and all(a.connection_status == "active" for a in agents)

        h.wait_for(all_active, timeout=60, interval=0.5)
        assert hub.connected == list(ids)

        async def sample() -> list[str]:
            links = [hub.link(agent_id) for agent_id in ids[:: AGENTS // 50]]
            return await asyncio.gather(
                *(link.request("com", "lock_restart -1", 30) for link in links if link)
            )

        assert h.run(sample()) == ["ok "] * 50
        print(f"{AGENTS} agents connected over mutual TLS in {connect_time:.1f} s")
    finally:
        for swarm in swarms:
            swarm.stop()
    h.wait_for(lambda: not hub.connected, timeout=60)


# --------------------------------------------------------------------------- bounded pushes


def overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at one instant."""
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = current = 0
    for _, step in points:
        current += step
        best = max(best, current)
    return best


def test_max_threads_bounds_transfers_and_all_read_one_cached_file(
    make_harness: MakeNode,
    signer: pki.CertFiles,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six agents upgraded from a repository with ``max_threads = 2``: never more than two
    pushes at once (and two do overlap); every push reads the one file in the cache."""
    repo = tmp_path / "repo"
    rel = "linux/deb/amd64/wazuh_agent_v4.9.1_linux_amd64.deb.wpk"
    package = pack_wpk(tmp_path, signer, repo / rel, payload=os.urandom(64_000))
    (repo / "linux/deb/amd64/versions").write_text(f"v4.9.1 {package.sha1}\n")
    read: list[str] = []
    original = transfer.file_digests

    def spy(path: str) -> tuple[str, str]:
        read.append(path)
        return original(path)

    monkeypatch.setattr(transfer, "file_digests", spy)
    h = make_harness(
        upgrade={
            "max_threads": 2,
            "chunk_size": 4096,
            "window": 4,
            "wpk_repository": repo.as_uri() + "/",
            "open_retry_delay": 0.05,
        }
    )
    ids = list(range(41, 47))
    agents = [
        LiveAgent(h.transport_address, i, tmp_path / f"a{i}", write_delay=0.01).start() for i in ids
    ]
    try:
        for i in ids:
            wait_connected(h, i)
        upgrade(h, ids)
        h.wait_for(lambda: all(a.installed() for a in agents), 60)
        spans = []
        for agent in agents:
            times = dict(reversed(agent.events))  # first occurrence of each command
            spans.append((times["lock_restart"], times["upgrade"]))
        assert overlap(spans) == 2
        cache = h.config.cache_dir
        cached = [p for p in cache.iterdir() if p.suffix == ".wpk"]
        assert [p.name for p in cached] == [Path(rel).name]
        assert set(read) == {str(cached[0])} and len(read) == len(ids)
    finally:
        for agent in agents:
            agent.stop()


# --------------------------------------------------------------------------- processes


def run_processes(
    make_harness: MakeNode,
    transport_pki: dict[str, Any],
    signer: pki.CertFiles,
    tmp_path: Path,
    processes: list[AgentProcess],
    count: int,
    size: int,
    **upgrade_settings: Any,
) -> list[dict[str, Any]]:
    """``count`` agent processes over mutual TLS receive one WPK of ``size`` bytes; returns
    every intermediate progress seen."""
    h = tls_manager(make_harness, transport_pki, **upgrade_settings)
    ids = list(range(101, 101 + count))
    certs = issue_agents(transport_pki["ca_dir"], tmp_path / "certs", ids)
    for agent_id in ids:
        agent = AgentProcess(
            tmp_path / f"a{agent_id}",
            agent_id,
            h.transport_address,
            tls=certs[agent_id],
            heartbeat=5.0,
        )
        processes.append(agent.start())
    for agent_id in ids:
        wait_connected(h, agent_id, timeout=120)
    for agent in processes:
        h.wait_for(lambda agent=agent: "upgrades allowed" in agent.log, 60)
    package = pack_wpk(tmp_path, signer, tmp_path / "agent.wpk", payload=os.urandom(size))
    custom(h, ids, file_path=str(package.path), installer="upgrade.sh")
    partial: list[dict[str, Any]] = []

    def delivered() -> bool:
        items = h.result(ids)
        for item in items:
            progress = item.get("progress")
            if progress and 0 < progress["sent"] < progress["total"]:
                partial.append(progress)
        return all(
            (i.get("progress") or {}).get("sent") == package.size and i["status"] == "Updating"
            for i in items
        )

    h.wait_for(delivered, timeout=600, interval=0.1)
    for agent in processes:
        h.wait_for(lambda agent=agent: "exited with status 0" in agent.log, 60)
    return partial


def test_twenty_agent_processes_over_mutual_tls(
    make_harness: MakeNode,
    transport_pki: dict[str, Any],
    signer: pki.CertFiles,
    tmp_path: Path,
    processes: list[AgentProcess],
) -> None:
    run_processes(
        make_harness, transport_pki, signer, tmp_path, processes, 20, 1 << 20, max_threads=8
    )


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ten_megabytes_to_a_hundred_agent_processes(
    make_harness: MakeNode,
    transport_pki: dict[str, Any],
    signer: pki.CertFiles,
    tmp_path: Path,
    processes: list[AgentProcess],
) -> None:
    partial = run_processes(
        make_harness, transport_pki, signer, tmp_path, processes, 100, 10 << 20, max_threads=16
    )
    assert partial, "no intermediate progress was seen"
