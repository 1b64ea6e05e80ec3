"""The ``wpk`` command group: build, verify and inspect WPK packages, and run a lab CA.

Attached to the main CLI as ``wpk-upgrade wpk ...``; also runnable on its own with
``python -m wpk_upgrade.cli_wpk ...``. A thin shell over ``wpk_upgrade.wpk`` and
``wpk_upgrade.pki``: every failure prints one line on stderr (``error: <code> <text>: <detail>``
for a refused WPK) and exits 1; usage errors exit 2; never a traceback.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from wpk_upgrade import pki, wpk
from wpk_upgrade.errors import WpkError, WpkUpgradeError

__all__ = ["wpk_group"]

F = TypeVar("F", bound=Callable[..., Any])

EXIT_FAILED = 1


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(EXIT_FAILED)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, WpkError):
        return (
            f"{int(exc.code)} {exc.text}: {exc.detail}"
            if exc.detail
            else f"{int(exc.code)} {exc.text}"
        )
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or exc}"
    return " ".join(str(exc).split()) or type(exc).__name__


def _handle_errors(func: F) -> F:
    """Turn project and OS errors into one ``error:`` line and exit status 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (WpkUpgradeError, OSError) as exc:
            _fail(_one_line(exc))

    return wrapper  # type: ignore[return-value]


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


_PATH = click.Path(path_type=Path)
_EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group("wpk")
def wpk_group() -> None:
    """Build, verify and inspect WPK packages; run a lab CA."""


@wpk_group.command("pack")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--cert", required=True, type=_EXISTING_FILE, help="Signer certificate (PEM).")
@click.option("--key", required=True, type=_EXISTING_FILE, help="Signer RSA private key (PEM).")
@click.option("--installer", help="Installer member name; must be one of the packed files.")
@click.option("--tag", help="First line of the payload (default: the output's file name).")
@click.option(
    "--compress-level", default=6, show_default=True, type=click.IntRange(0, 9), help="gzip level."
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_handle_errors
def pack_cmd(
    out: Path,
    files: tuple[Path, ...],
    cert: Path,
    key: Path,
    installer: str | None,
    tag: str | None,
    compress_level: int,
    as_json: bool,
) -> None:
    """Sign FILE... (files and directories) into the WPK OUT."""
    result = wpk.pack(
        out, cert, key, files, installer=installer, tag=tag, compresslevel=compress_level
    )
    members = [{"name": m.name, "size": m.size} for m in result.members]
    if as_json:
        _echo_json(
            {
                "path": str(result.path),
                "size": result.size,
                "sha1": result.sha1,
                "sha256": result.sha256,
                "installer": result.installer,
                "members": members,
            }
        )
        return
    click.echo(f"wrote:   {result.path} ({result.size} bytes, {len(members)} members)")
    click.echo(f"sha1:    {result.sha1}")
    click.echo(f"sha256:  {result.sha256}")
    if result.installer:
        click.echo(f"installer: {result.installer}")
    for member in result.members:
        click.echo(f"  {member.size:>12}  {member.name}")


@wpk_group.command("verify")
@click.argument("file", type=_EXISTING_FILE)
@click.option(
    "--ca",
    "cas",
    multiple=True,
    type=_PATH,
    help="CA store: PEM file or certificate directory (repeat for rotation).",
)
@click.option(
    "--no-ca",
    is_flag=True,
    help="Skip the CA check (signature against the embedded certificate only).",
)
@click.option(
    "--at",
    type=click.DateTime(["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    help="Check validity dates at this UTC time instead of now.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_handle_errors
def verify_cmd(
    file: Path, cas: tuple[Path, ...], no_ca: bool, at: datetime | None, as_json: bool
) -> None:
    """Check FILE's signature, certificate chain and dates; exit 0 only if all hold."""
    if cas and no_ca:
        raise click.UsageError("--ca and --no-ca exclude each other")
    if not cas and not no_ca:
        raise click.UsageError("give at least one --ca (or --no-ca to skip the CA check)")
    if no_ca:
        click.echo(
            f"warning: No root CA defined to verify file '{file}': the signature is checked "
            "against the embedded certificate only",
            err=True,
        )
    when = at.replace(tzinfo=UTC) if at is not None else None
    result = wpk.verify(file, None if no_ca else list(cas), at=when)
    if as_json:
        _echo_json(
            {
                "path": str(result.path),
                "signer": result.signer_subject,
                "issuer": result.signer_issuer,
                "not_before": result.not_before.isoformat(),
                "not_after": result.not_after.isoformat(),
                "key_size": result.key_size,
                "ca_verified": result.ca_verified,
                "trust_anchor": result.trust_anchor,
                "chain": list(result.chain),
                "sha1": result.sha1,
                "sha256": result.sha256,
                "size": result.size,
            }
        )
        return
    click.echo(f"signature: ok (RSA {result.key_size})")
    click.echo(f"signer:    {result.signer_subject}")
    click.echo(f"issuer:    {result.signer_issuer}")
    click.echo(f"validity:  {_when(result.not_before)} .. {_when(result.not_after)}")
    if result.ca_verified:
        click.echo(f"trust:     chain {' <- '.join(result.chain)} (store {result.trust_anchor})")
    else:
        click.echo("trust:     NOT CHECKED (--no-ca)")
    click.echo(f"sha1:      {result.sha1}")
    click.echo(f"sha256:    {result.sha256}")


@wpk_group.command("inspect")
@click.argument("file", type=_EXISTING_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@_handle_errors
def inspect_cmd(file: Path, as_json: bool) -> None:
    """Describe FILE (header, signer, members) WITHOUT trusting it; exit 1 if it is malformed."""
    info = wpk.inspect(file)
    problems: list[str] = info["errors"]
    if as_json:
        _echo_json(info)
    else:
        _print_inspection(info)
    if problems:
        _fail(f"{file}: {problems[0]}" + (f" (+{len(problems) - 1} more)" if problems[1:] else ""))


def _print_inspection(info: dict[str, Any]) -> None:
    click.echo(f"file:       {info['path']} ({info.get('size', '?')} bytes)")
    for key in ("sha1", "sha256"):
        if key in info:
            click.echo(f"{key + ':':<11} {info[key]}")
    signer = info.get("signer")
    if signer:
        click.echo(f"signer:     {signer['subject']}")
        click.echo(f"issuer:     {signer['issuer']}")
        click.echo(f"validity:   {signer['not_before']} .. {signer['not_after']}")
        click.echo(f"key:        {signer['key_type']} {signer['key_size'] or ''}".rstrip())
        eku = signer["extended_key_usage"]
        click.echo(f"ext. usage: {', '.join(eku) if eku is not None else '(no extension)'}")
        for extra in info.get("extra_certificates", []):
            click.echo(f"also cert:  {extra['subject']} (issuer {extra['issuer']})")
    if "signature_valid" in info:
        state = "matches" if info["signature_valid"] else "DOES NOT match"
        click.echo(
            f"signature:  {info['signature_length']} bytes, {state} the embedded certificate "
            "(no trust check)"
        )
    if "payload_size" in info:
        unpacked = info.get("unpacked_size")
        click.echo(
            f"payload:    offset {info['payload_offset']}, {info['payload_size']} bytes gzip"
            + (f", {unpacked} bytes unpacked" if unpacked is not None else "")
        )
    if info.get("tag") is not None:
        click.echo(f"tag:        {info['tag']}")
    if "members" in info:
        click.echo(f"members:    {info['member_count']}")
        for member in info["members"]:
            click.echo(f"  {member['size']:>12}  {member['name']}")
    for problem in info["errors"]:
        click.echo(f"problem:    {problem}")


@wpk_group.command("installer-template")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write it to this file (mode 0755) instead of printing it.",
)
@_handle_errors
def installer_template_cmd(out: Path | None) -> None:
    """Print a working WPK installer (upgrade.sh): what the agent expects of an installer,
    commented; the demo's packages use it. Put your package manager's step in it."""
    from importlib import resources

    text = (resources.files("wpk_upgrade.agent") / "upgrade.sh").read_text()
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text)
    out.chmod(0o755)
    click.echo(f"installer: {out}")


@wpk_group.group("ca")
def ca_group() -> None:
    """A lab CA for people without a PKI (RSA 2048 by default)."""


@ca_group.command("init")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cn", default="wpk-upgrade lab CA", show_default=True, help="CA common name.")
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1), help="Validity.")
@click.option("--key-size", default=2048, show_default=True, type=click.IntRange(1024))
@click.option("--force", is_flag=True, help="Overwrite an existing ca.pem/ca.key.")
@_handle_errors
def ca_init_cmd(directory: Path, cn: str, days: int, key_size: int, force: bool) -> None:
    """Create a self-signed CA in DIRECTORY (ca.pem, ca.key with mode 0600)."""
    files = pki.create_ca(directory, cn, days, key_size, overwrite=force)
    click.echo(f"certificate: {files.cert}")
    click.echo(f"private key: {files.key}")


@ca_group.command("sign")
@click.option(
    "--ca-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory made by 'wpk ca init'.",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--cn", required=True, help="Common name of the new certificate.")
@click.option(
    "--usage",
    default="code",
    show_default=True,
    type=click.Choice(["code", "server", "client", "ca"]),
    help="code = WPK signer; server/client = TLS; ca = intermediate CA.",
)
@click.option("--san", multiple=True, help="subjectAltName (DNS name or IP address); repeat.")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1))
@click.option("--key-size", default=2048, show_default=True, type=click.IntRange(1024))
@click.option("--key-type", default="rsa", show_default=True, type=click.Choice(["rsa", "ec"]))
@click.option("--basename", help="File names <basename>.pem/.key (default: from the CN).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@_handle_errors
def ca_sign_cmd(
    ca_dir: Path,
    out_dir: Path,
    cn: str,
    usage: pki.Usage,
    san: tuple[str, ...],
    days: int,
    key_size: int,
    key_type: pki.KeyType,
    basename: str | None,
    force: bool,
) -> None:
    """Issue a certificate and key signed by the lab CA in --ca-dir."""
    files = pki.issue_certificate(
        ca_dir / "ca.pem",
        ca_dir / "ca.key",
        out_dir,
        cn,
        usage,
        san=san,
        days=days,
        key_size=key_size,
        key_type=key_type,
        basename=basename,
        overwrite=force,
    )
    click.echo(f"certificate: {files.cert}")
    click.echo(f"private key: {files.key}")


if __name__ == "__main__":
    wpk_group(prog_name="wpk")
