"""R4: package attacks end to end. The tamper matrix of ``tests/test_wpk_tamper.py`` (bit
flips, truncations, untrusted or expired signers, hostile members, gzip bombs and corrupt
streams, a missing installer), each pushed as an ``upgrade_custom`` through a real manager to a
real agent process that verifies against the lab CA.

Every package carries an installer that would create a marker file. For each: the task ends
Error with the agent's refusal, the marker never appears, and nothing changes on disk outside
the agent's ``var/incoming`` (where the transfer lands by design): not the agent's
``var/upgrade`` (never a partial WPK), not its configuration, not the marker's directory. A
control run of an untampered package first proves the marker mechanism works.
"""

from __future__ import annotations

import gzip
import os
import shutil
import zlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from hardlib import (
    MARKER_INSTALLER,
    AgentProc,
    Figure,
    Lab,
    Size,
    diff_trees,
    scratch,
    tree_snapshot,
    wait_until,
)

from wpk_upgrade import pki, wpk
from wpk_upgrade.errors import TaskCode
from wpk_upgrade.testing.harness import ManagerHarness, manager_config

MAGIC = wpk.MAGIC
SKIP = ("var/incoming", "var/run", "logs", "queue", "agent.stderr")


class Matrix:
    """Builds the tampered packages (name -> path) of the lab."""

    def __init__(self, lab: Lab, out: Path, marker: Path) -> None:
        self.lab = lab
        self.out = out
        self.marker = marker
        out.mkdir(parents=True, exist_ok=True)
        self.installer = MARKER_INSTALLER.format(marker=marker).encode()
        self.good = lab.wpk(
            out / "good.wpk",
            {"upgrade.sh": self.installer, "pkg.bin": os.urandom(20000) + b"A" * 20000},
        )
        self.packages: dict[str, Path] = {}

    # ---- helpers
    def _signed(self, name: str, payload: bytes, signer: Any = None) -> None:
        signer = signer or self.lab.signer
        key = serialization.load_pem_private_key(signer.key.read_bytes(), None)
        assert isinstance(key, rsa.RSAPrivateKey)
        sig = key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
        path = self.out / f"signed-{len(self.packages)}.wpk"
        path.write_bytes(MAGIC + signer.cert.read_bytes() + b"\x00" + sig + payload)
        self.packages[name] = path

    def _merged(self, *members: tuple[bytes, bytes], raw: bytes = b"") -> bytes:
        body = b"#tamper\n" + b"!%d upgrade.sh\n" % len(self.installer) + self.installer
        for name, content in members:
            body += b"!%d " % len(content) + name + b"\n" + content
        return body + raw

    def _issue(self, name: str, usage: str = "code", issuer: Any = None, **kw: Any) -> Any:
        issuer = issuer or self.lab.ca
        return pki.issue_certificate(
            issuer.cert, issuer.key, self.out / "certs", name, usage, basename=name, **kw
        )  # type: ignore[arg-type]

    def _packed_by(self, name: str, signer: Any) -> None:
        src = self.out / "src"
        src.mkdir(exist_ok=True)
        (src / "upgrade.sh").write_bytes(self.installer)
        path = self.out / f"packed-{len(self.packages)}.wpk"
        wpk.pack(path, signer.cert, signer.key, [src / "upgrade.sh"])
        self.packages[name] = path

    # ---- the matrix
    def build(self, full: bool) -> dict[str, Path]:
        data = self.good.read_bytes()
        header = wpk.read_header(self.good)
        pem_end = len(MAGIC) + len(header.cert_pem)
        sig = pem_end + 1
        payload = header.payload_offset
        flips = {
            "magic": 0,
            "magic-end": 6,
            "cert": len(MAGIC) + 40,
            "cert-middle": (len(MAGIC) + pem_end) // 2,
            "nul": pem_end,
            "signature": sig,
            "signature-end": payload - 1,
            "payload-start": payload,
            "payload-middle": (payload + len(data)) // 2,
            "payload-end": len(data) - 1,
        }
        for where, offset in flips.items():
            flipped = bytearray(data)
            flipped[offset] ^= 0x41 if where == "nul" else 0x01
            path = self.out / f"flip-{where}.wpk"
            path.write_bytes(bytes(flipped))
            self.packages[f"bit flip in {where}"] = path
        for where, cut in {
            "magic": 3,
            "cert": len(MAGIC) + 100,
            "signature": sig + 100,
            "gzip header": payload + 5,
            "gzip body": (payload + len(data)) // 2,
            "gzip trailer": len(data) - 3,
        }.items():
            path = self.out / f"cut-{where.replace(' ', '-')}.wpk"
            path.write_bytes(data[:cut])
            self.packages[f"truncated in {where}"] = path

        now = datetime.now(UTC)
        other = pki.create_ca(self.out / "attacker-ca", common_name="attacker CA")
        self._packed_by("signer of another CA", self._issue("foreign", issuer=other))
        self._packed_by(
            "expired signer",
            self._issue(
                "expired", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
            ),
        )
        self._packed_by(
            "signer not valid yet",
            self._issue("future", not_before=now + timedelta(days=1), days=30),
        )
        self._packed_by("signer without codeSigning", self._issue("server-only", "server"))
        self._packed_by("self-signed attacker", other)
        ec_signer = self._issue("ec", key_type="ec")
        ec_key = serialization.load_pem_private_key(ec_signer.key.read_bytes(), None)
        assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
        body = gzip.compress(self._merged())
        path = self.out / "ec.wpk"
        ec_sig = ec_key.sign(body, ec.ECDSA(hashes.SHA256()))
        path.write_bytes(MAGIC + ec_signer.cert.read_bytes() + b"\x00" + ec_sig + body)
        self.packages["EC signer"] = path
        foreign_key = serialization.load_pem_private_key(
            self._issue("foreign-key").key.read_bytes(), None
        )
        assert isinstance(foreign_key, rsa.RSAPrivateKey)
        path = self.out / "other-key.wpk"
        other_sig = foreign_key.sign(body, padding.PKCS1v15(), hashes.SHA256())
        path.write_bytes(MAGIC + self.lab.signer.cert.read_bytes() + b"\x00" + other_sig + body)
        self.packages["signature by another key"] = path

        for label, name in {
            "member ../evil": b"../evil",
            "member a/../../evil": b"a/../../evil",
            "member ..\\evil": b"..\\evil",
            "member /etc/evil": b"/etc/evil",
            "member C:\\evil": b"C:\\evil",
            "member with NUL": b"a\x00b",
            "member with escape codes": b"a\x1b[31mb",
            "member empty name": b"",
            "member not UTF-8": b"\xff\xfe",
        }.items():
            self._signed(label, gzip.compress(self._merged((name, b"x"))))
        self._signed("duplicate members", gzip.compress(self._merged((b"d", b"1"), (b"d", b"2"))))
        self._signed(
            "member file then dir", gzip.compress(self._merged((b"a", b"1"), (b"a/b", b"2")))
        )
        self._signed("member size lie", gzip.compress(self._merged(raw=b"!100000 big\nshort")))
        self._signed("member size not a number", gzip.compress(self._merged(raw=b"!abc x\n")))
        self._signed("header line over 2048", gzip.compress(self._merged((b"n" * 2100, b"x"))))
        self._signed("empty payload", b"")
        self._signed("payload not gzip", self._merged())
        self._signed("gzip then garbage", gzip.compress(self._merged()) + b"trailing garbage")
        full_gz = gzip.compress(self._merged((b"pkg", os.urandom(5000))))
        self._signed("gzip cut but signed", full_gz[: len(full_gz) // 2])
        crc = bytearray(gzip.compress(self._merged()))
        crc[-8] ^= 1
        self._signed("gzip bad CRC", bytes(crc))
        self._signed("gzip bomb 64 MiB", self._bomb(64 << 20))
        if full:
            self._signed("gzip bomb 1 GiB", self._bomb(1 << 30))
        no_installer = self._merged().replace(b"upgrade.sh", b"another.sh")
        self._signed("installer missing", gzip.compress(no_installer))
        return self.packages

    def _bomb(self, size: int) -> bytes:
        comp = zlib.compressobj(9, zlib.DEFLATED, 31)
        parts = [comp.compress(self._merged() + b"!%d bomb\n" % size)]
        zeros = bytes(1 << 20)
        for _ in range(size >> 20):
            parts.append(comp.compress(zeros))
        parts.append(comp.flush())
        return b"".join(parts)


def measure(size: Size) -> list[Figure]:
    fig = Figure("R4", "package attacks")
    root = scratch("r4")
    lab = Lab.create(root / "lab")
    marker_dir = root / "outside"
    marker_dir.mkdir()
    marker = marker_dir / "INSTALLER-RAN"
    matrix = Matrix(lab, root / "packages", marker)
    packages = matrix.build(size.full)
    config = manager_config(
        root / "manager",
        upgrade={"command_timeout": 30, "open_attempts": 3, "open_retry_delay": 0.2},
    )
    with ManagerHarness(config) as harness:
        agents = [
            AgentProc(
                root / f"agent{i}", 40 + i, harness.transport_address, ca_store=lab.ca.cert
            ).start()
            for i in (1, 2)
        ]
        try:
            for agent in agents:
                agent.wait_serving()
            hub = harness.manager.hub if harness.manager else None
            assert hub is not None
            wait_until(lambda: all(hub.link(a.agent_id) for a in agents), 30, "agents connected")

            def upgrade(agent: AgentProc, package: Path) -> dict[str, Any]:
                reply = harness.upgrade(
                    {
                        "origin": {"module": "api"},
                        "command": "upgrade_custom",
                        "parameters": {"agents": [agent.agent_id], "file_path": str(package)},
                    }
                )
                item: dict[str, Any] = reply["data"][0]
                return item

            # control: the untampered package installs, and its installer leaves the marker
            control = agents[0]
            item = upgrade(control, matrix.good)
            wait_until(marker.exists, 60, "the control installer's marker")
            fig.notes.append("control: the untampered package ran its installer (marker seen)")
            end_task(harness, control.agent_id, "Done")
            marker.unlink()
            shutil.rmtree(control.home / "var" / "upgrade")
            (control.home / "var" / "upgrade").mkdir()

            def watched() -> dict[str, str]:
                state = {}
                for agent in agents:
                    for k, v in tree_snapshot(agent.home, SKIP).items():
                        state[f"{agent.agent_id}:{k}"] = v
                for k, v in tree_snapshot(marker_dir).items():
                    state[f"outside:{k}"] = v
                return state

            before = watched()
            names = list(packages)
            for start in range(0, len(names), 2):
                batch = list(zip(agents, names[start : start + 2], strict=False))
                sent = []
                for agent, name in batch:
                    item = upgrade(agent, packages[name])
                    sent.append((agent, name, item))
                for agent, name, item in sent:
                    judge(harness, fig, agent, name, item, marker, before, watched)
        finally:
            for agent in agents:
                agent.stop()
    return [fig]


def end_task(harness: ManagerHarness, agent_id: int, outcome: str) -> None:
    """Make the agent's task final, so that the agent can be sent the next package: cancel
    it, or, when its installer started (cancel refused: task code 8), record ``outcome``
    as the agent's report would."""
    reply = harness.task(
        {
            "origin": {"module": "api"},
            "command": "upgrade_cancel",
            "parameters": {"agents": [agent_id]},
        }
    )
    if reply["data"][0]["error"] == TaskCode.INSTALLER_STARTED:
        reply = harness.task(
            {
                "origin": {"module": "upgrade_module", "name": harness.config.node_name},
                "command": "upgrade_update_status",
                "parameters": {"agents": [agent_id], "status": outcome},
            }
        )
        assert reply["data"][0]["error"] == 0, reply


def judge(
    harness: ManagerHarness,
    fig: Figure,
    agent: AgentProc,
    name: str,
    item: dict[str, Any],
    marker: Path,
    before: dict[str, str],
    watched: Callable[[], dict[str, str]],
) -> None:
    problems = []
    outcome = f"refused at request time ({item.get('message')})"
    if item.get("error") == 0:
        try:
            (final,) = harness.wait_final([agent.agent_id], 120)
        except AssertionError:
            (final,) = harness.result([agent.agent_id])
        history = harness.store.history(final["task_id"])
        reasons = [c.reason or "" for c in history]
        outcome = f"{final['status']}: {reasons[-1] if reasons else ''}"[:200]
        if final["status"] != "Error":
            problems.append(f"task ended {final['status']}")
            end_task(harness, agent.agent_id, "Failed")
    if marker.exists():
        problems.append("THE INSTALLER RAN")
        marker.unlink()
    changed = diff_trees(before, watched())
    if changed:
        problems.append(f"files changed: {changed[:5]}")
    if not agent.alive():
        problems.append("the agent died")
    if problems:
        fig.fail(f"{name}: {'; '.join(problems)} ({outcome})")
    else:
        fig.ok()
        if len(fig.notes) < 60:
            fig.notes.append(f"{name}: {outcome}")
