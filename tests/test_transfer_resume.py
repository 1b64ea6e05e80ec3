"""Resumable transfers with real agent processes over mutual TLS, through a throttling TCP proxy
(``bench/delay_proxy.py``) so that a transfer lasts long enough to be cut:

* the agent is killed (``kill -9``) mid-transfer and started again;
* the network drops every connection mid-transfer (the proxy cuts them);
* the manager is restarted mid-transfer (needs restart recovery of cut pushes).

Each time the manager asks the agent where it is (``open`` in resume mode) and sends only the
rest: the bytes sent again are fewer than the file, the progress continues from the resumed
offset, and the WPK the agent finally verifies and installs is intact.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_cases_async import custom, pack_wpk
from test_transfer_windowed import (
    AgentProcess,
    issue_agents,
    processes,
    signer,
    tls_manager,
    transport_pki,
    wait_connected,
)

from wpk_upgrade import pki
from wpk_upgrade.dispatcher import Dispatcher
from wpk_upgrade.testing.harness import ManagerHarness, manager_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from delay_proxy import ProxyThread

__all__ = ["processes", "signer", "transport_pki"]  # fixtures used here

MakeNode = Callable[..., ManagerHarness]
SIZE = 3 << 20
BANDWIDTH = 2_000_000  # bytes per second through the proxy: the transfer lasts ~1.5 s
DONE = re.compile(
    r"agent (\d+): windowed transfer of \S+ done: (\d+) bytes, (\d+) bytes sent, "
    r"resumed at \[([\d, ]+)\]"
)


@pytest.fixture(scope="module")
def big_wpk(tmp_path_factory: pytest.TempPathFactory, signer: pki.CertFiles) -> Any:
    import os

    root = tmp_path_factory.mktemp("bigwpk")
    return pack_wpk(root, signer, root / "agent_v4.9.1.wpk", payload=os.urandom(SIZE))


@pytest.fixture
def proxy_for() -> Iterator[Callable[[str], ProxyThread]]:
    started: list[ProxyThread] = []

    def make(target: str) -> ProxyThread:
        host, _, port = target.rpartition(":")
        proxy = ProxyThread((host, int(port)), delay=0.001, bandwidth=BANDWIDTH).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


def progress(h: ManagerHarness, agent_id: int) -> dict[str, int]:
    value: dict[str, int] = h.result([agent_id])[0].get("progress") or {}
    return value


def wait_sent(h: ManagerHarness, agent_id: int, at_least: int, timeout: float = 20) -> int:
    h.wait_for(lambda: progress(h, agent_id).get("sent", 0) >= at_least, timeout, 0.02)
    return progress(h, agent_id)["sent"]


def transfer_done(caplog: pytest.LogCaptureFixture, agent_id: int) -> tuple[int, int, list[int]]:
    for record in caplog.records:
        match = DONE.search(record.getMessage())
        if match and int(match.group(1)) == agent_id:
            resumed = [int(x) for x in match.group(4).split(",")]
            return int(match.group(2)), int(match.group(3)), resumed
    raise AssertionError("no finished transfer logged")


def wait_done(
    h: ManagerHarness, caplog: pytest.LogCaptureFixture, agent_id: int, timeout: float = 40
) -> tuple[int, int, list[int]]:
    def finished() -> bool:
        try:
            transfer_done(caplog, agent_id)
        except AssertionError:
            return False
        return True

    h.wait_for(finished, timeout, 0.05)
    return transfer_done(caplog, agent_id)


def check_installed(agent: AgentProcess, h: ManagerHarness, agent_id: int) -> None:
    """The agent verified the WPK and ran its installer; the task waits for the report."""
    h.wait_for(lambda: "installer upgrade.sh exited with status 0" in agent.log, 20)
    assert (agent.home / "var" / "upgrade" / "package.bin").stat().st_size == SIZE
    item = h.result([agent_id])[0]
    assert item["status"] == "Updating", item
    assert item["progress"]["sent"] == item["progress"]["total"]


WINDOW_BYTES = 4 * 32768
#: The agent rewrites its progress file at least every MiB or half second (2 MB/s here).
UNSAVED = (1 << 20) + BANDWIDTH // 2


def assert_resumed(total: int, sent: int, resumed: list[int], max_resent: int) -> None:
    """The second attempt resumed where the agent was, and few bytes were sent twice."""
    assert len(resumed) >= 2 and resumed[0] == 0, resumed
    assert 0 < resumed[-1] < total, resumed  # the agent kept what it had
    resent = sent - total
    assert 0 <= resent < total, (sent, total)
    assert resent <= max_resent, (resent, max_resent)


def test_agent_killed_mid_transfer_resumes(
    make_harness: MakeNode,
    transport_pki: dict[str, Any],
    big_wpk: Any,
    tmp_path: Path,
    processes: list[AgentProcess],
    proxy_for: Callable[[str], ProxyThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    h = tls_manager(make_harness, transport_pki, window=4, resume_timeout=60)
    proxy = proxy_for(h.transport_address)
    certs = issue_agents(transport_pki["ca_dir"], tmp_path, [31])
    agent = AgentProcess(tmp_path / "a31", 31, proxy.address, tls=certs[31])
    processes.append(agent.start())
    wait_connected(h, 31)
    h.wait_for(lambda: "upgrades allowed" in agent.log, 20)
    custom(h, [31], file_path=str(big_wpk.path), installer="upgrade.sh")
    wait_sent(h, 31, SIZE // 3)
    agent.kill()
    assert progress(h, 31)["sent"] < SIZE
    agent.start()  # same home: var/incoming keeps the partial file and its progress
    total, sent, resumed = wait_done(h, caplog, 31)
    assert total == big_wpk.size
    # what was in flight, plus what the agent wrote but had not recorded when killed
    assert_resumed(total, sent, resumed, WINDOW_BYTES + UNSAVED)
    assert f"resuming {agent.home}" in agent.log
    check_installed(agent, h, 31)


def test_network_drop_mid_transfer_resumes(
    make_harness: MakeNode,
    transport_pki: dict[str, Any],
    big_wpk: Any,
    tmp_path: Path,
    processes: list[AgentProcess],
    proxy_for: Callable[[str], ProxyThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    h = tls_manager(make_harness, transport_pki, window=4, resume_timeout=60)
    proxy = proxy_for(h.transport_address)
    certs = issue_agents(transport_pki["ca_dir"], tmp_path, [32])
    agent = AgentProcess(tmp_path / "a32", 32, proxy.address, tls=certs[32])
    processes.append(agent.start())
    wait_connected(h, 32)
    h.wait_for(lambda: "upgrades allowed" in agent.log, 20)
    custom(h, [32], file_path=str(big_wpk.path), installer="upgrade.sh")
    wait_sent(h, 32, SIZE // 3)
    assert proxy.cut() == 1
    total, sent, resumed = wait_done(h, caplog, 32)
    # the agent still runs and records its exact prefix: only what was in flight is resent
    assert_resumed(total, sent, resumed, WINDOW_BYTES)
    assert agent.proc is not None and agent.proc.poll() is None  # the same process
    check_installed(agent, h, 32)


def test_manager_restart_mid_transfer_resumes(
    transport_pki: dict[str, Any],
    big_wpk: Any,
    tmp_path: Path,
    processes: list[AgentProcess],
    proxy_for: Callable[[str], ProxyThread],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The manager stops while pushing; a new manager on the same home and port finds the
    In progress task whose push was cut, pushes it again, and the agent answers the resume
    query with what it already holds."""
    if not hasattr(Dispatcher, "resume"):
        pytest.skip("restart recovery of cut pushes (Dispatcher.resume) not available")
    from test_agent_local_socket import free_port

    caplog.set_level(logging.INFO)
    port = free_port()
    home = tmp_path / "manager"
    data: dict[str, Any] = {
        "upgrade": {
            "chunk_size": 32768,
            "window": 4,
            "command_timeout": 20.0,
            "installer_timeout": 5,
            "open_retry_delay": 0.1,
            "resume_timeout": 60,
        },
        "transport": {
            "name": "tcp",
            "options": {
                "listen": f"127.0.0.1:{port}",
                "heartbeat": 1.0,
                **transport_pki["manager"],
            },
        },
    }
    proxy = proxy_for(f"127.0.0.1:{port}")
    certs = issue_agents(transport_pki["ca_dir"], tmp_path, [33])
    agent = AgentProcess(tmp_path / "a33", 33, proxy.address, tls=certs[33])
    first = ManagerHarness(manager_config(home, **data))
    first.start()
    try:
        processes.append(agent.start())
        wait_connected(first, 33)
        first.wait_for(lambda: "upgrades allowed" in agent.log, 20)
        custom(first, [33], file_path=str(big_wpk.path), installer="upgrade.sh")
        wait_sent(first, 33, SIZE // 3)
    finally:
        first.stop()
    second = ManagerHarness(manager_config(home, **data))
    second.start()
    try:
        total, sent, resumed = wait_done(second, caplog, 33, timeout=60)
        assert total == big_wpk.size
        assert resumed == [resumed[0]] and resumed[0] > 0, resumed  # the first try resumed
        assert sent + resumed[0] == total  # only the rest was sent
        check_installed(agent, second, 33)
    finally:
        second.stop()
