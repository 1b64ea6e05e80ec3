"""Tamper matrix: every damaged, untrusted or hostile WPK is refused by verify_and_unpack with
the agent code of the failing step (13 signature, 14 uncompress, 15 clean, 16 unmerge,
5 installer name, 17 missing installer), and nothing at all changes on disk: the whole test
directory (WPK, destination with its old files, its parent) is compared before and after."""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from wpk_upgrade import pki, wpk
from wpk_upgrade.errors import AgentCode, WpkError

SIG, GZ, CLEAN, UNMERGE = 13, 14, 15, 16
NAME, CHMOD = 5, 17
MAGIC = b"WPK256\x00"


# ---------------------------------------------------------------------------------------------
# fixtures and helpers


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    base = tmp_path_factory.mktemp("tamper-lab")
    now = datetime.now(UTC)
    ca = pki.create_ca(base / "ca")
    other = pki.create_ca(base / "other", common_name="attacker CA")
    old_ca = pki.create_ca(
        base / "old_ca",
        common_name="expired CA",
        not_before=now - timedelta(days=400),
        not_after=now - timedelta(days=1),
    )

    def issue(name: str, usage: str = "code", *, issuer: pki.CaFiles = ca, **kw: object):
        return pki.issue_certificate(issuer.cert, issuer.key, base / "certs", name, usage, **kw)  # type: ignore[arg-type]

    files = {
        "ca": ca,
        "other": other,
        "old_ca": old_ca,
        "signer": issue("signer"),
        "expired": issue(
            "expired", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        ),
        "future": issue("future", not_before=now + timedelta(days=1), days=30),
        "server": issue("server only", "server"),
        "ec": issue("ec signer", key_type="ec"),
        "under_old_ca": issue("under old", issuer=old_ca, not_before=now - timedelta(days=10)),
        "foreign": issue("foreign", issuer=other),
    }
    src = base / "src"
    src.mkdir()
    (src / "upgrade.sh").write_text("#!/bin/sh\necho upgraded\n")
    (src / "pkg.bin").write_bytes(os.urandom(20000) + b"A" * 20000)
    good = base / "good.wpk"
    signer = files["signer"]
    wpk.pack(good, signer.cert, signer.key, [src / "upgrade.sh", src / "pkg.bin"])  # type: ignore[attr-defined]
    files["good"] = good
    files["base"] = base
    return files


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its content (or its link target)."""
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            else:
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return state


def refused(
    tmp_path: Path,
    package: Path,
    code: int,
    *,
    ca: list[Path] | None,
    installer: str = "upgrade.sh",
    limits: wpk.UnpackLimits | None = None,
    at: datetime | None = None,
) -> WpkError:
    """Run the agent pipeline on ``package`` and check the refusal leaves no trace."""
    dest = tmp_path / "agent" / "var" / "upgrade"
    if not dest.exists():
        dest.mkdir(parents=True)
        (dest / "upgrade_result").write_text("0")
        (dest / "previous.bin").write_bytes(b"previous upgrade")
        (tmp_path / "agent" / "var" / "incoming").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(WpkError) as err:
        wpk.verify_and_unpack(package, ca, dest, installer, limits or wpk.UnpackLimits(), at=at)
    assert snapshot(tmp_path) == before, "a refused WPK changed something on disk"
    assert int(err.value.code) == code, f"{err.value.code}: {err.value.detail}"
    assert err.value.detail
    return err.value


def ca_of(lab: dict[str, object]) -> list[Path]:
    return [lab["ca"].cert]  # type: ignore[attr-defined]


def mg(*members: tuple[bytes, bytes], raw: bytes = b"") -> bytes:
    """A merged-file body with arbitrary (possibly hostile) names."""
    body = b"#tamper\n"
    for name, content in members:
        body += b"!%d " % len(content) + name + b"\n" + content
    return body + raw


def build(
    path: Path, payload: bytes, cert: Path, key: Path | None, *, sig: bytes | None = None
) -> Path:
    """Hand-build a WPK whose signature is valid for ``payload`` (unless ``sig`` is given)."""
    if sig is None:
        assert key is not None
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        assert isinstance(private, rsa.RSAPrivateKey)
        sig = private.sign(payload, padding.PKCS1v15(), hashes.SHA256())
    path.write_bytes(MAGIC + cert.read_bytes() + b"\x00" + sig + payload)
    return path


def signed(lab: dict[str, object], tmp_path: Path, payload: bytes, name: str = "t.wpk") -> Path:
    signer = lab["signer"]
    return build(tmp_path / name, payload, signer.cert, signer.key)  # type: ignore[attr-defined]


INSTALLER = (b"upgrade.sh", b"#!/bin/sh\n")


def good_copy(lab: dict[str, object], tmp_path: Path) -> tuple[Path, bytearray, wpk.WpkHeader]:
    data = bytearray(lab["good"].read_bytes())  # type: ignore[attr-defined]
    header = wpk.read_header(lab["good"])  # type: ignore[arg-type]
    return tmp_path / "bad.wpk", data, header


# ---------------------------------------------------------------------------------------------
# bit flips and truncations of a good package: 13 before anything else


def test_good_package_is_accepted(lab: dict[str, object], tmp_path: Path) -> None:
    result = wpk.verify_and_unpack(lab["good"], ca_of(lab), tmp_path / "up", "upgrade.sh")  # type: ignore[arg-type]
    assert sorted(m.name for m in result.members) == ["pkg.bin", "upgrade.sh"]


@pytest.mark.parametrize(
    "where",
    [
        "magic:0",
        "magic:3",
        "magic:6",
        "cert:2",
        "cert:40",
        "cert:mid",
        "cert:end-100",
        "nul:0",
        "sig:0",
        "sig:mid",
        "sig:last",
        "payload:0",
        "payload:9",
        "payload:mid",
        "payload:last",
    ],
)
def test_bit_flip(lab: dict[str, object], tmp_path: Path, where: str) -> None:
    path, data, header = good_copy(lab, tmp_path)
    pem_start, pem_end = 7, 7 + len(header.cert_pem)
    sig_start = pem_end + 1
    section, pos = where.split(":")
    offsets = {
        "magic": {"0": 0, "3": 3, "6": 6},
        "cert": {
            "2": pem_start + 2,
            "40": pem_start + 40,
            "mid": (pem_start + pem_end) // 2,
            "end-100": pem_end - 100,
        },
        "nul": {"0": pem_end},
        "sig": {"0": sig_start, "mid": sig_start + 128, "last": sig_start + 255},
        "payload": {
            "0": header.payload_offset,
            "9": header.payload_offset + 9,
            "mid": (header.payload_offset + len(data)) // 2,
            "last": len(data) - 1,
        },
    }
    offset = offsets[section][pos]
    data[offset] ^= 0x01 if section != "nul" else 0x41
    path.write_bytes(bytes(data))
    refused(tmp_path, path, SIG, ca=ca_of(lab))
    if section != "cert":
        # The embedded signature is checked even without CA verification. (A flip inside the
        # certificate that leaves its public key intact is only caught by the CA check.)
        refused(tmp_path, path, SIG, ca=None)


@pytest.mark.parametrize(
    "where",
    [
        "in magic",
        "after magic",
        "in cert",
        "before nul",
        "after nul",
        "in signature",
        "after signature",
        "in gzip header",
        "in gzip body",
        "in gzip trailer",
    ],
)
def test_truncation(lab: dict[str, object], tmp_path: Path, where: str) -> None:
    path, data, header = good_copy(lab, tmp_path)
    pem_end = 7 + len(header.cert_pem)
    cut = {
        "in magic": 3,
        "after magic": 7,
        "in cert": 7 + 100,
        "before nul": pem_end,
        "after nul": pem_end + 1,
        "in signature": pem_end + 1 + 100,
        "after signature": header.payload_offset,
        "in gzip header": header.payload_offset + 5,
        "in gzip body": (header.payload_offset + len(data)) // 2,
        "in gzip trailer": len(data) - 3,
    }[where]
    path.write_bytes(bytes(data[:cut]))
    err = refused(tmp_path, path, SIG, ca=ca_of(lab))
    if where in ("in magic", "after magic", "in cert", "before nul"):
        assert "truncated" in err.detail or "Couldn't get certificate" in err.detail


def test_signed_truncations_reach_later_steps(lab: dict[str, object], tmp_path: Path) -> None:
    """Truncated but correctly signed (a broken packer): gzip -> 14, member -> 16."""
    full = gzip.compress(mg(INSTALLER, (b"pkg.bin", os.urandom(5000))))
    refused(tmp_path, signed(lab, tmp_path, full[:-4], "a.wpk"), GZ, ca=ca_of(lab))
    refused(tmp_path, signed(lab, tmp_path, full[: len(full) // 2], "b.wpk"), GZ, ca=ca_of(lab))
    short_member = mg(INSTALLER, raw=b"!100 pkg.bin\n" + b"x" * 10)
    err = refused(
        tmp_path,
        signed(lab, tmp_path, gzip.compress(short_member), "c.wpk"),
        UNMERGE,
        ca=ca_of(lab),
    )
    assert "pkg.bin" in err.detail and "truncated" in err.detail
    half_header = mg(INSTALLER, raw=b"!5 pkg")
    err = refused(
        tmp_path, signed(lab, tmp_path, gzip.compress(half_header), "d.wpk"), UNMERGE, ca=ca_of(lab)
    )
    assert "header truncated" in err.detail


# ---------------------------------------------------------------------------------------------
# trust


def _pack_with(lab: dict[str, object], tmp_path: Path, who: str) -> Path:
    files = lab[who]
    out = tmp_path / f"{who}.wpk"
    src = lab["base"] / "src" / "upgrade.sh"  # type: ignore[operator]
    wpk.pack(out, files.cert, files.key, [src])  # type: ignore[attr-defined]
    return out


def test_unknown_ca(lab: dict[str, object], tmp_path: Path) -> None:
    err = refused(tmp_path, _pack_with(lab, tmp_path, "foreign"), SIG, ca=ca_of(lab))
    assert "does not chain" in err.detail and "no issuer 'CN=attacker CA'" in err.detail


def test_expired_signer(lab: dict[str, object], tmp_path: Path) -> None:
    err = refused(tmp_path, _pack_with(lab, tmp_path, "expired"), SIG, ca=ca_of(lab))
    assert "expired on" in err.detail


def test_not_yet_valid_signer(lab: dict[str, object], tmp_path: Path) -> None:
    err = refused(tmp_path, _pack_with(lab, tmp_path, "future"), SIG, ca=ca_of(lab))
    assert "not valid before" in err.detail


def test_signer_valid_now_but_not_at_given_time(lab: dict[str, object], tmp_path: Path) -> None:
    at = datetime.now(UTC) + timedelta(days=5000)
    err = refused(tmp_path, lab["good"], SIG, ca=ca_of(lab), at=at)  # type: ignore[arg-type]
    assert "expired on" in err.detail


def test_expired_ca_in_chain(lab: dict[str, object], tmp_path: Path) -> None:
    package = _pack_with(lab, tmp_path, "under_old_ca")
    err = refused(tmp_path, package, SIG, ca=[lab["old_ca"].cert])  # type: ignore[attr-defined]
    assert "issuer 'CN=expired CA' expired on" in err.detail


def test_signer_without_code_signing(lab: dict[str, object], tmp_path: Path) -> None:
    err = refused(tmp_path, _pack_with(lab, tmp_path, "server"), SIG, ca=ca_of(lab))
    assert "serverAuth" in err.detail and "codeSigning" in err.detail


def _custom_signer(lab: dict[str, object], tmp_path: Path, eku: list | None) -> tuple[Path, Path]:
    ca = lab["ca"]
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())  # type: ignore[attr-defined]
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), None)  # type: ignore[attr-defined]
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custom")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    cert_path, key_path = tmp_path / "custom.pem", tmp_path / "custom.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.mark.parametrize(
    ("eku", "ok"),
    [
        (None, True),
        ([ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE], True),
        ([ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.CODE_SIGNING], True),
        ([ExtendedKeyUsageOID.EMAIL_PROTECTION], False),
    ],
)
def test_eku_rules(lab: dict[str, object], tmp_path: Path, eku: list | None, ok: bool) -> None:
    cert, key = _custom_signer(lab, tmp_path, eku)
    package = build(tmp_path / "e.wpk", gzip.compress(mg(INSTALLER)), cert, key)
    if ok:
        assert wpk.verify(package, ca_of(lab)).ca_verified
    else:
        err = refused(tmp_path, package, SIG, ca=ca_of(lab))
        assert "emailProtection" in err.detail


def test_non_rsa_signer(lab: dict[str, object], tmp_path: Path) -> None:
    ec_files = lab["ec"]
    key = serialization.load_pem_private_key(ec_files.key.read_bytes(), None)  # type: ignore[attr-defined]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    payload = gzip.compress(mg(INSTALLER))
    sig = key.sign(payload, ec.ECDSA(hashes.SHA256()))
    package = build(tmp_path / "ec.wpk", payload, ec_files.cert, None, sig=sig)  # type: ignore[attr-defined]
    for ca in (ca_of(lab), None):
        err = refused(tmp_path, package, SIG, ca=ca)
        assert "Public key is not RSA" in err.detail


def test_signature_from_another_key(lab: dict[str, object], tmp_path: Path) -> None:
    payload = gzip.compress(mg(INSTALLER))
    foreign = lab["foreign"]
    private = serialization.load_pem_private_key(foreign.key.read_bytes(), None)  # type: ignore[attr-defined]
    sig = private.sign(payload, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]
    package = build(tmp_path / "k.wpk", payload, lab["signer"].cert, None, sig=sig)  # type: ignore[attr-defined]
    err = refused(tmp_path, package, SIG, ca=ca_of(lab))
    assert "signature does not match" in err.detail


def test_self_signed_attacker(lab: dict[str, object], tmp_path: Path) -> None:
    """With a CA store a self-signed signer is refused; without one it is accepted, as the
    reference does (the result says ca_verified=False)."""
    attacker = lab["other"]
    src = lab["base"] / "src" / "upgrade.sh"  # type: ignore[operator]
    package = tmp_path / "self.wpk"
    wpk.pack(package, attacker.cert, attacker.key, [src])  # type: ignore[attr-defined]
    refused(tmp_path, package, SIG, ca=ca_of(lab))
    assert wpk.verify(package, None).ca_verified is False


def _cross_signed_web(k: int) -> tuple[bytes, rsa.RSAPrivateKey]:
    """A signer certificate issued by ``CN=loop`` followed by k*k "CA" certificates all named
    ``CN=loop``, each of the k keys certified by every key: a web in which a depth-first
    chain search without a budget takes exponential time (k=4: ~20 s, k=5: hours)."""
    now = datetime.now(UTC)
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=1024) for _ in range(k)]
    loop = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loop")])

    def cert(subject: x509.Name, key: rsa.RSAPrivateKey, by: rsa.RSAPrivateKey, ca: bool):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(loop)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False
            )
        return builder.sign(by, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)

    signer_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    leaf = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web signer")])
    pem = cert(leaf, signer_key, keys[0], False)
    pem += b"".join(cert(loop, keys[i], keys[j], True) for i in range(k) for j in range(k))
    return pem, signer_key


def test_cross_signed_certificate_web_is_refused_quickly(
    lab: dict[str, object], tmp_path: Path
) -> None:
    """A WPK whose PEM section is a web of cross-signed certificates (found by the hardening
    review: an agent spent minutes of CPU and growing memory in the chain search, holding its
    upgrade lock) is refused with 13 after a bounded search; more than 16 intermediates are
    refused at once."""
    payload = gzip.compress(mg(INSTALLER))
    for k, reason in ((4, "within 200 candidate issuers"), (5, "at most 16")):
        pem, key = _cross_signed_web(k)
        (tmp_path / f"web{k}.pem").write_bytes(pem)
        (tmp_path / f"web{k}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        package = build(
            tmp_path / f"web{k}.wpk", payload, tmp_path / f"web{k}.pem", tmp_path / f"web{k}.key"
        )
        err = refused(tmp_path, package, SIG, ca=ca_of(lab))
        assert reason in err.detail, err.detail


def test_pem_section_problems(lab: dict[str, object], tmp_path: Path) -> None:
    payload = gzip.compress(mg(INSTALLER))
    (tmp_path / "garbage.pem").write_bytes(b"this is not a certificate at all")
    package = build(tmp_path / "g.wpk", payload, tmp_path / "garbage.pem", None, sig=b"\x01" * 256)
    assert "no parsable X.509" in refused(tmp_path, package, SIG, ca=None).detail
    (tmp_path / "nonul.wpk").write_bytes(MAGIC + lab["signer"].cert.read_bytes() * 3)  # type: ignore[attr-defined]
    err = refused(tmp_path, tmp_path / "nonul.wpk", SIG, ca=None)
    assert "Couldn't get certificate" in err.detail
    broken = lab["signer"].cert.read_bytes().replace(b"\n", b"\nAAAA", 3)  # type: ignore[attr-defined]
    (tmp_path / "broken.pem").write_bytes(broken)
    package = build(tmp_path / "b.wpk", payload, tmp_path / "broken.pem", None, sig=b"\x01" * 256)
    assert "signer certificate" in refused(tmp_path, package, SIG, ca=None).detail


# ---------------------------------------------------------------------------------------------
# hostile merged files (correctly signed): 16


@pytest.mark.parametrize(
    "members",
    [
        pytest.param([(b"../evil", b"x")], id="dotdot"),
        pytest.param([(b"a/../../evil", b"x")], id="nested-dotdot"),
        pytest.param([(b"..\\evil", b"x")], id="backslash-dotdot"),
        pytest.param([(b"/etc/evil", b"x")], id="absolute"),
        pytest.param([(b"\\evil", b"x")], id="backslash-absolute"),
        pytest.param([(b"C:\\evil", b"x")], id="drive"),
        pytest.param([(b"c:evil", b"x")], id="drive-relative"),
        pytest.param([(b"a\x00b", b"x")], id="nul"),
        pytest.param([(b"a\x1b[31mb", b"x")], id="control"),
        pytest.param([(b"", b"x")], id="empty-name"),
        pytest.param([(b"./.", b"x")], id="dot-only"),
        pytest.param([(b"\xff\xfe", b"x")], id="not-utf8"),
        pytest.param([(b"dup", b"1"), (b"dup", b"2")], id="duplicate"),
        pytest.param([(b"d/f", b"1"), (b"d//./f", b"2")], id="duplicate-normalized"),
        pytest.param([(b"a", b"1"), (b"a/b", b"2")], id="file-then-below"),
        pytest.param([(b"a/b", b"1"), (b"a", b"2")], id="dir-then-file"),
    ],
)
def test_hostile_member_names(lab: dict[str, object], tmp_path: Path, members: list) -> None:
    payload = gzip.compress(mg(INSTALLER, *members))
    err = refused(tmp_path, signed(lab, tmp_path, payload), UNMERGE, ca=ca_of(lab))
    assert "member" in err.detail or "name" in err.detail


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        pytest.param(mg(INSTALLER, (b"n" * 2100, b"x")), "longer than 2048", id="long-header"),
        pytest.param(
            mg(INSTALLER, raw=b"#" + b"c" * 3000 + b"\n"), "longer than 2048", id="long-other-line"
        ),
        pytest.param(mg(INSTALLER, raw=b"!abc pkg\n"), "malformed", id="size-not-number"),
        pytest.param(mg(INSTALLER, raw=b"!-5 pkg\nxxxxx"), "malformed", id="negative-size"),
        pytest.param(mg(INSTALLER, raw=b"!5\nxxxxx"), "malformed", id="no-name"),
        pytest.param(mg(INSTALLER, raw=b"!5pkg\nxxxxx"), "malformed", id="no-space"),
        pytest.param(mg(INSTALLER, raw=b"!" + b"9" * 20 + b" x\n"), "malformed", id="huge-size"),
        pytest.param(
            mg(INSTALLER, raw=b"!1000000 pkg.bin\n" + b"x" * 999), "truncated", id="size-too-big"
        ),
        pytest.param(b"", "no file", id="empty-merged"),
        pytest.param(b"#only a tag\n", "no file", id="tag-only"),
    ],
)
def test_bad_structure(lab: dict[str, object], tmp_path: Path, body: bytes, needle: str) -> None:
    err = refused(tmp_path, signed(lab, tmp_path, gzip.compress(body)), UNMERGE, ca=ca_of(lab))
    assert needle in err.detail


def test_header_line_of_exactly_2048_bytes_is_fine(lab: dict[str, object], tmp_path: Path) -> None:
    parts = [b"n" * 200] * 9
    name = b"/".join(parts)
    name += b"/" + b"x" * (2048 - len(b"!1 \n") - len(name) - 1)
    assert len(b"!1 " + name + b"\n") == 2048
    payload = gzip.compress(mg(INSTALLER, (name, b"x")))
    result = wpk.verify_and_unpack(
        signed(lab, tmp_path, payload), ca_of(lab), tmp_path / "up", "upgrade.sh"
    )
    assert len(result.members) == 2
    longer = gzip.compress(mg(INSTALLER, (name + b"y", b"x")))
    err = refused(tmp_path, signed(lab, tmp_path, longer, "l.wpk"), UNMERGE, ca=ca_of(lab))
    assert "longer than 2048" in err.detail


# ---------------------------------------------------------------------------------------------
# gzip layer: 14


def _bomb(size: int) -> bytes:
    """gzip of ``size`` zero bytes, compressed streaming (never holding them)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    header = b"!%d bomb\n" % size
    parts = [comp.compress(mg(INSTALLER) + header)]
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        parts.append(comp.compress(zeros))
    parts.append(comp.flush())
    return b"".join(parts)


def test_gzip_bomb_small(lab: dict[str, object], tmp_path: Path) -> None:
    package = signed(lab, tmp_path, _bomb(64 << 20))
    assert package.stat().st_size < 200_000
    err = refused(tmp_path, package, GZ, ca=ca_of(lab))
    assert "gzip bomb" in err.detail


@pytest.mark.slow
def test_gzip_bomb_one_gib(lab: dict[str, object], tmp_path: Path) -> None:
    package = signed(lab, tmp_path, _bomb(1 << 30))
    err = refused(tmp_path, package, GZ, ca=ca_of(lab))
    assert "gzip bomb" in err.detail


def test_limits(lab: dict[str, object], tmp_path: Path) -> None:
    good = lab["good"]
    err = refused(tmp_path, good, GZ, ca=ca_of(lab), limits=wpk.UnpackLimits(max_total_size=30000))  # type: ignore[arg-type]
    assert "size limit" in err.detail
    err = refused(tmp_path, good, UNMERGE, ca=ca_of(lab), limits=wpk.UnpackLimits(max_members=1))  # type: ignore[arg-type]
    assert "more than 1 members" in err.detail
    err = refused(
        tmp_path,
        good,  # type: ignore[arg-type]
        UNMERGE,
        ca=ca_of(lab),
        limits=wpk.UnpackLimits(max_member_size=1000),
    )
    assert "announces 40000 bytes" in err.detail
    text = os.urandom(1000).hex().encode() * 50  # compresses about 30:1
    package = signed(lab, tmp_path, gzip.compress(mg(INSTALLER, (b"t", text))), "r.wpk")
    limits = wpk.UnpackLimits(max_ratio=5, ratio_grace=0)
    assert "ratio above 5:1" in refused(tmp_path, package, GZ, ca=ca_of(lab), limits=limits).detail


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        pytest.param(b"", "empty payload", id="nothing-after-signature"),
        pytest.param(mg(INSTALLER), "corrupt gzip", id="not-gzip"),
        pytest.param(
            gzip.compress(mg(INSTALLER)) + b"trailing garbage", "trailing", id="trailing-garbage"
        ),
        pytest.param(
            gzip.compress(mg(INSTALLER))[:10] + b"\xff" * 50, "corrupt gzip", id="corrupt-deflate"
        ),
        pytest.param(
            (lambda z: z[:-8] + bytes([z[-8] ^ 1]) + z[-7:])(gzip.compress(mg(INSTALLER))),
            "corrupt gzip",
            id="bad-crc",
        ),
        pytest.param(
            gzip.compress(mg(INSTALLER, (b"../evil", b"x")))[:-6],
            "truncated",
            id="structure-fault-then-truncated-gzip",
        ),
    ],
)
def test_bad_gzip(lab: dict[str, object], tmp_path: Path, payload: bytes, needle: str) -> None:
    err = refused(tmp_path, signed(lab, tmp_path, payload), GZ, ca=ca_of(lab))
    assert needle in err.detail


# ---------------------------------------------------------------------------------------------
# installer jail (5), missing installer (17), destination (15), changes after verification (13)


@pytest.mark.parametrize(
    "installer", ["../evil.sh", "/bin/sh", "a/../../x.sh", "", "up\x00grade.sh", "C:\\x.bat"]
)
def test_installer_escaping_the_jail(
    lab: dict[str, object], tmp_path: Path, installer: str
) -> None:
    refused(tmp_path, lab["good"], NAME, ca=ca_of(lab), installer=installer)  # type: ignore[arg-type]


def test_missing_installer(lab: dict[str, object], tmp_path: Path) -> None:
    err = refused(tmp_path, lab["good"], CHMOD, ca=ca_of(lab), installer="fake_upgrade.sh")  # type: ignore[arg-type]
    assert "fake_upgrade.sh" in err.detail


def test_destination_is_a_file(lab: dict[str, object], tmp_path: Path) -> None:
    (tmp_path / "upgrade").write_text("not a dir")
    before = snapshot(tmp_path)
    with pytest.raises(WpkError) as err:
        wpk.verify_and_unpack(lab["good"], ca_of(lab), tmp_path / "upgrade", "upgrade.sh")  # type: ignore[arg-type]
    assert err.value.code == AgentCode.CLEAN_UPGRADE_DIR
    assert snapshot(tmp_path) == before


def test_payload_changed_after_verification(lab: dict[str, object], tmp_path: Path) -> None:
    """The unpack pass re-hashes the payload: a file swapped after the signature check is
    refused (13) and the destination is untouched."""
    dest = tmp_path / "var" / "upgrade"
    dest.mkdir(parents=True)
    (dest / "keep").write_text("old")
    before = snapshot(tmp_path)
    with open(lab["good"], "rb") as fh:  # type: ignore[call-overload]
        header = wpk._read_header(fh)
        with pytest.raises(WpkError) as err:
            wpk._unpack_open(fh, header, dest, wpk.UnpackLimits(), "00" * 32, "upgrade.sh")
    assert err.value.code == AgentCode.SIGNATURE
    assert "changed after" in err.value.detail
    assert snapshot(tmp_path) == before


def test_code_ranking_follows_the_reference_order(lab: dict[str, object], tmp_path: Path) -> None:
    """Several faults at once: the earliest reference step's code is reported."""
    # bad signature + traversal member -> 13
    payload = gzip.compress(mg((b"../evil", b"x")))
    signer = lab["signer"]
    package = build(tmp_path / "x.wpk", payload, signer.cert, None, sig=b"\x00" * 256)  # type: ignore[attr-defined]
    refused(tmp_path, package, SIG, ca=ca_of(lab))
    # traversal member + bad installer name -> 16
    package = signed(lab, tmp_path, payload, "y.wpk")
    refused(tmp_path, package, UNMERGE, ca=ca_of(lab), installer="../x")


def test_missing_package(lab: dict[str, object], tmp_path: Path) -> None:
    err = refused(tmp_path, tmp_path / "nope.wpk", SIG, ca=ca_of(lab))
    assert "cannot open WPK" in err.detail
    assert wpk.inspect(tmp_path / "nope.wpk")["errors"][0].startswith("cannot read file")
