"""The ``wpk`` command group, through click's CliRunner and as a real process
(``python -m wpk_upgrade.cli_wpk``): lab CA, pack, verify, inspect, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from wpk_upgrade.cli_wpk import wpk_group


def invoke(*args: object) -> Result:
    return CliRunner().invoke(wpk_group, [str(a) for a in args], catch_exceptions=False)


def assert_one_error_line(stderr: str, start: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(start), stderr
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cli")
    assert invoke("ca", "init", base / "ca").exit_code == 0
    assert invoke("ca", "init", base / "ca2", "--cn", "rotated CA").exit_code == 0
    result = invoke(
        "ca", "sign", "--ca-dir", base / "ca", "--out", base / "keys", "--cn", "WPK signer"
    )
    assert result.exit_code == 0, result.output
    assert "WPK_signer.pem" in result.output
    payload = base / "payload"
    payload.mkdir()
    (payload / "upgrade.sh").write_text("#!/bin/sh\nexit 0\n")
    (payload / "wazuh-agent.deb").write_bytes(os.urandom(4000))
    return {
        "base": base,
        "ca": base / "ca" / "ca.pem",
        "ca2": base / "ca2" / "ca.pem",
        "cert": base / "keys" / "WPK_signer.pem",
        "key": base / "keys" / "WPK_signer.key",
        "payload": payload,
    }


@pytest.fixture(scope="module")
def package(lab: dict[str, Path]) -> Path:
    out = lab["base"] / "agent.wpk"
    result = invoke(
        "pack",
        out,
        "--cert",
        lab["cert"],
        "--key",
        lab["key"],
        "--installer",
        "upgrade.sh",
        lab["payload"] / "upgrade.sh",
        lab["payload"] / "wazuh-agent.deb",
    )
    assert result.exit_code == 0, result.output
    assert "sha256:" in result.output and "upgrade.sh" in result.output
    return out


def test_ca_sign_usages_and_ca_refuses_overwrite(lab: dict[str, Path]) -> None:
    result = invoke(
        "ca",
        "sign",
        "--ca-dir",
        lab["base"] / "ca",
        "--out",
        lab["base"] / "tls",
        "--cn",
        "manager.lab",
        "--usage",
        "server",
        "--san",
        "manager.lab",
        "--san",
        "10.1.2.3",
        "--key-size",
        "1024",
    )
    assert result.exit_code == 0, result.output
    assert (lab["base"] / "tls" / "manager.lab.pem").exists()
    again = invoke("ca", "init", lab["base"] / "ca")
    assert again.exit_code == 1
    assert_one_error_line(again.stderr, "error: ")
    assert "already exists" in again.stderr
    bad = invoke("ca", "sign", "--ca-dir", lab["base"], "--out", lab["base"], "--cn", "x")
    assert bad.exit_code == 1
    assert_one_error_line(bad.stderr, "error: cannot load certificate")


def test_verify_ok(lab: dict[str, Path], package: Path) -> None:
    result = invoke("verify", package, "--ca", lab["ca2"], "--ca", lab["ca"])
    assert result.exit_code == 0, result.output
    assert "signer:    CN=WPK signer" in result.output
    assert "issuer:    CN=wpk-upgrade lab CA" in result.output
    assert "validity:" in result.output and "sha1:" in result.output
    assert "sha256:" in result.output
    as_json = json.loads(invoke("verify", package, "--ca", lab["ca"], "--json").output)
    assert as_json["ca_verified"] is True
    assert as_json["chain"] == ["CN=WPK signer", "CN=wpk-upgrade lab CA"]


def test_verify_failures(lab: dict[str, Path], package: Path) -> None:
    wrong = invoke("verify", package, "--ca", lab["ca2"])
    assert wrong.exit_code == 1
    assert_one_error_line(wrong.stderr, "error: 13 Could not verify signature: signer")
    expired = invoke("verify", package, "--ca", lab["ca"], "--at", "2100-01-01")
    assert expired.exit_code == 1
    assert "expired on" in expired.stderr
    tampered = lab["base"] / "tampered.wpk"
    data = bytearray(package.read_bytes())
    data[-20] ^= 0xFF
    tampered.write_bytes(bytes(data))
    bad = invoke("verify", tampered, "--no-ca")
    assert bad.exit_code == 1
    assert "signature does not match" in bad.stderr
    no_ca = invoke("verify", package, "--no-ca")
    assert no_ca.exit_code == 0
    assert "NOT CHECKED" in no_ca.output and "warning:" in no_ca.stderr
    usage = invoke("verify", package)
    assert usage.exit_code == 2 and "--ca" in usage.stderr
    both = invoke("verify", package, "--ca", lab["ca"], "--no-ca")
    assert both.exit_code == 2


def test_inspect(lab: dict[str, Path], package: Path) -> None:
    human = invoke("inspect", package)
    assert human.exit_code == 0, human.output
    assert "members:    2" in human.output and "wazuh-agent.deb" in human.output
    assert "tag:        agent.wpk" in human.output
    info = json.loads(invoke("inspect", package, "--json").output)
    assert info["errors"] == [] and info["signature_valid"] is True
    assert [m["name"] for m in info["members"]] == ["upgrade.sh", "wazuh-agent.deb"]
    garbage = lab["base"] / "garbage.wpk"
    garbage.write_bytes(os.urandom(1000))
    bad = invoke("inspect", garbage)
    assert bad.exit_code == 1
    assert_one_error_line(bad.stderr, "error: ")
    assert "13 Could not verify signature: bad magic" in bad.stderr


def test_pack_errors(lab: dict[str, Path]) -> None:
    result = invoke(
        "pack",
        lab["base"] / "x.wpk",
        "--cert",
        lab["cert"],
        "--key",
        lab["key"],
        "--installer",
        "missing.sh",
        lab["payload"],
    )
    assert result.exit_code == 1
    assert_one_error_line(result.stderr, "error: installer 'missing.sh' is not among")
    assert not (lab["base"] / "x.wpk").exists()
    as_json = invoke(
        "pack",
        lab["base"] / "d.wpk",
        "--cert",
        lab["cert"],
        "--key",
        lab["key"],
        "--json",
        "--installer",
        "payload/upgrade.sh",
        lab["payload"],
    )
    assert as_json.exit_code == 0, as_json.output
    names = [m["name"] for m in json.loads(as_json.output)["members"]]
    assert names == ["payload/upgrade.sh", "payload/wazuh-agent.deb"]


# ---------------------------------------------------------------------------------------------
# as a real process


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wpk_upgrade.cli_wpk", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_real_process_round_trip(tmp_path: Path) -> None:
    assert run_cli("ca", "init", tmp_path / "ca", "--key-size", "2048").returncode == 0
    signed = run_cli("ca", "sign", "--ca-dir", tmp_path / "ca", "--out", tmp_path, "--cn", "signer")
    assert signed.returncode == 0, signed.stderr
    (tmp_path / "upgrade.sh").write_text("#!/bin/sh\n")
    packed = run_cli(
        "pack",
        tmp_path / "p.wpk",
        "--cert",
        tmp_path / "signer.pem",
        "--key",
        tmp_path / "signer.key",
        "--installer",
        "upgrade.sh",
        tmp_path / "upgrade.sh",
    )
    assert packed.returncode == 0, packed.stderr
    ok = run_cli("verify", tmp_path / "p.wpk", "--ca", tmp_path / "ca" / "ca.pem")
    assert ok.returncode == 0, ok.stderr
    assert "CN=signer" in ok.stdout
    other = run_cli("ca", "init", tmp_path / "other", "--key-size", "1024")
    assert other.returncode == 0
    refused = run_cli("verify", tmp_path / "p.wpk", "--ca", tmp_path / "other" / "ca.pem")
    assert refused.returncode == 1
    assert_one_error_line(refused.stderr, "error: 13 Could not verify signature:")
    missing = run_cli("inspect", tmp_path / "nope.wpk")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    helped = run_cli("--help")
    assert helped.returncode == 0
    for command in ("pack", "verify", "inspect", "ca"):
        assert command in helped.stdout


def test_installer_template(tmp_path: Path) -> None:
    """``wpk installer-template`` prints (or writes, executable) the installer the demo's
    packages run end to end (tests/test_e2e.py); it is valid sh."""
    from wpk_upgrade import demo

    printed = run_cli("installer-template")
    assert printed.returncode == 0 and printed.stdout == demo.INSTALLER
    assert printed.stdout.startswith("#!/bin/sh\n") and "upgrade_result" in printed.stdout
    out = tmp_path / "upgrade.sh"
    written = run_cli("installer-template", "--out", out)
    assert written.returncode == 0 and out.read_text() == demo.INSTALLER
    assert os.access(out, os.X_OK)
    assert subprocess.run(["sh", "-n", str(out)], check=False).returncode == 0
    bad = run_cli("installer-template", "--out", tmp_path / "no" / "such" / "dir" / "x.sh")
    assert bad.returncode == 1 and bad.stderr.startswith("error: ")
