"""The WPK package format: pack, read, verify (signature and trust) and unpack safely.

Byte layout (reference §6.1-6.2, decision D8: byte-compatible with the reference ``wpkpack.py``)::

    b"WPK256\\0"                     7 bytes of magic
    <signer certificate PEM text>    verbatim, may hold further certificates (intermediates)
    b"\\0"                           ends the PEM
    <RSA signature>                  PKCS#1 v1.5 over SHA-256(payload); length = key size in bytes
    <payload>                        a gzip stream of the "merged file":
                                       optional first line  b"#<tag>\\n"
                                       per member           b"!<size> <name>\\n" + <size> bytes
                                       other lines not starting with "!" are skipped

Unlike the reference (which reads exactly 256 signature bytes), any RSA key size works: the
signature length follows the signer's key.

Public API::

    pack(out, cert, key, files, *, installer=None, tag=None) -> PackResult
    read_header(path) -> WpkHeader
    verify(path, ca_stores, *, at=None) -> VerifiedWpk
    unpack(path, dest, limits=UnpackLimits()) -> list[Member]
    verify_and_unpack(path, ca_stores, dest, installer, limits=UnpackLimits(), *, at=None)
        -> UnpackedWpk
    inspect(path, limits=UnpackLimits()) -> dict
    file_digests(path) -> (sha1_hex, sha256_hex)

Everything streams in 1 MiB blocks: a WPK is never held in memory. Every refusal of a WPK raises
``WpkError(code, detail)`` with the agent code of the failed step (reference §6.3):

    13 SIGNATURE          file cannot be opened, magic, certificate, key type, signature, CA
                          chain, dates, EKU; also "the payload changed after its signature was
                          verified" (the unpack pass re-hashes the payload)
    14 UNCOMPRESS         corrupt, truncated or empty gzip stream, trailing garbage, and the
                          gzip-bomb limits applied to the decompressed byte flow (total unpacked
                          size, compression ratio)
    15 CLEAN_UPGRADE_DIR  the destination could not be emptied
    16 UNMERGE            merged-file structure: a line over 2048 bytes (newline included;
                          skipped lines and the tag too), a malformed ``!<size> <name>`` header,
                          an unsafe or duplicate member name (see ``normalize_member_name``), a
                          member announcing more bytes than remain, the member count and single
                          member size limits, a payload with no member, write errors
    5  INVALID_FILE_NAME  the installer name is empty, absolute, has a ``..`` part or a NUL
    17 CHMOD              the installer is not a member of the package (the reference fails at
                          its chmod step in this case)

Checks run in the reference order (13, 14, 16, 5) and all of them run before ``dest`` is
touched: the payload is unpacked into a private temporary directory (mode 0700) beside ``dest``
(files 0640, directories 0750, never through a symlink); only when it is complete and valid is
``dest`` emptied (15: everything in it, including an old ``upgrade_result``; symlinks are
removed, not followed) and the unpacked entries renamed into it. On any failure the temporary
directory is removed and nothing else has been written.
Where several faults exist the reference's code wins: a structure fault followed by a corrupt
gzip stream is reported as 14, as the reference (which gunzips fully first) would.

Trust (``ca_stores`` not None): the signer certificate must chain to a certificate of one of the
store entries (each tried on its own, like the reference's fresh X509 store per entry). Every
certificate of an entry is a trust anchor (a direct issuer, an intermediate kept in the anchor
file, or the signer itself when pinned); certificates after the first one in the WPK's PEM are
used as untrusted intermediates. Every certificate of the chain must be within its validity
dates; issuers must be CAs (basicConstraints, keyCertSign, path length); a signer that carries
an ExtendedKeyUsage extension must allow codeSigning (or anyExtendedKeyUsage).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import ExtendedKeyUsageOID

from wpk_upgrade.errors import AgentCode, WpkError, WpkUpgradeError

__all__ = [
    "MAGIC",
    "MAX_HEADER_LINE",
    "Member",
    "PackResult",
    "UnpackLimits",
    "UnpackedWpk",
    "VerifiedWpk",
    "WpkHeader",
    "describe_certificate",
    "file_digests",
    "inspect",
    "normalize_member_name",
    "pack",
    "read_header",
    "remove_stale",
    "unpack",
    "verify",
    "verify_and_unpack",
]

log = logging.getLogger(__name__)

MAGIC = b"WPK256\0"
#: Longest merged-file line, newline included (the reference reads lines into 2048 bytes).
MAX_HEADER_LINE = 2048
#: Longest signer PEM accepted before its NUL terminator.
MAX_CERT_PEM = 1 << 20
#: Read and decompression block size.
BLOCK = 1 << 20
#: Longest chain (signer included) the trust check builds.
MAX_CHAIN = 10
#: Most certificates a WPK's PEM section may carry besides its signer (intermediates).
MAX_EXTRA_CERTS = 16
#: Most candidate issuers the chain search tries for one WPK: a legitimate chain takes a
#: handful; a crafted web of cross-signed "CA" certificates would take exponential time.
MAX_CHAIN_STEPS = 200

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.S)
_MEMBER_HEADER = re.compile(rb"!([0-9]{1,19}) (.*)", re.S)
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_SIG = AgentCode.SIGNATURE
_GZ = AgentCode.UNCOMPRESS
_CLEAN = AgentCode.CLEAN_UPGRADE_DIR
_UNMERGE = AgentCode.UNMERGE


# --------------------------------------------------------------------------------------------
# data types


@dataclass(frozen=True)
class Member:
    """One file of the payload: its (normalized, ``/``-separated) name and size in bytes."""

    name: str
    size: int


@dataclass(frozen=True)
class UnpackLimits:
    """Bounds applied while unpacking an untrusted or trusted payload.

    ``max_ratio`` is checked as bytes flow: once more than ``ratio_grace`` bytes came out, the
    output may never exceed ``max_ratio`` times the compressed bytes consumed so far.
    """

    max_total_size: int = 2 << 30
    max_members: int = 10_000
    max_member_size: int = 2 << 30
    max_ratio: int = 200
    ratio_grace: int = 1 << 20


@dataclass(frozen=True)
class WpkHeader:
    """The parts of a WPK before its payload (read without reading the payload)."""

    cert_pem: bytes
    certificate: x509.Certificate
    extra_certificates: tuple[x509.Certificate, ...]
    signature: bytes
    payload_offset: int
    file_size: int

    @property
    def payload_size(self) -> int:
        return self.file_size - self.payload_offset


@dataclass(frozen=True)
class VerifiedWpk:
    """What ``verify`` established about a WPK. Digests are lowercase hex of the whole file."""

    path: Path
    signer_subject: str
    signer_issuer: str
    not_before: datetime
    not_after: datetime
    serial_number: int
    key_size: int
    sha1: str
    sha256: str
    payload_sha256: str
    payload_offset: int
    size: int
    ca_verified: bool
    trust_anchor: str | None = None
    chain: tuple[str, ...] = ()


@dataclass(frozen=True)
class UnpackedWpk:
    """Result of ``verify_and_unpack``: the jailed installer path and what was unpacked."""

    dest: Path
    installer: Path
    members: tuple[Member, ...]
    verified: VerifiedWpk

    @property
    def installer_path(self) -> Path:
        """Alias of ``installer``."""
        return self.installer


@dataclass(frozen=True)
class PackResult:
    """What ``pack`` wrote."""

    path: Path
    size: int
    sha1: str
    sha256: str
    members: tuple[Member, ...]
    installer: str | None = None


# --------------------------------------------------------------------------------------------
# digests


def file_digests(path: Path | str) -> tuple[str, str]:
    """(SHA1, SHA-256) of a file as lowercase hex, read in 1 MiB blocks."""
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            sha1.update(block)
            sha256.update(block)
    return sha1.hexdigest(), sha256.hexdigest()


# --------------------------------------------------------------------------------------------
# member names


def normalize_member_name(raw: str) -> str:
    """The safe relative ``/``-separated form of a member (or installer) name.

    Backslashes count as separators; empty and ``.`` parts are dropped. Raises ``ValueError``
    (with the reason) for an empty name, a NUL or other control character, an absolute or
    drive-letter path, or a ``..`` part.
    """
    if not raw:
        raise ValueError("empty name")
    if "\0" in raw:
        raise ValueError("NUL byte in name")
    if _CONTROL.search(raw):
        raise ValueError("control character in name")
    unified = raw.replace("\\", "/")
    if unified.startswith("/"):
        raise ValueError("absolute path")
    if _DRIVE.match(unified):
        raise ValueError("drive-letter path")
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if not parts:
        raise ValueError("empty name")
    if ".." in parts:
        raise ValueError("parent-directory ('..') component")
    return "/".join(parts)


# --------------------------------------------------------------------------------------------
# header


def _open_wpk(path: Path | str) -> IO[bytes]:
    """Open a WPK for reading; a missing or unreadable file is a code-13 refusal."""
    try:
        return open(path, "rb")  # the caller closes it
    except OSError as exc:
        raise WpkError(_SIG, f"cannot open WPK '{path}': {exc.strerror or exc}") from exc


def read_header(path: Path | str) -> WpkHeader:
    """Read magic, signer certificate and signature; never reads the payload."""
    with _open_wpk(path) as fh:
        return _read_header(fh)


def _read_header(fh: IO[bytes]) -> WpkHeader:
    file_size = os.fstat(fh.fileno()).st_size
    fh.seek(0)
    magic = fh.read(len(MAGIC))
    if magic != MAGIC:
        if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
            raise WpkError(_SIG, f"file truncated inside the magic ({len(magic)} bytes)")
        raise WpkError(_SIG, f"bad magic {magic[:16]!r} (expected {MAGIC!r})")
    pem = _read_until_nul(fh)
    certs = _parse_pem_certificates(pem)
    if not certs:
        raise WpkError(_SIG, "no parsable X.509 certificate in the WPK's PEM section")
    if len(certs) > 1 + MAX_EXTRA_CERTS:
        raise WpkError(
            _SIG,
            f"{len(certs) - 1} intermediate certificates in the PEM section "
            f"(at most {MAX_EXTRA_CERTS})",
        )
    signer = certs[0]
    key = signer.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise WpkError(
            _SIG, f"Public key is not RSA ({type(key).__name__.lstrip('_')} signer certificate)"
        )
    sig_len = (key.key_size + 7) // 8
    signature = fh.read(sig_len)
    if len(signature) != sig_len:
        raise WpkError(
            _SIG,
            f"file truncated inside the signature ({len(signature)} of {sig_len} bytes "
            f"for a {key.key_size}-bit key)",
        )
    return WpkHeader(
        cert_pem=pem,
        certificate=signer,
        extra_certificates=tuple(certs[1:]),
        signature=signature,
        payload_offset=len(MAGIC) + len(pem) + 1 + sig_len,
        file_size=file_size,
    )


def _read_until_nul(fh: IO[bytes]) -> bytes:
    """The bytes up to (not including) the next NUL, scanning in blocks; file left after it."""
    start = fh.tell()
    buf = bytearray()
    while True:
        block = fh.read(64 * 1024)
        if not block:
            raise WpkError(_SIG, "Couldn't get certificate from WPK file (no NUL after the PEM)")
        idx = block.find(b"\0")
        if idx >= 0:
            buf += block[:idx]
            fh.seek(start + len(buf) + 1)
            if len(buf) > MAX_CERT_PEM:
                break
            return bytes(buf)
        buf += block
        if len(buf) > MAX_CERT_PEM:
            break
    raise WpkError(_SIG, f"certificate section longer than {MAX_CERT_PEM} bytes")


def _parse_pem_certificates(data: bytes) -> list[x509.Certificate]:
    certs = []
    for match in _PEM_CERT.finditer(data):
        try:
            certs.append(x509.load_pem_x509_certificate(match.group(0)))
        except ValueError as exc:
            if not certs:
                raise WpkError(_SIG, f"cannot parse the signer certificate: {exc}") from exc
            log.warning("ignoring an unparsable extra certificate in a WPK: %s", exc)
    return certs


# --------------------------------------------------------------------------------------------
# verification


def verify(
    path: Path | str, ca_stores: Sequence[Path | str] | None, *, at: datetime | None = None
) -> VerifiedWpk:
    """Check a WPK's format, signature and (unless ``ca_stores`` is None) trust.

    ``ca_stores`` entries are PEM files (one or more certificates) or directories of
    certificate files (OpenSSL hashed directories work); unreadable entries are logged and
    skipped. ``ca_stores=None`` disables CA verification as the reference does: the signature is
    still checked against the embedded certificate and the result says ``ca_verified=False``.
    ``at`` is the time for the validity checks (default now; a naive datetime is taken as
    UTC). The signer's keyUsage extension is not checked (OpenSSL's default verification, which
    the reference uses, does not either).
    """
    with _open_wpk(path) as fh:
        verified, _header = _verify_open(fh, Path(path), ca_stores, at)
    return verified


def _verify_open(
    fh: IO[bytes], path: Path, ca_stores: Sequence[Path | str] | None, at: datetime | None
) -> tuple[VerifiedWpk, WpkHeader]:
    header = _read_header(fh)
    signer = header.certificate
    anchor: str | None = None
    chain: tuple[str, ...] = ()
    if ca_stores is None:
        log.info("No root CA defined to verify file '%s'.", path)
    else:
        when = _utc(at) if at is not None else datetime.now(UTC)
        anchor, chain_certs = _check_trust(signer, header.extra_certificates, ca_stores, when)
        chain = tuple(c.subject.rfc4514_string() for c in chain_certs)

    sha1, sha256, digest, size = _check_signature(fh, header)
    key = signer.public_key()
    assert isinstance(key, rsa.RSAPublicKey)  # checked by _read_header
    verified = VerifiedWpk(
        path=path,
        signer_subject=signer.subject.rfc4514_string(),
        signer_issuer=signer.issuer.rfc4514_string(),
        not_before=signer.not_valid_before_utc,
        not_after=signer.not_valid_after_utc,
        serial_number=signer.serial_number,
        key_size=key.key_size,
        sha1=sha1,
        sha256=sha256,
        payload_sha256=digest.hex(),
        payload_offset=header.payload_offset,
        size=size,
        ca_verified=ca_stores is not None,
        trust_anchor=anchor,
        chain=chain,
    )
    return verified, header


def _check_signature(fh: IO[bytes], header: WpkHeader) -> tuple[str, str, bytes, int]:
    """One pass over the file: whole-file SHA1/SHA-256 and the payload signature check."""
    sha1, sha256, payload_hash = hashlib.sha1(), hashlib.sha256(), hashlib.sha256()
    fh.seek(0)
    head = fh.read(header.payload_offset)
    sha1.update(head)
    sha256.update(head)
    size = len(head)
    while block := fh.read(BLOCK):
        sha1.update(block)
        sha256.update(block)
        payload_hash.update(block)
        size += len(block)
    if size != header.file_size:
        raise WpkError(_SIG, "the file changed size while it was being verified")
    digest = payload_hash.digest()
    key = header.certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey)  # checked by _read_header
    try:
        key.verify(header.signature, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    except InvalidSignature:
        raise WpkError(
            _SIG, "the signature does not match the payload and the signer's key"
        ) from None
    return sha1.hexdigest(), sha256.hexdigest(), digest, size


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _check_trust(
    signer: x509.Certificate,
    untrusted: Sequence[x509.Certificate],
    ca_stores: Sequence[Path | str],
    at: datetime,
) -> tuple[str, list[x509.Certificate]]:
    """Return (store entry, chain) or raise WpkError(13) with the reasons."""
    dates = _date_problem(signer, at)
    if dates:
        raise WpkError(_SIG, f"signer certificate {dates}")
    eku_problem = _eku_problem(signer)
    if eku_problem:
        raise WpkError(_SIG, eku_problem)
    reasons = []
    for entry in ca_stores:
        if str(entry) == "":
            continue
        anchors = _load_store(Path(entry))
        if not anchors:
            reasons.append(f"{entry}: no usable certificate")
            continue
        try:
            return str(entry), _build_chain(signer, anchors, untrusted, at)
        except _ChainError as exc:
            reasons.append(f"{entry}: {exc}")
    if not reasons:
        raise WpkError(_SIG, "no CA store entry to verify the signer against")
    raise WpkError(
        _SIG,
        f"signer '{signer.subject.rfc4514_string()}' does not chain to a trusted CA "
        f"({'; '.join(reasons)})",
    )


def _date_problem(cert: x509.Certificate, at: datetime) -> str | None:
    if at < cert.not_valid_before_utc:
        return f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"
    if at > cert.not_valid_after_utc:
        return f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC"
    return None


def _eku_problem(cert: x509.Certificate) -> str | None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return None
    allowed = {ExtendedKeyUsageOID.CODE_SIGNING, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}
    if allowed.intersection(eku):
        return None
    names = ", ".join(getattr(oid, "_name", oid.dotted_string) for oid in eku)
    return f"signer certificate's extended key usage ({names}) does not allow codeSigning"


def _load_store(entry: Path) -> list[x509.Certificate]:
    """Certificates of one CA store entry (file or directory); unreadable parts are skipped."""
    try:
        if entry.is_dir():
            certs: list[x509.Certificate] = []
            for child in sorted(entry.iterdir()):
                if child.is_file():
                    certs.extend(_load_cert_file(child, quiet=True))
            return certs
        return _load_cert_file(entry, quiet=False)
    except OSError as exc:
        log.warning("CA store entry '%s' cannot be read, skipped: %s", entry, exc)
        return []


def _load_cert_file(path: Path, *, quiet: bool) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.warning("CA store file '%s' cannot be read, skipped: %s", path, exc)
        return []
    certs = []
    blocks = _PEM_CERT.findall(data)
    for block in blocks:
        try:
            certs.append(x509.load_pem_x509_certificate(block))
        except ValueError as exc:
            log.warning("CA store file '%s': unparsable certificate skipped: %s", path, exc)
    if not blocks and data[:1] == b"\x30":
        try:
            certs.append(x509.load_der_x509_certificate(data))
        except ValueError:
            pass
    if not certs:
        (log.debug if quiet else log.warning)("CA store file '%s' holds no certificate", path)
    return certs


class _ChainError(Exception):
    """No acceptable chain in one store entry (message: the most useful reason)."""


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _build_chain(
    leaf: x509.Certificate,
    anchors: Sequence[x509.Certificate],
    untrusted: Sequence[x509.Certificate],
    at: datetime,
) -> list[x509.Certificate]:
    anchor_ders = {_der(a) for a in anchors}
    if _der(leaf) in anchor_ders:
        return [leaf]
    pool = [(a, True) for a in anchors] + [(c, False) for c in untrusted]
    reasons: dict[str, None] = {}  # an ordered set: each reason once
    signed: dict[tuple[bytes, bytes], bool] = {}  # (child, issuer) -> signature verified
    steps = 0

    def issued_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
        pair = (_der(child), _der(issuer))
        if pair not in signed:
            try:
                child.verify_directly_issued_by(issuer)
                signed[pair] = True
            except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
                signed[pair] = False
        return signed[pair]

    def search(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        nonlocal steps
        child = path[-1]
        seen = {_der(c) for c in path}
        candidates = [(c, t) for c, t in pool if c.subject == child.issuer]
        if not candidates:
            reasons[f"no issuer '{child.issuer.rfc4514_string()}' found"] = None
            return None
        for cand, trusted in candidates:
            if _der(cand) in seen:
                continue
            steps += 1
            if steps > MAX_CHAIN_STEPS:
                raise _ChainError(
                    f"no chain found within {MAX_CHAIN_STEPS} candidate issuers "
                    f"({len(untrusted)} certificates in the WPK)"
                )
            name = cand.subject.rfc4514_string()
            if not issued_by(child, cand):
                reasons[f"'{name}' did not sign '{child.subject.rfc4514_string()}'"] = None
                continue
            problem = _ca_problem(cand, len(path) - 1, at)
            if problem:
                reasons[f"issuer '{name}' {problem}"] = None
                continue
            if trusted:
                return [*path, cand]
            if len(path) + 1 < MAX_CHAIN:
                found = search([*path, cand])
                if found:
                    return found
            else:
                reasons[f"chain longer than {MAX_CHAIN} certificates"] = None
        return None

    chain = search([leaf])
    if chain is None:
        raise _ChainError("; ".join(list(reasons)[:5]))
    return chain


def _ca_problem(cert: x509.Certificate, intermediates_below: int, at: datetime) -> str | None:
    dates = _date_problem(cert, at)
    if dates:
        return dates
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        if cert.version != x509.Version.v1:
            return "is not a CA (no basicConstraints)"
    else:
        if not bc.ca:
            return "is not a CA (basicConstraints CA:FALSE)"
        if bc.path_length is not None and intermediates_below > bc.path_length:
            return f"path length constraint {bc.path_length} exceeded"
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if not ku.key_cert_sign:
        return "may not sign certificates (keyUsage without keyCertSign)"
    return None


# --------------------------------------------------------------------------------------------
# payload streaming: gzip layer


class _Inflater:
    """Decompresses a (possibly multi-member) gzip stream block by block, with bomb limits."""

    OUT_CHUNK = BLOCK
    IN_SLICE = 256 * 1024

    def __init__(self, limits: UnpackLimits) -> None:
        self._limits = limits
        self._d: Any = None
        self.gzip_members = 0
        self.consumed = 0
        self.produced = 0

    def feed(self, block: bytes) -> Iterator[bytes]:
        """Yield decompressed chunks of ``block``; raise WpkError(14) on any gzip fault."""
        view = memoryview(block)
        for start in range(0, len(block), self.IN_SLICE):
            yield from self._feed(view[start : start + self.IN_SLICE])

    def _feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        try:
            while data:
                if self._d is None:
                    self._d = zlib.decompressobj(31)
                    self.gzip_members += 1
                d = self._d
                while True:
                    before = len(data)
                    out = d.decompress(data, self.OUT_CHUNK)
                    if d.eof:
                        data = d.unused_data
                        self.consumed += before - len(data)
                        self._d = None
                        if out:
                            self._account(len(out))
                            yield out
                        break
                    data = d.unconsumed_tail
                    self.consumed += before - len(data)
                    if out:
                        self._account(len(out))
                        yield out
                    if not data and len(out) < self.OUT_CHUNK:
                        break
        except zlib.error as exc:
            where = f" (gzip member {self.gzip_members})" if self.gzip_members > 1 else ""
            extra = " - trailing data after the gzip stream?" if self.gzip_members > 1 else ""
            raise WpkError(
                _GZ, f"corrupt gzip stream at compressed byte {self.consumed}{where}: {exc}{extra}"
            ) from None

    def finish(self) -> None:
        if self.gzip_members == 0:
            raise WpkError(_GZ, "empty payload (no gzip stream after the signature)")
        if self._d is not None:
            raise WpkError(_GZ, "gzip stream truncated (no end-of-stream marker)")

    def _account(self, n: int) -> None:
        self.produced += n
        lim = self._limits
        if self.produced > lim.max_total_size:
            raise WpkError(
                _GZ, f"decompressed payload exceeds the {lim.max_total_size}-byte size limit"
            )
        if self.produced > lim.max_ratio * self.consumed + lim.ratio_grace:
            raise WpkError(
                _GZ,
                f"compression ratio above {lim.max_ratio}:1 ({self.produced} bytes out of "
                f"{self.consumed}): refusing a likely gzip bomb",
            )


# --------------------------------------------------------------------------------------------
# payload streaming: merged-file layer


class _Sink(Protocol):
    def start(self, name: str, size: int) -> None: ...
    def write(self, data: memoryview) -> None: ...
    def end(self) -> None: ...
    def close(self) -> None: ...


class _NullSink:
    """Counts members without storing them (inspect, structure checks)."""

    def start(self, name: str, size: int) -> None:
        pass

    def write(self, data: memoryview) -> None:
        pass

    def end(self) -> None:
        pass

    def close(self) -> None:
        pass


class _DirSink:
    """Writes members under ``root`` (a private directory we created), never outside it."""

    FILE_MODE = 0o640
    DIR_MODE = 0o750

    def __init__(self, root: Path) -> None:
        self._root = root
        self._dirs: set[str] = set()
        self._fh: IO[bytes] | None = None
        self._name = ""

    def start(self, name: str, size: int) -> None:
        self._name = name
        parts = name.split("/")
        for i in range(1, len(parts)):
            rel = "/".join(parts[:i])
            if rel not in self._dirs:
                self._wrap(os.mkdir, self._root / rel, self.DIR_MODE)
                self._dirs.add(rel)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        fd = self._wrap(os.open, self._root / name, flags, self.FILE_MODE)
        self._fh = open(fd, "wb", buffering=0)  # closed in end()/close()

    def write(self, data: memoryview) -> None:
        assert self._fh is not None
        while data:
            written = self._wrap(self._fh.write, data)
            data = data[written:]

    def end(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            self._wrap(fh.close)

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError:
                pass

    def _wrap(self, func: Any, *args: Any) -> Any:
        try:
            return func(*args)
        except OSError as exc:
            detail = f"cannot write member '{_clip(self._name)}': {exc.strerror or exc}"
            raise WpkError(_UNMERGE, detail) from None


class _MergedParser:
    """Incremental reader of the merged-file format; validates names and structure."""

    def __init__(self, sink: _Sink, limits: UnpackLimits) -> None:
        self._sink = sink
        self._limits = limits
        self._line = bytearray()
        self._remaining = 0
        self._current: str | None = None
        self._line_no = 0
        self._files: set[str] = set()
        self._dirs: set[str] = set()
        self.members: list[Member] = []
        self.tag: str | None = None

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        pos, end = 0, len(chunk)
        while pos < end:
            if self._current is not None:
                take = min(self._remaining, end - pos)
                self._sink.write(view[pos : pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._end_member()
                continue
            room = MAX_HEADER_LINE - len(self._line)
            nl = chunk.find(b"\n", pos, min(end, pos + room))
            if nl < 0:
                if end - pos >= room:
                    self._fail(
                        f"merged-file line {self._line_no + 1} (member data not counted) is "
                        f"longer than {MAX_HEADER_LINE} bytes"
                    )
                self._line += view[pos:]
                pos = end
                continue
            self._line += view[pos:nl]
            pos = nl + 1
            line, self._line = bytes(self._line), bytearray()
            self._handle_line(line)

    def finish(self) -> None:
        if self._current is not None:
            self._fail(
                f"member '{_clip(self._current)}' truncated: {self._remaining} announced "
                "bytes missing at the end of the payload"
            )
        if self._line.startswith(b"!"):
            self._fail("member header truncated at the end of the payload")
        if not self.members:
            self._fail("the payload holds no file")

    def close(self) -> None:
        self._sink.close()

    def _handle_line(self, line: bytes) -> None:
        self._line_no += 1
        if not line.startswith(b"!"):
            if self._line_no == 1 and line.startswith(b"#"):
                self.tag = line[1:].decode("utf-8", "replace")
            return
        match = _MEMBER_HEADER.fullmatch(line)
        if not match:
            self._fail(f"malformed member header on line {self._line_no}: {line[:80]!r}")
        size = int(match.group(1))
        try:
            raw = match.group(2).decode("utf-8")
        except UnicodeDecodeError:
            self._fail(f"member name on line {self._line_no} is not UTF-8: {match.group(2)!r}")
        try:
            name = normalize_member_name(raw)
        except ValueError as exc:
            self._fail(f"unsafe member name {_clip(repr(raw))}: {exc}")
        if name in self._files:
            self._fail(f"duplicate member '{_clip(name)}'")
        if name in self._dirs:
            self._fail(f"member '{_clip(name)}' clashes with a directory of the same name")
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in self._files:
                self._fail(f"member '{_clip(name)}' is below member '{_clip(prefix)}', a file")
            self._dirs.add(prefix)
        lim = self._limits
        if len(self.members) >= lim.max_members:
            self._fail(f"more than {lim.max_members} members (limit)")
        if size > lim.max_member_size:
            self._fail(
                f"member '{_clip(name)}' announces {size} bytes, "
                f"over the {lim.max_member_size} limit"
            )
        self._files.add(name)
        self.members.append(Member(name, size))
        self._sink.start(name, size)
        self._current, self._remaining = name, size
        if size == 0:
            self._end_member()

    def _end_member(self) -> None:
        self._sink.end()
        self._current = None

    def _fail(self, detail: str) -> Any:
        raise WpkError(_UNMERGE, detail)


def _process_payload(
    fh: IO[bytes],
    header: WpkHeader,
    parser: _MergedParser | None,
    limits: UnpackLimits,
    expected_sha256: str | None,
) -> _Inflater:
    """Stream the payload through gunzip and the merged-file parser.

    Errors are ranked as the reference would report them: payload changed since verification
    (13) before gzip faults (14) before structure faults (16). After a fault the rest of the file
    is still read so that the ranking holds (and hashed when ``expected_sha256`` is given).
    """
    inflater = _Inflater(limits)
    hasher = hashlib.sha256() if expected_sha256 is not None else None
    gz_error: WpkError | None = None
    st_error: WpkError | None = None
    fh.seek(header.payload_offset)
    remaining = header.payload_size
    while remaining > 0:
        block = fh.read(min(BLOCK, remaining))
        if not block:
            break
        remaining -= len(block)
        if hasher is not None:
            hasher.update(block)
        if gz_error is not None:
            if hasher is None:
                break
            continue
        try:
            for out in inflater.feed(block):
                if parser is not None and st_error is None:
                    try:
                        parser.feed(out)
                    except WpkError as exc:
                        st_error = exc
                        parser.close()
        except WpkError as exc:
            gz_error = exc
    if gz_error is None:
        try:
            inflater.finish()
        except WpkError as exc:
            gz_error = exc
    if parser is not None and gz_error is None and st_error is None:
        try:
            parser.finish()
        except WpkError as exc:
            st_error = exc
    if hasher is not None and (remaining or hasher.hexdigest() != expected_sha256):
        raise WpkError(_SIG, "the payload changed after its signature was verified")
    if gz_error is not None:
        raise gz_error
    if st_error is not None:
        raise st_error
    return inflater


# --------------------------------------------------------------------------------------------
# unpacking


def unpack(
    path: Path | str, dest: Path | str, limits: UnpackLimits = UnpackLimits()
) -> list[Member]:
    """Unpack a WPK's payload into ``dest`` WITHOUT checking its signature.

    The payload goes into a fresh private directory beside ``dest``; only when all of it is
    valid is ``dest`` emptied and the unpacked entries renamed into it. On failure nothing
    outside the temporary directory is written and that directory is removed.
    """
    with _open_wpk(path) as fh:
        header = _read_header(fh)
        return list(_unpack_open(fh, header, Path(dest), limits, None, None))


def _unpack_open(
    fh: IO[bytes],
    header: WpkHeader,
    dest: Path,
    limits: UnpackLimits,
    expected_sha256: str | None,
    installer: str | None,
) -> tuple[Member, ...]:
    dest = Path(os.path.abspath(dest))
    if dest.is_symlink() or dest.exists():
        dest = dest.resolve()
    if dest.exists() and not dest.is_dir():
        raise WpkError(_CLEAN, f"destination '{dest}' is not a directory")
    installer_problem: str | None = None
    installer_name: str | None = None
    if installer is not None:
        try:
            installer_name = normalize_member_name(installer)
        except ValueError as exc:
            installer_problem = f"installer {installer!r} refused: {exc}"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.unpack-", dir=dest.parent))
    except OSError as exc:
        raise WpkError(
            _CLEAN, f"cannot create a temporary directory beside '{dest}': {exc}"
        ) from exc
    try:
        parser = _MergedParser(_DirSink(tmp), limits)
        try:
            _process_payload(fh, header, parser, limits, expected_sha256)
        finally:
            parser.close()
        members = tuple(parser.members)
        if installer_problem is not None:
            raise WpkError(AgentCode.INVALID_FILE_NAME, installer_problem)
        if installer_name is not None and installer_name not in {m.name for m in members}:
            raise WpkError(
                AgentCode.CHMOD, f"installer '{installer_name}' is not a file of the package"
            )
        _switch_into(tmp, dest)
        return members
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _switch_into(tmp: Path, dest: Path) -> None:
    """Make the unpacked ``tmp`` the new ``dest``, never showing a partial package.

    The old ``dest`` is renamed aside, ``tmp`` renamed into its place, then the old one is
    removed: a process killed at any point leaves the old package, no ``dest`` at all (the
    agent recreates it empty), or the whole new one; never a mix (hardening R3 found one:
    killed while ``dest`` was being emptied, the agent kept part of the old package). Where
    ``dest`` cannot be renamed (a mount point, say), it is emptied and the entries moved in.
    Leftovers of a killed switch are removed by ``remove_stale``.
    """
    mode, owner = 0o750, None
    if dest.exists():
        st = dest.stat()
        mode, owner = st.st_mode & 0o7777, (st.st_uid, st.st_gid)
    try:
        os.chmod(tmp, mode)
        if owner is not None and hasattr(os, "chown"):
            try:
                os.chown(tmp, *owner)
            except PermissionError:
                pass  # not ours to give away: the new directory stays the agent's
    except OSError as exc:
        raise WpkError(_CLEAN, f"cannot prepare the new '{dest}': {exc}") from exc
    old: Path | None = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        try:
            os.replace(dest, old)  # old is an empty directory: replaced atomically
        except OSError:
            os.rmdir(old)
            _clean_dir(dest)
            _move_into(tmp, dest)
            return
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        if old is not None:
            try:
                os.rename(old, dest)
            except OSError:
                pass
        raise WpkError(_UNMERGE, f"cannot move the unpacked package to '{dest}': {exc}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale(dest: Path | str) -> list[str]:
    """Remove what a killed unpack left beside ``dest`` (``.<name>.unpack-*`` and
    ``.<name>.old-*`` directories); returns their names. Call it when no unpack runs."""
    dest = Path(os.path.abspath(dest))
    removed = []
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if name.startswith((f".{dest.name}.unpack-", f".{dest.name}.old-")) and entry.is_dir(
            follow_symlinks=False
        ):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(name)
    return removed


def _clean_dir(dest: Path) -> None:
    """Empty ``dest`` (creating it when missing); symlinks are removed, never followed."""
    try:
        dest.mkdir(mode=0o750, exist_ok=True)
        with os.scandir(dest) as entries:
            for entry in list(entries):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
    except OSError as exc:
        raise WpkError(_CLEAN, f"cannot empty '{dest}': {exc}") from exc


def _move_into(tmp: Path, dest: Path) -> None:
    try:
        for name in sorted(os.listdir(tmp)):
            os.rename(tmp / name, dest / name)
    except OSError as exc:
        raise WpkError(_UNMERGE, f"cannot move unpacked files into '{dest}': {exc}") from exc


def verify_and_unpack(
    path: Path | str,
    ca_stores: Sequence[Path | str] | None,
    dest: Path | str,
    installer: str,
    limits: UnpackLimits = UnpackLimits(),
    *,
    at: datetime | None = None,
) -> UnpackedWpk:
    """The agent's ``upgrade`` pipeline up to (not including) chmod/exec of the installer.

    Verify (13) -> gunzip (14) -> unmerge into a private temporary directory (16) -> installer
    name jail (5) and presence (17) -> empty ``dest`` (15, removes an old ``upgrade_result`` as
    the reference does) -> move the unpacked files into ``dest``. The file is read twice (verify,
    then unpack) through one open descriptor, and the payload is hashed again while unpacking:
    a WPK changed between the two passes is refused (13).
    """
    with _open_wpk(path) as fh:
        verified, header = _verify_open(fh, Path(path), ca_stores, at)
        members = _unpack_open(fh, header, Path(dest), limits, verified.payload_sha256, installer)
    dest_path = Path(os.path.abspath(dest)).resolve()
    installer_path = dest_path.joinpath(*normalize_member_name(installer).split("/"))
    return UnpackedWpk(dest=dest_path, installer=installer_path, members=members, verified=verified)


# --------------------------------------------------------------------------------------------
# inspection


def inspect(path: Path | str, limits: UnpackLimits = UnpackLimits()) -> dict[str, Any]:
    """Describe a WPK without trusting it (no CA check) and without writing anything.

    Never raises for a malformed file: problems are listed under ``errors`` as
    ``"<code> <text>: <detail>"`` strings, and whatever could be read is reported.
    """
    path = Path(path)
    info: dict[str, Any] = {"path": str(path), "errors": []}
    errors: list[str] = info["errors"]
    try:
        info["size"] = path.stat().st_size
        info["sha1"], info["sha256"] = file_digests(path)
    except OSError as exc:
        errors.append(f"cannot read file: {exc}")
        return info
    with _open_wpk(path) as fh:
        try:
            header = _read_header(fh)
        except WpkError as exc:
            errors.append(_error_line(exc))
            return info
        info["signer"] = describe_certificate(header.certificate)
        info["extra_certificates"] = [describe_certificate(c) for c in header.extra_certificates]
        info["signature_length"] = len(header.signature)
        info["payload_offset"] = header.payload_offset
        info["payload_size"] = header.payload_size
        try:
            _sha1, _sha256, digest, _size = _check_signature(fh, header)
            info["signature_valid"] = True
            info["payload_sha256"] = digest.hex()
        except WpkError as exc:
            info["signature_valid"] = False
            errors.append(_error_line(exc))
        parser = _MergedParser(_NullSink(), limits)
        try:
            inflater = _process_payload(fh, header, parser, limits, None)
            info["unpacked_size"] = inflater.produced
        except WpkError as exc:
            errors.append(_error_line(exc))
        info["tag"] = parser.tag
        info["members"] = [{"name": m.name, "size": m.size} for m in parser.members]
        info["member_count"] = len(parser.members)
    return info


def describe_certificate(cert: x509.Certificate) -> dict[str, Any]:
    """A JSON-friendly summary of a certificate."""
    key = cert.public_key()
    try:
        eku: list[str] | None = [
            getattr(oid, "_name", oid.dotted_string)
            for oid in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        ]
    except (x509.ExtensionNotFound, ValueError):
        eku = None
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial_number": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key_type": type(key).__name__.lstrip("_").replace("PublicKey", ""),
        "key_size": getattr(key, "key_size", None),
        "extended_key_usage": eku,
        "self_signed": cert.subject == cert.issuer,
        "sha256_fingerprint": cert.fingerprint(hashes.SHA256()).hex(),
    }


def _clip(text: str, limit: int = 120) -> str:
    """``text`` shortened for an error message (member names can be 2 KiB long)."""
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _error_line(exc: WpkError) -> str:
    return f"{int(exc.code)} {exc.text}: {exc.detail}"


# --------------------------------------------------------------------------------------------
# packing


def pack(
    out: Path | str,
    cert: Path | str,
    key: Path | str,
    files: Sequence[Path | str],
    *,
    installer: str | None = None,
    tag: str | None = None,
    key_password: bytes | None = None,
    compresslevel: int = 6,
) -> PackResult:
    """Build a signed WPK at ``out`` from ``files`` (files and directories).

    Member names: a file given directly is stored under its base name; a directory ``d`` is
    walked recursively (sorted, so the output is reproducible) and its files are stored as
    ``<basename of d>/<relative path>`` - the names ``wpkpack`` gives when run from the
    directory's parent. Given paths keep their command-line order. ``installer``, when given,
    must name a member. ``tag`` is the optional first line ``#<tag>`` (default: the output's
    base name; ``""`` writes no tag line). The cert file is copied verbatim (it may carry
    intermediates after the signer certificate). The result is written to a temporary file
    beside ``out`` and renamed. Raises ``WpkUpgradeError`` for unusable input.
    """
    out = Path(out)
    cert_pem = _read_input(Path(cert), "certificate")
    if b"\0" in cert_pem:
        raise WpkUpgradeError(f"certificate file {cert} contains a NUL byte")
    certs = _PEM_CERT.findall(cert_pem)
    if not certs:
        raise WpkUpgradeError(f"no PEM certificate in {cert}")
    try:
        signer = x509.load_pem_x509_certificate(certs[0])
        private = serialization.load_pem_private_key(
            _read_input(Path(key), "private key"), password=key_password
        )
    except (ValueError, TypeError) as exc:
        raise WpkUpgradeError(f"cannot load signer certificate or key: {exc}") from exc
    if not isinstance(private, rsa.RSAPrivateKey):
        raise WpkUpgradeError("the WPK format needs an RSA signing key")
    if private.public_key().public_numbers() != signer.public_key().public_numbers():  # type: ignore[union-attr]
        raise WpkUpgradeError(f"private key {key} does not match certificate {cert}")

    entries = _collect_members(files)
    names = [name for name, _ in entries]
    if installer is not None:
        try:
            inst = normalize_member_name(installer)
        except ValueError as exc:
            raise WpkUpgradeError(f"installer {installer!r} refused: {exc}") from exc
        if inst not in names:
            raise WpkUpgradeError(f"installer '{installer}' is not among the members {names}")
    tag_line = b""
    tag_text = out.name if tag is None else tag
    if tag_text:
        tag_line = b"#" + tag_text.encode("utf-8") + b"\n"
        if b"\n" in tag_line[:-1] or len(tag_line) > MAX_HEADER_LINE:
            raise WpkUpgradeError("tag must be one line shorter than 2048 bytes")

    sig_len = (private.key_size + 7) // 8
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    tmp = Path(tmp_name)
    members: list[Member] = []
    try:
        with open(fd, "w+b") as fw:
            fw.write(MAGIC + cert_pem + b"\0")
            sig_offset = fw.tell()
            fw.write(b"\0" * sig_len)
            comp = zlib.compressobj(compresslevel, zlib.DEFLATED, 31)
            digest = hashlib.sha256()

            def emit(data: bytes | memoryview) -> None:
                compressed = comp.compress(data)
                if compressed:
                    digest.update(compressed)
                    fw.write(compressed)

            if tag_line:
                emit(tag_line)
            for name, source in entries:
                members.append(Member(name, _append_member(emit, name, source)))
            tail = comp.flush()
            digest.update(tail)
            fw.write(tail)
            signature = private.sign(
                digest.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256())
            )
            fw.seek(sig_offset)
            fw.write(signature)
            fw.flush()
            os.fsync(fw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    sha1, sha256 = file_digests(out)
    return PackResult(
        path=out,
        size=out.stat().st_size,
        sha1=sha1,
        sha256=sha256,
        members=tuple(members),
        installer=installer,
    )


def _read_input(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise WpkUpgradeError(f"cannot read {what} {path}: {exc}") from exc


def _collect_members(files: Sequence[Path | str]) -> list[tuple[str, Path]]:
    """(member name, source file) pairs, validated and free of duplicates."""
    entries: list[tuple[str, Path]] = []
    for given in files:
        source = Path(given)
        if source.is_dir():
            root = Path(os.path.normpath(source.absolute()))
            prefix = root.name
            for rel in _walk_sorted(root):
                entries.append((f"{prefix}/{rel}" if prefix else rel, root / rel))
        elif source.is_file():
            entries.append((source.name, source))
        else:
            raise WpkUpgradeError(f"cannot pack {given}: not a regular file or directory")
    if not entries:
        raise WpkUpgradeError("nothing to pack (no file found)")
    seen: dict[str, Path] = {}
    result = []
    for raw, source in entries:
        try:
            name = normalize_member_name(raw)
        except ValueError as exc:
            raise WpkUpgradeError(f"cannot pack {source} as {raw!r}: {exc}") from exc
        if name in seen:
            raise WpkUpgradeError(f"two inputs map to member '{name}': {seen[name]} and {source}")
        seen[name] = source
        result.append((name, source))
    files_set = set(seen)
    for name in seen:
        parts = name.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in files_set:
                prefix = "/".join(parts[:i])
                raise WpkUpgradeError(f"member '{name}' would sit below the file member '{prefix}'")
    return result


def _walk_sorted(root: Path, rel: str = "") -> Iterator[str]:
    with os.scandir(root / rel if rel else root) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        child = f"{rel}/{entry.name}" if rel else entry.name
        if entry.is_dir(follow_symlinks=False):
            yield from _walk_sorted(root, child)
        elif entry.is_symlink() and entry.is_dir():
            raise WpkUpgradeError(f"refusing to follow the directory symlink {entry.path}")
        elif entry.is_file():
            yield child
        else:
            raise WpkUpgradeError(f"cannot pack {entry.path}: not a regular file")


def _append_member(emit: Any, name: str, source: Path) -> int:
    try:
        with open(source, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            header = f"!{size} {name}\n".encode()
            if len(header) > MAX_HEADER_LINE:
                raise WpkUpgradeError(f"member name too long for the format: {name[:60]}...")
            emit(header)
            left = size
            while left:
                block = src.read(min(BLOCK, left))
                if not block:
                    raise WpkUpgradeError(f"{source} shrank while it was being packed")
                emit(block)
                left -= len(block)
            if src.read(1):
                raise WpkUpgradeError(f"{source} grew while it was being packed")
    except OSError as exc:
        raise WpkUpgradeError(f"cannot read {source}: {exc}") from exc
    return size
