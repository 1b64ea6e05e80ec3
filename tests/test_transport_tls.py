"""The ``tcp`` transport's mutual TLS, agent identity, revocation and heartbeats, through a real
manager node (``ManagerHarness``) and simulated agents on real TLS sockets; the ``wpk-upgrade
ca`` commands; the transport's binary attachments."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from test_cases_async import Sim, agent_info, send_event
from wpk_transport_tcp import TcpOptions, TcpTransport, wire
from wpk_transport_tcp import tls as tcp_tls

from wpk_upgrade import cli_ca, pki
from wpk_upgrade.cli import cli
from wpk_upgrade.config import load_data
from wpk_upgrade.errors import ConfigError, WpkUpgradeError
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent

MakeNode = Callable[..., ManagerHarness]
LOGGER = "wpk_transport_tcp.transport"


@dataclass(frozen=True)
class Pki:
    ca_dir: Path
    manager: pki.CertFiles
    agents: dict[int, cli_ca.IssuedAgent]
    rogue: cli_ca.IssuedAgent  # agent 1's id, issued by another CA
    rogue_ca: Path

    def agent_options(self, agent_id: int, **extra: Any) -> dict[str, Any]:
        issued = self.agents[agent_id]
        return {"ca": str(issued.ca), "cert": str(issued.cert), "key": str(issued.key), **extra}


@pytest.fixture(scope="module")
def lab_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_dir = root / "ca"
    cli_ca.init_ca(ca_dir)
    manager = cli_ca.issue_manager(ca_dir, root / "manager", ["127.0.0.1", "localhost"])
    agents = {i: cli_ca.issue_agent(ca_dir, i, root / f"agent{i}") for i in (1, 2, 3, 4)}
    rogue_dir = root / "rogue-ca"
    cli_ca.init_ca(rogue_dir, "rogue CA")
    rogue = cli_ca.issue_agent(rogue_dir, 1, root / "rogue-agent")
    return Pki(ca_dir, manager, agents, rogue, rogue_dir / "ca.pem")


def tls_node(make_harness: MakeNode, lab_pki: Pki, crl: Path | None = None, **opts: Any) -> Any:
    options: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "heartbeat": 2.0,
        "ca": str(lab_pki.ca_dir / "ca.pem"),
        "cert": str(lab_pki.manager.cert),
        "key": str(lab_pki.manager.key),
        **opts,
    }
    if crl is not None:
        options["crl"] = str(crl)
    return make_harness(transport={"name": "tcp", "options": options})


class TlsAgent(ScriptedAgent):
    """A ``ScriptedAgent`` whose transport options are its own (its certificate)."""

    def __init__(
        self, harness: ManagerHarness, info: AgentInfo, script: Any, **options: Any
    ) -> None:
        super().__init__(harness, info, script)
        base = {"address": harness.transport_address, "reconnect_min": 0.05, "heartbeat": 2.0}
        self.transport = TcpTransport(TcpOptions(**{**base, **options}))


def connected(h: ManagerHarness, agent_id: int) -> bool:
    return h.manager is not None and h.manager.hub.link(agent_id) is not None


def wait_log(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(text in r.getMessage() for r in caplog.records):
            return
        time.sleep(0.02)
    raise AssertionError(f"no log line with {text!r}: {[r.getMessage() for r in caplog.records]}")


def never_connects(h: ManagerHarness, agent: TlsAgent, agent_id: int, wait: float = 1.0) -> None:
    agent.start(wait=False)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        assert not connected(h, agent_id)
        time.sleep(0.05)


# --------------------------------------------------------------------------- accepted


def test_agent_with_its_certificate_connects_and_answers(
    make_harness: MakeNode, lab_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    h = tls_node(make_harness, lab_pki)
    with TlsAgent(h, agent_info(1), Sim(), **lab_pki.agent_options(1)) as agent:
        link = h.manager.hub.link(1)
        assert link is not None and "bin" in link.features
        assert h.run(link.request("com", "lock_restart -1", 10)) == "ok "
        assert agent.received == [("com", "lock_restart -1")]
        stored = h.store.get_agent(1)
        assert stored is not None and stored.connection_status == "active"
        assert stored.version == "Wazuh v4.8.0"
    wait_log(caplog, "(mutual TLS)")
    h.wait_for(lambda: h.store.get_agent(1).connection_status == "disconnected")


def test_tls_read_buffer_sizes_asyncio_buffer_and_traffic_flows(
    make_harness: MakeNode, lab_pki: Pki
) -> None:
    """``tls_read_buffer`` (manager side) is the read buffer of every TLS connection asyncio
    opens in the manager process (bench P5: 256 KiB each by default); replies larger than
    the buffer still arrive whole."""
    from asyncio import sslproto

    h = tls_node(make_harness, lab_pki, tls_read_buffer=8192)
    assert sslproto.SSLProtocol.max_size == 8192
    with TlsAgent(h, agent_info(1), Sim(), **lab_pki.agent_options(1)) as agent:
        link = h.manager.hub.link(1)
        assert link is not None
        payload = "x" * 100_000
        assert h.run(link.request("com", f"lock_restart {payload}", 10)) == "ok "
        assert agent.received == [("com", f"lock_restart {payload}")]
    with pytest.raises(ConfigError, match="tls_read_buffer"):
        options(tls_read_buffer=100)
    assert options().tls_read_buffer == 16384


def test_agent_by_server_name(make_harness: MakeNode, lab_pki: Pki) -> None:
    """The manager certificate is checked against ``server_name`` (here ``localhost``)."""
    h = tls_node(make_harness, lab_pki)
    opts = lab_pki.agent_options(2, server_name="localhost")
    with TlsAgent(h, agent_info(2), Sim(), **opts):
        assert connected(h, 2)


# --------------------------------------------------------------------------- refused


def test_agent_without_certificate_is_refused(
    make_harness: MakeNode, lab_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = tls_node(make_harness, lab_pki)

    async def bare_tls() -> str:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(lab_pki.ca_dir / "ca.pem"))
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", int(h.transport_address.rsplit(":", 1)[1]), ssl=context
        )
        writer.write(wire.pack(wire.hello(agent_info(1))))
        try:
            data = await asyncio.wait_for(reader.read(), 10)
        except (ssl.SSLError, ConnectionError) as exc:
            return f"error {exc}"
        finally:
            writer.close()
        return f"read {data!r}"

    outcome = asyncio.run(bare_tls())
    assert "welcome" not in outcome
    wait_log(caplog, "TLS handshake failed")
    assert not connected(h, 1)


def test_plain_agent_is_refused_by_a_tls_manager(
    make_harness: MakeNode, lab_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    h = tls_node(make_harness, lab_pki)
    never_connects(h, TlsAgent(h, agent_info(1), Sim(), tls=False), 1)
    wait_log(caplog, "TLS handshake failed")


def test_agent_certificate_from_another_ca_is_refused(
    make_harness: MakeNode, lab_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Agent 1's id, but a certificate from a CA the manager does not trust."""
    h = tls_node(make_harness, lab_pki)
    rogue = lab_pki.rogue
    agent = TlsAgent(
        h,
        agent_info(1),
        Sim(),
        ca=str(lab_pki.ca_dir / "ca.pem"),
        cert=str(rogue.cert),
        key=str(rogue.key),
    )
    try:
        never_connects(h, agent, 1)
        wait_log(caplog, "TLS handshake failed")
    finally:
        agent.stop()


def test_manager_certificate_from_another_ca_is_refused_by_the_agent(
    make_harness: MakeNode, lab_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """The agent trusts only the rogue CA: the manager's certificate does not verify."""
    caplog.set_level(logging.INFO)
    h = tls_node(make_harness, lab_pki)
    agent = TlsAgent(h, agent_info(1), Sim(), **lab_pki.agent_options(1, ca=str(lab_pki.rogue_ca)))
    try:
        never_connects(h, agent, 1)
        wait_log(caplog, "certificate verify failed")
    finally:
        agent.stop()


def test_manager_certificate_for_another_name_is_refused(
    make_harness: MakeNode, lab_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    h = tls_node(make_harness, lab_pki)
    opts = lab_pki.agent_options(1, server_name="manager.example.org")
    agent = TlsAgent(h, agent_info(1), Sim(), **opts)
    try:
        never_connects(h, agent, 1)
        wait_log(caplog, "certificate verify failed")
    finally:
        agent.stop()


def test_agent_claiming_another_id_is_refused_and_logged(
    make_harness: MakeNode, lab_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """Agent 2's certificate, a hello claiming agent 3: refused; agent 3 is not recorded."""
    caplog.set_level(logging.INFO)
    h = tls_node(make_harness, lab_pki)
    agent = TlsAgent(h, agent_info(3), Sim(), **lab_pki.agent_options(2))
    try:
        never_connects(h, agent, 3)
        wait_log(caplog, "hello claims agent 003 but the certificate is for agent 002")
        wait_log(caplog, "manager refused us: hello claims agent 003")
        refused = [r for r in caplog.records if "manager refused us" in r.getMessage()]
        assert refused and all(r.levelno == logging.WARNING for r in refused)
        assert h.store.get_agent(3) is None
        assert not connected(h, 2)
    finally:
        agent.stop()


def test_agent_reporting_for_another_agent_is_refused(
    make_harness: MakeNode, lab_pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """D6 over mutual TLS: agent 1 (its own certificate) reports about agent 2: refused."""
    h = tls_node(make_harness, lab_pki)
    with TlsAgent(h, agent_info(1), Sim(), **lab_pki.agent_options(1)) as agent:
        message = {
            "command": "upgrade_update_status",
            "parameters": {"agents": [2], "error": 0, "message": "ok", "status": "Done"},
        }
        reply = send_event(agent, message)
        assert reply["error"] != 0
        assert "Agent id not recognized" in json.dumps(reply)
        other = send_event(agent, {"command": "upgrade", "parameters": {"agents": [2]}})
        assert other["error"] != 0
    wait_log(caplog, "agent 001 tried to report for agents [2]; refused")
    wait_log(caplog, "agent 001 sent a refused command 'upgrade'")


def test_revoked_agent_is_refused_without_a_manager_restart(
    make_harness: MakeNode, lab_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``ca revoke 4`` rewrites the CRL; the running manager refuses agent 4's next
    connection (the CRL is re-read when it changes) and still accepts agent 3."""
    import shutil

    ca_dir = tmp_path / "ca"
    shutil.copytree(lab_pki.ca_dir, ca_dir)
    h = tls_node(make_harness, lab_pki, crl=ca_dir / cli_ca.CRL_NAME)
    with TlsAgent(h, agent_info(4), Sim(), **lab_pki.agent_options(4)):
        assert connected(h, 4)
    h.wait_for(lambda: not connected(h, 4))
    added = cli_ca.revoke(ca_dir, "4")
    assert added == [lab_pki.agents[4].serial]
    agent = TlsAgent(h, agent_info(4), Sim(), **lab_pki.agent_options(4))
    try:
        never_connects(h, agent, 4)
        wait_log(caplog, f"the certificate of agent 004 is revoked (serial {added[0]:x})")
    finally:
        agent.stop()
    with TlsAgent(h, agent_info(3), Sim(), **lab_pki.agent_options(3)):
        assert connected(h, 3)


def test_revoking_a_connected_agent_drops_it(
    make_harness: MakeNode, lab_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``ca revoke 4`` while agent 4 is connected: the manager notices the CRL changed and
    drops agent 4's connection (its reconnections are refused); agent 3 stays connected."""
    import shutil

    caplog.set_level(logging.INFO)
    ca_dir = tmp_path / "ca"
    shutil.copytree(lab_pki.ca_dir, ca_dir)
    h = tls_node(make_harness, lab_pki, crl=ca_dir / cli_ca.CRL_NAME)
    with (
        TlsAgent(h, agent_info(3), Sim(), **lab_pki.agent_options(3)),
        TlsAgent(h, agent_info(4), Sim(), **lab_pki.agent_options(4)),
    ):
        assert connected(h, 3) and connected(h, 4)
        link3 = h.manager.hub.link(3)
        [serial] = cli_ca.revoke(ca_dir, "4")
        wait_log(caplog, f"its certificate was revoked (serial {serial:x})")
        h.wait_for(lambda: not connected(h, 4))
        wait_log(caplog, f"the certificate of agent 004 is revoked (serial {serial:x})")
        assert not connected(h, 4)
        assert h.manager.hub.link(3) is link3  # untouched


def test_unusable_crl_refuses_everyone(
    make_harness: MakeNode, lab_pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A CRL signed by another CA: fail closed, every agent refused, an error logged."""
    crl = tmp_path / "crl.pem"
    crl.write_bytes((lab_pki.rogue_ca.parent / cli_ca.CRL_NAME).read_bytes())
    h = tls_node(make_harness, lab_pki, crl=crl)
    agent = TlsAgent(h, agent_info(1), Sim(), **lab_pki.agent_options(1))
    try:
        never_connects(h, agent, 1)
        wait_log(caplog, "revocation list unusable")
    finally:
        agent.stop()


# --------------------------------------------------------------------------- options


def options(**data: Any) -> TcpOptions:
    loaded: TcpOptions = load_data(data, TcpTransport.config_schema(), "transport.options")
    return loaded


def test_options_tls_follows_certificates(lab_pki: Pki) -> None:
    assert not options().tls_enabled
    agent = lab_pki.agents[1]
    on = options(ca=str(agent.ca), cert=str(agent.cert), key=str(agent.key))
    assert on.tls_enabled
    off = options(tls=False, ca=str(agent.ca), cert=str(agent.cert), key=str(agent.key))
    assert not off.tls_enabled
    with pytest.raises(ConfigError, match="mutual TLS needs ca, cert and key"):
        options(tls=True)
    with pytest.raises(ConfigError, match=r"missing: key"):
        options(ca=str(agent.ca), cert=str(agent.cert))


def test_bad_tls_files_stop_the_manager_with_a_clear_error(lab_pki: Pki, tmp_path: Path) -> None:
    transport = TcpTransport(
        options(
            ca=str(tmp_path / "missing.pem"),
            cert=str(lab_pki.manager.cert),
            key=str(lab_pki.manager.key),
            listen="127.0.0.1:0",
        )
    )
    with pytest.raises(ConfigError, match=r"ca .*missing\.pem does not exist"):
        asyncio.run(transport.serve(None))  # type: ignore[arg-type]
    plain_crl = TcpTransport(options(crl=str(tmp_path / "crl.pem"), listen="127.0.0.1:0"))
    with pytest.raises(ConfigError, match="crl needs TLS"):
        asyncio.run(plain_crl.serve(None))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- heartbeats


def test_heartbeats_refresh_last_seen_at_a_bounded_rate(
    make_harness: MakeNode, lab_pki: Pki
) -> None:
    """Pings every 0.1 s; the manager's heartbeat (the write interval) is 1 s: last_seen
    moves forward, with far fewer writes than pings."""
    h = tls_node(make_harness, lab_pki, heartbeat=1.0)
    store = h.store
    writes: list[tuple[int, str]] = []
    original = store.set_connection

    def counting(agent_id: int, status: str, node: str, when: int) -> None:
        writes.append((agent_id, status))
        original(agent_id, status, node, when)

    store.set_connection = counting  # type: ignore[method-assign]
    opts = lab_pki.agent_options(1, heartbeat=0.1)
    with TlsAgent(h, agent_info(1), Sim(), **opts):
        first = store.get_agent(1)
        assert first is not None and first.last_seen is not None
        h.wait_for(lambda: (store.get_agent(1).last_seen or 0) >= first.last_seen + 2, 10)
        pings = 3.0 / 0.1
        active_writes = [w for w in writes if w == (1, "active")]
        assert 1 <= len(active_writes) <= 5 < pings
        assert store.get_agent(1).connection_status == "active"
    h.wait_for(lambda: store.get_agent(1).connection_status == "disconnected")
    time.sleep(SEEN_WAIT)
    assert store.get_agent(1).connection_status == "disconnected"


SEEN_WAIT = 1.5


# --------------------------------------------------------------------------- attachments


def test_binary_attachment_is_spliced_back_byte_for_byte(
    make_harness: MakeNode, lab_pki: Pki
) -> None:
    """A large base64 ``buffer`` crosses as raw bytes; the agent's handler receives exactly
    the payload text the manager sent. Small buffers and other payloads go as they are."""
    h = tls_node(make_harness, lab_pki)
    raw = bytes(range(256)) * 200
    big = json.dumps(
        {
            "command": "write",
            "parameters": {
                "buffer": base64.b64encode(raw).decode(),
                "length": len(raw),
                "file": "x.wpk",
            },
        },
        separators=(",", ":"),
    )
    small = '{"command":"write","parameters":{"buffer":"QUJD","length":3,"file":"x"}}'
    with TlsAgent(h, agent_info(1), lambda t, p: "ok", **lab_pki.agent_options(1)) as agent:
        link = h.manager.hub.link(1)
        for payload in (big, small, '{"buffer":"not base64!!"}' + "x" * 4000):
            assert h.run(link.request("upgrade", payload, 10)) == "ok"
        assert [p for _, p in agent.received] == [
            big,
            small,
            '{"buffer":"not base64!!"}' + "x" * 4000,
        ]
    lifted = wire.lift_buffer(big)
    assert lifted is not None and lifted[2] == raw and len(lifted[0]) < 200
    assert wire.splice_buffer(lifted[0], lifted[1], lifted[2]) == big


def test_splice_refuses_a_bad_position() -> None:
    with pytest.raises(Exception, match="bin position"):
        wire.splice_buffer('{"a":""}', 3, b"x")


# --------------------------------------------------------------------------- ca commands


def test_ca_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    ca_dir, mgr, agent_dir = tmp_path / "ca", tmp_path / "mgr", tmp_path / "a5"
    result = runner.invoke(cli, ["ca", "init", str(ca_dir)])
    assert result.exit_code == 0, result.output
    assert (ca_dir / "ca.pem").exists() and (ca_dir / "crl.pem").exists()
    assert oct((ca_dir / "ca.key").stat().st_mode & 0o777) == "0o600"
    args = ["ca", "issue-manager", "--ca-dir", str(ca_dir), "--out", str(mgr)]
    result = runner.invoke(cli, [*args, "--san", "127.0.0.1", "--san", "mgr.lab"])
    assert result.exit_code == 0, result.output
    cert = pki.load_certificate(mgr / "manager.pem")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(n.value) for n in sans] == ["127.0.0.1", "mgr.lab"]
    assert (mgr / "ca.pem").read_bytes() == (ca_dir / "ca.pem").read_bytes()

    args = ["ca", "issue-agent", "5", "--ca-dir", str(ca_dir), "--out", str(agent_dir)]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    agent_cert = pki.load_certificate(agent_dir / "agent.pem")
    assert tcp_tls.agent_id_of(agent_cert) == 5
    assert agent_cert.subject.rfc4514_string() == "CN=agent:005"
    again = runner.invoke(cli, args)
    assert again.exit_code == 1 and "already exists" in again.output
    assert runner.invoke(cli, [*args, "--force"]).exit_code == 0
    second = pki.load_certificate(agent_dir / "agent.pem")

    result = runner.invoke(cli, ["ca", "revoke", "5", "--ca-dir", str(ca_dir)])
    assert result.exit_code == 0, result.output
    assert sorted(cli_ca.revoked_serials(ca_dir)) == sorted(
        [agent_cert.serial_number, second.serial_number]
    )
    result = runner.invoke(cli, ["ca", "revoke", "5", "--ca-dir", str(ca_dir)])
    assert "already revoked" in result.output
    serial = f"{pki.load_certificate(mgr / 'manager.pem').serial_number:x}"
    result = runner.invoke(cli, ["ca", "revoke", f"0x{serial}", "--ca-dir", str(ca_dir)])
    assert result.exit_code == 0 and f"revoked serial {serial}" in result.output
    assert len(cli_ca.revoked_serials(ca_dir)) == 3
    result = runner.invoke(cli, ["ca", "revoke", "77", "--ca-dir", str(ca_dir)])
    assert result.exit_code == 1 and "no certificate was issued to agent 077" in result.output
    result = runner.invoke(cli, ["ca", "revoke", "zz", "--ca-dir", str(ca_dir)])
    assert result.exit_code == 1 and "neither an agent id nor a serial" in result.output
    missing = runner.invoke(
        cli,
        ["ca", "issue-agent", "1", "--ca-dir", str(tmp_path / "no"), "--out", str(tmp_path / "x")],
    )
    assert missing.exit_code == 1 and "ca init" in missing.output
    with pytest.raises(WpkUpgradeError, match="agent id must be"):
        cli_ca.issue_agent(ca_dir, 0, tmp_path / "zero")


def test_agent_id_of_certificates(lab_pki: Pki) -> None:
    assert tcp_tls.agent_id_of(pki.load_certificate(lab_pki.agents[3].cert)) == 3
    assert tcp_tls.agent_id_of(pki.load_certificate(lab_pki.manager.cert)) is None
    assert tcp_tls.agent_common_name(7) == "agent:007"


def test_plain_tcp_beyond_loopback_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    """Plain TCP lets anyone who reaches the port speak as any agent: listening so on another
    interface than loopback is logged as a warning; on loopback it is not."""

    class NoHub:
        pass

    async def listen(address: str) -> None:
        transport = TcpTransport(options(listen=address, tls=False))
        await transport.serve(NoHub())  # type: ignore[arg-type]
        await transport.close()

    caplog.set_level(logging.INFO)
    asyncio.run(listen("127.0.0.1:0"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    asyncio.run(listen("0.0.0.0:0"))
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "plain TCP on 0.0.0.0" in warned[0]
