"""``wpk-upgrade ca ...``: a lab certificate authority for the ``tcp`` transport's mutual TLS.

Commands (a thin shell over the functions below, which tests and the demo call directly):

* ``ca init DIR``: a self-signed CA (``ca.pem``, ``ca.key`` mode 0600), an empty revocation list
  ``crl.pem`` and the index of issued agent certificates ``issued.json``;
* ``ca issue-manager --ca-dir DIR --out OUT --san NAME...``: the manager's server certificate
  ``OUT/manager.pem`` + ``manager.key`` (subjectAltName: the given DNS names / IP addresses),
  with a copy of the CA certificate ``OUT/ca.pem`` (what the manager trusts for agents);
* ``ca issue-agent ID --ca-dir DIR --out OUT``: agent ``ID``'s client certificate
  ``OUT/agent.pem`` + ``agent.key``, subject ``CN=agent:<ID>`` (three digits at least,
  ``agent:005``; that is how the manager identifies the agent), plus ``OUT/ca.pem`` (what the
  agent trusts for its manager); its serial number is recorded in ``issued.json``;
* ``ca revoke ID|SERIAL --ca-dir DIR``: adds every certificate issued to agent ``ID`` (a decimal
  agent id, at most six digits) or the certificate with serial ``SERIAL`` (hexadecimal,
  optionally ``0x``-prefixed or colon-separated) to ``crl.pem``, re-signed. The manager
  re-reads the CRL when it changes (transport option ``crl``).

One CA serves both directions here (agents trust it for the manager, the manager trusts it for
agents); separate CAs work the same, with ``ca`` pointing at the other one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from . import pki
from .errors import WpkUpgradeError

CRL_NAME = "crl.pem"
INDEX_NAME = "issued.json"
CRL_DAYS = 365
MAX_AGENT_ID = 999999


@dataclass(frozen=True)
class IssuedAgent:
    """Where an agent certificate was written, and its serial number."""

    agent_id: int
    cert: Path
    key: Path
    ca: Path
    serial: int


def _ca_files(ca_dir: Path) -> pki.CaFiles:
    files = pki.CaFiles(cert=Path(ca_dir) / "ca.pem", key=Path(ca_dir) / "ca.key")
    for path in (files.cert, files.key):
        if not path.is_file():
            raise WpkUpgradeError(f"{path} not found (run `wpk-upgrade ca init {ca_dir}` first)")
    return files


def _read_index(ca_dir: Path) -> dict[str, list[str]]:
    path = Path(ca_dir) / INDEX_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise WpkUpgradeError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise WpkUpgradeError(f"{path} is not a JSON object")
    return {str(k): [str(s) for s in v] for k, v in data.items() if isinstance(v, list)}


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def init_ca(
    ca_dir: Path,
    common_name: str = "wpk-upgrade transport CA",
    *,
    days: int = 3650,
    key_type: pki.KeyType = "rsa",
) -> pki.CaFiles:
    """Create the CA, an empty CRL and the issued-certificates index in ``ca_dir``."""
    files = pki.create_ca(Path(ca_dir), common_name, days, key_type=key_type)
    write_crl(ca_dir, [])
    _write_atomic(Path(ca_dir) / INDEX_NAME, b"{}\n")
    return files


def issue_manager(
    ca_dir: Path,
    out: Path,
    san: Sequence[str],
    *,
    common_name: str = "wpk-upgrade manager",
    days: int = 825,
    key_type: pki.KeyType = "rsa",
    overwrite: bool = False,
) -> pki.CertFiles:
    """The manager's TLS server certificate in ``out`` (``manager.pem``/``.key``, ``ca.pem``)."""
    if not san:
        raise WpkUpgradeError("give at least one --san (the name or address agents connect to)")
    ca = _ca_files(ca_dir)
    files = pki.issue_certificate(
        ca.cert,
        ca.key,
        Path(out),
        common_name,
        "server",
        san=list(san),
        days=days,
        key_type=key_type,
        basename="manager",
        overwrite=overwrite,
    )
    shutil.copyfile(ca.cert, Path(out) / "ca.pem")
    return files


def issue_agent(
    ca_dir: Path,
    agent_id: int,
    out: Path,
    *,
    days: int = 825,
    key_type: pki.KeyType = "rsa",
    basename: str = "agent",
    overwrite: bool = False,
) -> IssuedAgent:
    """Agent ``agent_id``'s client certificate (``CN=agent:NNN``) in ``out``; indexed."""
    if not 0 < agent_id <= MAX_AGENT_ID:
        raise WpkUpgradeError(f"agent id must be 1..{MAX_AGENT_ID}, got {agent_id}")
    ca = _ca_files(ca_dir)
    files = pki.issue_certificate(
        ca.cert,
        ca.key,
        Path(out),
        f"agent:{agent_id:03d}",
        "client",
        days=days,
        key_type=key_type,
        basename=basename,
        overwrite=overwrite,
    )
    serial = pki.load_certificate(files.cert).serial_number
    index = _read_index(ca_dir)
    index.setdefault(str(agent_id), []).append(f"{serial:x}")
    _write_atomic(Path(ca_dir) / INDEX_NAME, (json.dumps(index, indent=1) + "\n").encode())
    ca_copy = Path(out) / "ca.pem"
    shutil.copyfile(ca.cert, ca_copy)
    return IssuedAgent(agent_id, files.cert, files.key, ca_copy, serial)


def _load_crl(ca_dir: Path) -> x509.CertificateRevocationList | None:
    path = Path(ca_dir) / CRL_NAME
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise WpkUpgradeError(f"cannot read {path}: {exc}") from exc


def revoked_serials(ca_dir: Path) -> list[int]:
    """Serial numbers listed in the CA's CRL."""
    crl = _load_crl(ca_dir)
    return [] if crl is None else [entry.serial_number for entry in crl]


def write_crl(ca_dir: Path, serials: Sequence[int], *, days: int = CRL_DAYS) -> Path:
    """(Re)sign ``crl.pem`` listing exactly ``serials`` (earlier revocation dates are kept)."""
    ca = _ca_files(ca_dir)
    ca_cert = pki.load_certificate(ca.cert)
    ca_key = pki.load_private_key(ca.key)
    now = datetime.now(UTC)
    previous = _load_crl(ca_dir)
    dates = {e.serial_number: e.revocation_date_utc for e in previous} if previous else {}
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - pki.CLOCK_SKEW)
        .next_update(now + timedelta(days=days))
    )
    for serial in sorted(set(serials)):
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(dates.get(serial, now))
            .build()
        )
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(ca_key, hashes.SHA256())
    path = Path(ca_dir) / CRL_NAME
    _write_atomic(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def parse_serial(text: str) -> int:
    """A certificate serial: hexadecimal, ``0x``-prefixed or colon-separated allowed."""
    cleaned = text.strip().lower().removeprefix("0x").replace(":", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise WpkUpgradeError(f"{text!r} is neither an agent id nor a serial number") from None
    if value <= 0:
        raise WpkUpgradeError(f"serial number must be positive, got {text!r}")
    return value


def revoke(ca_dir: Path, target: str) -> list[int]:
    """Revoke agent ``target``'s certificates (decimal id) or the serial ``target``; returns
    the serials newly added to the CRL."""
    text = target.strip()
    if text.isdigit() and len(text) <= len(str(MAX_AGENT_ID)):
        agent_id = int(text)
        issued = _read_index(ca_dir).get(str(agent_id), [])
        if not issued:
            raise WpkUpgradeError(f"no certificate was issued to agent {agent_id:03d} by this CA")
        serials = [int(s, 16) for s in issued]
    else:
        serials = [parse_serial(text)]
    current = revoked_serials(ca_dir)
    added = [s for s in serials if s not in current]
    if added:
        write_crl(ca_dir, [*current, *added])
    return added


# --------------------------------------------------------------------------- commands


def _fail(exc: WpkUpgradeError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.group("ca")
def ca_group() -> None:
    """A lab CA for the agent transport's mutual TLS (manager and agent certificates, CRL)."""


@ca_group.command("init")
@click.argument("ca_dir", type=click.Path(file_okay=False))
@click.option("--cn", "common_name", default="wpk-upgrade transport CA", show_default=True)
@click.option("--days", default=3650, show_default=True, help="Validity of the CA.")
def init_command(ca_dir: str, common_name: str, days: int) -> None:
    """Create a CA in CA_DIR (ca.pem, ca.key, an empty crl.pem, issued.json)."""
    try:
        files = init_ca(Path(ca_dir), common_name, days=days)
    except WpkUpgradeError as exc:
        _fail(exc)
        return
    click.echo(f"CA certificate {files.cert}")
    click.echo(f"CA key         {files.key} (keep it private)")
    click.echo(f"CRL            {Path(ca_dir) / CRL_NAME}")


@ca_group.command("issue-manager")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--san", multiple=True, required=True, help="DNS name or IP address (repeat).")
@click.option("--cn", "common_name", default="wpk-upgrade manager", show_default=True)
@click.option("--days", default=825, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def issue_manager_command(
    ca_dir: str, out: str, san: tuple[str, ...], common_name: str, days: int, force: bool
) -> None:
    """Issue the manager's TLS server certificate into OUT."""
    try:
        files = issue_manager(
            Path(ca_dir), Path(out), san, common_name=common_name, days=days, overwrite=force
        )
    except WpkUpgradeError as exc:
        _fail(exc)
        return
    click.echo(f"manager certificate {files.cert}")
    click.echo(f"manager key         {files.key}")
    click.echo(f"agent CA            {Path(out) / 'ca.pem'}")


@ca_group.command("issue-agent")
@click.argument("agent_id", type=int)
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--days", default=825, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def issue_agent_command(agent_id: int, ca_dir: str, out: str, days: int, force: bool) -> None:
    """Issue agent AGENT_ID's client certificate (CN=agent:NNN) into OUT."""
    try:
        issued = issue_agent(Path(ca_dir), agent_id, Path(out), days=days, overwrite=force)
    except WpkUpgradeError as exc:
        _fail(exc)
        return
    click.echo(f"agent {agent_id:03d} certificate {issued.cert} (serial {issued.serial:x})")
    click.echo(f"agent {agent_id:03d} key         {issued.key}")
    click.echo(f"manager CA        {issued.ca}")


@ca_group.command("revoke")
@click.argument("target")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False))
def revoke_command(target: str, ca_dir: str) -> None:
    """Revoke agent TARGET's certificates (agent id) or one certificate (hex SERIAL)."""
    try:
        added = revoke(Path(ca_dir), target)
    except WpkUpgradeError as exc:
        _fail(exc)
        return
    crl = Path(ca_dir) / CRL_NAME
    if not added:
        click.echo(f"already revoked; {crl} unchanged")
        return
    for serial in added:
        click.echo(f"revoked serial {serial:x}")
    click.echo(f"CRL updated: {crl}")


def attach(cli: Any) -> None:
    """Add the ``ca`` group to the main command line."""
    cli.add_command(ca_group, "ca")
