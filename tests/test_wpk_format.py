"""WPK256 format: a hand-built golden file read by our reader, pack() output parsed by hand,
key sizes, CA stores (rotation, directories, intermediates), safe replacement of the
destination, streaming, and a pack -> verify -> unpack round-trip property."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import re
import shutil
import stat
import tempfile
import time
import tracemalloc
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wpk_upgrade import pki, wpk
from wpk_upgrade.errors import AgentCode, WpkError

MAGIC = b"WPK256\x00"
ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------
# fixtures and hand-made helpers (independent of wpk.pack / wpk's reader)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("lab")
    ca = pki.create_ca(base / "ca")
    ca2 = pki.create_ca(base / "ca2", common_name="second lab CA")
    signer = pki.issue_certificate(ca.cert, ca.key, base / "signer", "signer", "code")
    signer2 = pki.issue_certificate(ca2.cert, ca2.key, base / "signer2", "signer two", "code")
    return {
        "ca": ca.cert,
        "ca_key": ca.key,
        "ca2": ca2.cert,
        "ca2_key": ca2.key,
        "cert": signer.cert,
        "key": signer.key,
        "cert2": signer2.cert,
        "key2": signer2.key,
        "base": base,
    }


def sign_by_hand(key_path: Path, payload: bytes) -> bytes:
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[union-attr,call-arg]


def build_by_hand(path: Path, cert_pem: bytes, key_path: Path, payload: bytes) -> bytes:
    """The byte layout of reference §6.1, concatenated by hand."""
    data = MAGIC + cert_pem + b"\x00" + sign_by_hand(key_path, payload) + payload
    path.write_bytes(data)
    return data


def parse_by_hand(data: bytes, sig_len: int) -> tuple[bytes, bytes, bytes | None, list]:
    """(cert pem, signature, tag, [(name, content)]) following the documented layout."""
    assert data[:7] == MAGIC
    nul = data.index(b"\x00", 7)
    pem = data[7:nul]
    signature = data[nul + 1 : nul + 1 + sig_len]
    merged = gzip.decompress(data[nul + 1 + sig_len :])
    tag, members, pos = None, [], 0
    while pos < len(merged):
        end = merged.index(b"\n", pos)
        line, pos = merged[pos:end], end + 1
        if line.startswith(b"!"):
            size, name = line[1:].split(b" ", 1)
            members.append((name.decode(), merged[pos : pos + int(size)]))
            pos += int(size)
        elif line.startswith(b"#") and pos == end + 1 and not members and tag is None:
            tag = line[1:]
    return pem, signature, tag, members


def merged(*members: tuple[str, bytes], tag: bytes | None = b"golden.wpk", junk: bool = True):
    out = b"#" + tag + b"\n" if tag is not None else b""
    for i, (name, content) in enumerate(members):
        out += b"!%d %s\n" % (len(content), name.encode()) + content
        if junk and i == 0:
            out += b"this line does not start with a bang and is skipped\n\n"
    return out


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


GOLDEN_MEMBERS = (
    ("upgrade.sh", b"#!/bin/sh\necho upgraded\n"),
    ("empty", b""),
    ("dir/sub/blob.bin", b"\x00\n!3 not-a-header\n\xff" * 10),
)


# ---------------------------------------------------------------------------------------------
# the golden file


def test_golden_hand_built_file_is_read(lab: dict[str, Path], tmp_path: Path) -> None:
    pem = lab["cert"].read_bytes()
    payload = gzip.compress(merged(*GOLDEN_MEMBERS), mtime=0)
    data = build_by_hand(tmp_path / "golden.wpk", pem, lab["key"], payload)

    header = wpk.read_header(tmp_path / "golden.wpk")
    assert header.cert_pem == pem
    assert header.certificate == x509.load_pem_x509_certificate(pem)
    assert header.signature == sign_by_hand(lab["key"], payload)
    assert header.payload_offset == 7 + len(pem) + 1 + 256
    assert header.payload_size == len(payload)
    assert header.file_size == len(data)

    verified = wpk.verify(tmp_path / "golden.wpk", [lab["ca"]])
    assert verified.ca_verified
    assert verified.sha1 == hashlib.sha1(data).hexdigest()
    assert verified.sha256 == hashlib.sha256(data).hexdigest()
    assert verified.payload_sha256 == hashlib.sha256(payload).hexdigest()
    assert verified.size == len(data)

    result = wpk.verify_and_unpack(
        tmp_path / "golden.wpk", [lab["ca"]], tmp_path / "up", "upgrade.sh"
    )
    assert tree(tmp_path / "up") == dict(GOLDEN_MEMBERS)
    assert [(m.name, m.size) for m in result.members] == [(n, len(c)) for n, c in GOLDEN_MEMBERS]
    assert result.installer == (tmp_path / "up" / "upgrade.sh").resolve()

    info = wpk.inspect(tmp_path / "golden.wpk")
    assert info["errors"] == []
    assert info["tag"] == "golden.wpk"
    assert info["signature_valid"] is True
    assert [m["name"] for m in info["members"]] == [n for n, _ in GOLDEN_MEMBERS]


def test_golden_gzip_variants(lab: dict[str, Path], tmp_path: Path) -> None:
    """A gzip header with a file name and mtime (what wpkpack's gzip.open writes), and a
    payload made of two concatenated gzip members, are both read."""
    body = merged(*GOLDEN_MEMBERS, tag=None, junk=False)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="tmpmerged", mode="wb", fileobj=buf, mtime=1_600_000_000) as gz:
        gz.write(body)
    named = buf.getvalue()
    assert named[3] & 0x08  # FNAME flag set
    split = body.index(b"!0 empty")
    concatenated = gzip.compress(body[:split]) + gzip.compress(body[split:])
    for i, payload in enumerate((named, concatenated)):
        path = tmp_path / f"v{i}.wpk"
        build_by_hand(path, lab["cert"].read_bytes(), lab["key"], payload)
        wpk.verify_and_unpack(path, [lab["ca"]], tmp_path / f"out{i}", "upgrade.sh")
        assert tree(tmp_path / f"out{i}") == dict(GOLDEN_MEMBERS)


def test_pem_with_leading_text_and_chain(lab: dict[str, Path], tmp_path: Path) -> None:
    """The PEM section is verbatim: text before the certificate (as in exported bundles) is
    tolerated and certificates after the signer are extra (intermediate) certificates."""
    pem = b"Bag Attributes\n    friendlyName: signer\n" + lab["cert"].read_bytes()
    pem += lab["ca2"].read_bytes()
    payload = gzip.compress(merged(*GOLDEN_MEMBERS))
    build_by_hand(tmp_path / "x.wpk", pem, lab["key"], payload)
    header = wpk.read_header(tmp_path / "x.wpk")
    assert header.certificate == x509.load_pem_x509_certificate(lab["cert"].read_bytes())
    assert len(header.extra_certificates) == 1
    assert wpk.verify(tmp_path / "x.wpk", [lab["ca"]]).ca_verified


# ---------------------------------------------------------------------------------------------
# pack() checked against the format


def test_pack_output_parsed_by_hand(lab: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "bin").mkdir(parents=True)
    (src / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 4)
    (src / "a.txt").write_text("alpha\n")
    (src / "empty").write_bytes(b"")
    (tmp_path / "upgrade.sh").write_text("#!/bin/sh\nexit 0\n")
    out = tmp_path / "out" / "agent.wpk"
    out.parent.mkdir()
    result = wpk.pack(
        out, lab["cert"], lab["key"], [tmp_path / "upgrade.sh", src], installer="upgrade.sh"
    )

    data = out.read_bytes()
    pem, signature, tag, members = parse_by_hand(data, 256)
    assert pem == lab["cert"].read_bytes()  # verbatim copy of the certificate file
    assert tag == b"agent.wpk"
    assert members == [
        ("upgrade.sh", b"#!/bin/sh\nexit 0\n"),
        ("src/a.txt", b"alpha\n"),
        ("src/bin/tool", (src / "bin" / "tool").read_bytes()),
        ("src/empty", b""),
    ]
    cert = x509.load_pem_x509_certificate(pem)
    cert.public_key().verify(  # type: ignore[call-arg]
        signature, data[7 + len(pem) + 1 + 256 :], padding.PKCS1v15(), hashes.SHA256()
    )
    assert result.size == len(data)
    assert result.sha1 == hashlib.sha1(data).hexdigest()
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    assert [(m.name, m.size) for m in result.members] == [(n, len(c)) for n, c in members]
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert sorted(os.listdir(out.parent)) == ["agent.wpk"]


def test_pack_names_tags_and_order(lab: dict[str, Path], tmp_path: Path) -> None:
    for name in ("zeta", "alpha", "Mid"):
        (tmp_path / "d" / name).mkdir(parents=True)
        (tmp_path / "d" / name / "f").write_bytes(name.encode())
    (tmp_path / "z.bin").write_bytes(b"z")
    out = tmp_path / "o.wpk"
    wpk.pack(out, lab["cert"], lab["key"], [tmp_path / "z.bin", tmp_path / "d"], tag="")
    _, _, tag, members = parse_by_hand(out.read_bytes(), 256)
    assert tag is None
    assert not gzip.decompress(
        out.read_bytes()[7 + len(lab["cert"].read_bytes()) + 257 :]
    ).startswith(b"#")
    assert [n for n, _ in members] == ["z.bin", "d/Mid/f", "d/alpha/f", "d/zeta/f"]
    wpk.pack(out, lab["cert"], lab["key"], [tmp_path / "z.bin"], tag="release 4.9.2")
    assert parse_by_hand(out.read_bytes(), 256)[2] == b"release 4.9.2"
    # the "." directory is named after the directory itself
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "d")
        wpk.pack(out, lab["cert"], lab["key"], ["."])
    finally:
        os.chdir(cwd)
    assert parse_by_hand(out.read_bytes(), 256)[3][0][0] == "d/Mid/f"


def test_pack_refusals(lab: dict[str, Path], tmp_path: Path) -> None:
    from wpk_upgrade.errors import WpkUpgradeError

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_bytes(b"1")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f").write_bytes(b"2")
    (tmp_path / "f").write_bytes(b"3")
    out = tmp_path / "out.wpk"
    files = [tmp_path / "f"]
    with pytest.raises(WpkUpgradeError, match=r"installer 'upgrade\.sh' is not among"):
        wpk.pack(out, lab["cert"], lab["key"], files, installer="upgrade.sh")
    with pytest.raises(WpkUpgradeError, match=r"installer '\.\./f' refused"):
        wpk.pack(out, lab["cert"], lab["key"], files, installer="../f")
    with pytest.raises(WpkUpgradeError, match="two inputs map to member 'f'"):
        wpk.pack(out, lab["cert"], lab["key"], [tmp_path / "f", tmp_path / "a" / "f"])
    with pytest.raises(WpkUpgradeError, match="does not match"):
        wpk.pack(out, lab["cert"], lab["key2"], files)
    ec_files = pki.issue_certificate(
        lab["ca"], lab["ca_key"], tmp_path, "ec", "code", key_type="ec"
    )
    with pytest.raises(WpkUpgradeError, match="needs an RSA"):
        wpk.pack(out, ec_files.cert, ec_files.key, files)
    with pytest.raises(WpkUpgradeError, match="not a regular file or directory"):
        wpk.pack(out, lab["cert"], lab["key"], [tmp_path / "missing"])
    with pytest.raises(WpkUpgradeError, match="one line"):
        wpk.pack(out, lab["cert"], lab["key"], files, tag="two\nlines")
    with pytest.raises(WpkUpgradeError, match="no PEM certificate"):
        wpk.pack(out, lab["key"], lab["key"], files)
    os.symlink(tmp_path / "a", tmp_path / "b" / "link")
    with pytest.raises(WpkUpgradeError, match="directory symlink"):
        wpk.pack(out, lab["cert"], lab["key"], [tmp_path / "b"])
    assert not out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("bits", [1024, 3072, 4096])
def test_key_sizes(tmp_path: Path, bits: int, lab: dict[str, Path]) -> None:
    signer = pki.issue_certificate(lab["ca"], lab["ca_key"], tmp_path, "s", "code", key_size=bits)
    (tmp_path / "upgrade.sh").write_text("echo\n")
    out = tmp_path / "k.wpk"
    wpk.pack(out, signer.cert, signer.key, [tmp_path / "upgrade.sh"])
    header = wpk.read_header(out)
    assert len(header.signature) == bits // 8
    verified = wpk.verify(out, [lab["ca"]])
    assert verified.key_size == bits
    _, _, _, members = parse_by_hand(out.read_bytes(), bits // 8)
    assert members == [("upgrade.sh", b"echo\n")]
    # and a hand-built file with this key size is read too
    payload = gzip.compress(merged(("upgrade.sh", b"x")))
    build_by_hand(tmp_path / "h.wpk", signer.cert.read_bytes(), signer.key, payload)
    wpk.verify_and_unpack(tmp_path / "h.wpk", [lab["ca"]], tmp_path / "up", "upgrade.sh")
    assert (tmp_path / "up" / "upgrade.sh").read_bytes() == b"x"


# ---------------------------------------------------------------------------------------------
# trust stores


@pytest.fixture(scope="module")
def signed2(lab: dict[str, Path]) -> Path:
    """A WPK signed by the second CA's signer."""
    src = lab["base"] / "payload2"
    src.mkdir()
    (src / "upgrade.sh").write_text("#!/bin/sh\n")
    out = lab["base"] / "signed2.wpk"
    wpk.pack(out, lab["cert2"], lab["key2"], [src / "upgrade.sh"])
    return out


def test_verify_result_fields(lab: dict[str, Path], signed2: Path) -> None:
    verified = wpk.verify(signed2, [lab["ca2"]])
    cert = x509.load_pem_x509_certificate(lab["cert2"].read_bytes())
    assert verified.signer_subject == "CN=signer two"
    assert verified.signer_issuer == "CN=second lab CA"
    assert verified.not_before == cert.not_valid_before_utc
    assert verified.not_after == cert.not_valid_after_utc
    assert verified.serial_number == cert.serial_number
    assert (verified.sha1, verified.sha256) == wpk.file_digests(signed2)
    assert verified.ca_verified and verified.trust_anchor == str(lab["ca2"])
    assert verified.chain == ("CN=signer two", "CN=second lab CA")
    off = wpk.verify(signed2, None)
    assert not off.ca_verified and off.trust_anchor is None and off.sha256 == verified.sha256


def test_ca_rotation_two_files(lab: dict[str, Path], signed2: Path) -> None:
    verified = wpk.verify(signed2, [lab["ca"], lab["ca2"]])
    assert verified.trust_anchor == str(lab["ca2"])
    with pytest.raises(WpkError) as err:
        wpk.verify(signed2, [lab["ca"]])
    assert err.value.code == AgentCode.SIGNATURE
    assert "does not chain" in err.value.detail and str(lab["ca"]) in err.value.detail
    bundle = lab["base"] / "bundle.pem"
    bundle.write_bytes(lab["ca"].read_bytes() + lab["ca2"].read_bytes())
    assert wpk.verify(signed2, [bundle]).ca_verified


def test_directory_stores(lab: dict[str, Path], signed2: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(lab["ca"], plain / "old-root.pem")
    shutil.copy(lab["ca2"], plain / "new-root.crt")
    (plain / "README").write_text("not a certificate")
    shutil.copy(lab["ca2_key"], plain / "stray.key")
    (plain / "subdir").mkdir()
    assert wpk.verify(signed2, [plain]).trust_anchor == str(plain)
    # OpenSSL hashed directory: <subject hash>.0 names (symlinks, as c_rehash makes them)
    hashed = tmp_path / "hashed"
    hashed.mkdir()
    os.symlink(lab["ca2"], hashed / "5d1c0a1e.0")
    der = x509.load_pem_x509_certificate(lab["ca"].read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    (hashed / "0badf00d.0").write_bytes(der)  # DER is accepted too
    assert wpk.verify(signed2, [hashed]).ca_verified
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WpkError, match="no usable certificate"):
        wpk.verify(signed2, [empty])


def test_unusable_store_entries_are_skipped(
    lab: dict[str, Path], signed2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "missing.pem"
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(
        b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    )
    verified = wpk.verify(signed2, ["", missing, garbage, lab["ca2"]])
    assert verified.trust_anchor == str(lab["ca2"])
    assert "missing.pem" in caplog.text
    with pytest.raises(WpkError) as err:
        wpk.verify(signed2, [missing, garbage])
    assert err.value.code == AgentCode.SIGNATURE
    with pytest.raises(WpkError, match="no CA store entry"):
        wpk.verify(signed2, [])


def test_intermediates(lab: dict[str, Path], tmp_path: Path) -> None:
    inter = pki.issue_certificate(lab["ca"], lab["ca_key"], tmp_path, "intermediate", "ca")
    leaf = pki.issue_certificate(inter.cert, inter.key, tmp_path, "leaf", "code")
    (tmp_path / "upgrade.sh").write_text("x")
    out = tmp_path / "i.wpk"
    wpk.pack(out, leaf.cert, leaf.key, [tmp_path / "upgrade.sh"])
    anchors = tmp_path / "anchors.pem"
    anchors.write_bytes(lab["ca"].read_bytes() + inter.cert.read_bytes())
    assert wpk.verify(out, [anchors]).chain == ("CN=leaf", "CN=intermediate")
    with pytest.raises(WpkError, match="no issuer 'CN=intermediate'"):
        wpk.verify(out, [lab["ca"]])
    # the intermediate carried in the WPK's own PEM section chains to the root
    chain_pem = tmp_path / "chain.pem"
    chain_pem.write_bytes(leaf.cert.read_bytes() + inter.cert.read_bytes())
    wpk.pack(out, chain_pem, leaf.key, [tmp_path / "upgrade.sh"])
    assert wpk.verify(out, [lab["ca"]]).chain == (
        "CN=leaf",
        "CN=intermediate",
        "CN=wpk-upgrade lab CA",
    )
    # a leaf (CA:FALSE) cannot act as an issuer
    fake = pki.issue_certificate(leaf.cert, leaf.key, tmp_path, "fake", "code")
    fake_chain = tmp_path / "fake_chain.pem"
    fake_chain.write_bytes(
        fake.cert.read_bytes() + leaf.cert.read_bytes() + inter.cert.read_bytes()
    )
    wpk.pack(out, fake_chain, fake.key, [tmp_path / "upgrade.sh"])
    with pytest.raises(WpkError, match="is not a CA"):
        wpk.verify(out, [lab["ca"]])


def test_pinned_self_signed_signer(tmp_path: Path) -> None:
    """A signer certificate placed in the store itself is trusted (even self-signed)."""
    own = pki.create_ca(tmp_path / "own", common_name="self signer", key_size=1024)
    (tmp_path / "upgrade.sh").write_text("x")
    out = tmp_path / "p.wpk"
    wpk.pack(out, own.cert, own.key, [tmp_path / "upgrade.sh"])
    assert wpk.verify(out, [own.cert]).chain == ("CN=self signer",)


def test_validity_is_checked_at_the_given_time(lab: dict[str, Path], signed2: Path) -> None:
    later = datetime.now(UTC) + timedelta(days=900)
    with pytest.raises(WpkError, match="expired on"):
        wpk.verify(signed2, [lab["ca2"]], at=later)
    assert wpk.verify(signed2, None, at=later).ca_verified is False  # no CA, no dates (reference)


# ---------------------------------------------------------------------------------------------
# unpacking into the destination


def test_verify_and_unpack_replaces_destination(lab: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "upgrade.sh").write_text("#!/bin/sh\n")
    (tmp_path / "in" / "pkg.deb").write_bytes(os.urandom(5000))
    package = tmp_path / "agent.wpk"
    wpk.pack(
        package,
        lab["cert"],
        lab["key"],
        [tmp_path / "in" / "upgrade.sh", tmp_path / "in" / "pkg.deb"],
    )
    var = tmp_path / "var"
    dest = var / "upgrade"
    (dest / "old" / "deep").mkdir(parents=True)
    (dest / "upgrade_result").write_text("0")
    (dest / "old" / "deep" / "f").write_text("stale")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    os.symlink(outside, dest / "link")
    before = sorted(os.listdir(var))

    result = wpk.verify_and_unpack(package, [lab["ca"]], dest, "upgrade.sh")

    assert sorted(os.listdir(dest)) == ["pkg.deb", "upgrade.sh"]  # upgrade_result removed too
    assert (outside / "precious").read_text() == "keep me"  # the symlink was not followed
    assert sorted(os.listdir(var)) == before  # no temporary directory left beside dest
    assert result.installer == (dest / "upgrade.sh").resolve()
    assert result.installer_path == result.installer
    assert result.dest == dest.resolve()
    assert result.verified.ca_verified
    assert (dest / "pkg.deb").read_bytes() == (tmp_path / "in" / "pkg.deb").read_bytes()
    # a missing destination is created
    wpk.verify_and_unpack(package, None, tmp_path / "fresh", "upgrade.sh")
    assert sorted(os.listdir(tmp_path / "fresh")) == ["pkg.deb", "upgrade.sh"]
    # unpack() alone (no signature check) gives the same tree
    assert [m.name for m in wpk.unpack(package, tmp_path / "plain")] == ["upgrade.sh", "pkg.deb"]
    assert tree(tmp_path / "plain") == tree(dest)


def test_streaming_keeps_memory_small(lab: dict[str, Path], tmp_path: Path) -> None:
    block = os.urandom(1 << 20)
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        for _ in range(24):
            fh.write(block)
    (tmp_path / "upgrade.sh").write_text("x")
    package = tmp_path / "big.wpk"
    wpk.pack(package, lab["cert"], lab["key"], [big, tmp_path / "upgrade.sh"], compresslevel=1)
    tracemalloc.start()
    try:
        wpk.verify_and_unpack(package, [lab["ca"]], tmp_path / "dest", "upgrade.sh")
        wpk.inspect(package)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak Python memory {peak} bytes for a 24 MiB package"
    assert (tmp_path / "dest" / "big.bin").stat().st_size == 24 << 20


def test_read_header_never_reads_the_payload(lab: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "upgrade.sh").write_text("x")
    package = tmp_path / "huge.wpk"
    wpk.pack(package, lab["cert"], lab["key"], [tmp_path / "upgrade.sh"])
    with open(package, "r+b") as fh:
        fh.truncate(8 << 30)  # an 8 GiB sparse tail
    started = time.monotonic()
    header = wpk.read_header(package)
    assert time.monotonic() - started < 1.0
    assert header.payload_size > 8 << 29


def test_file_digests(tmp_path: Path) -> None:
    data = os.urandom(3 << 20) + b"tail"
    (tmp_path / "f").write_bytes(data)
    assert wpk.file_digests(tmp_path / "f") == (
        hashlib.sha1(data).hexdigest(),
        hashlib.sha256(data).hexdigest(),
    )


@pytest.mark.parametrize(
    "content",
    [b"", b"WPK", MAGIC, MAGIC + b"garbage without nul", os.urandom(4096), b"\x00" * 100],
)
def test_inspect_never_raises_on_garbage(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "g.wpk").write_bytes(content)
    info = wpk.inspect(tmp_path / "g.wpk")
    assert info["errors"], info
    assert info["errors"][0].startswith("13 Could not verify signature")
    assert info["size"] == len(content)


def test_normalize_member_name() -> None:
    assert wpk.normalize_member_name("a/./b//c") == "a/b/c"
    assert wpk.normalize_member_name("dir\\file") == "dir/file"
    assert wpk.normalize_member_name("x..y") == "x..y"
    for bad in ("", ".", "/x", "\\x", "C:\\x", "c:x", "a/../b", "..", "a\x00b", "a\nb"):
        with pytest.raises(ValueError):
            wpk.normalize_member_name(bad)


# ---------------------------------------------------------------------------------------------
# round-trip property

_segment = st.text(alphabet="abcxyz019_-.", min_size=1, max_size=6).filter(
    lambda s: s not in (".", "..")
)
_files = st.lists(
    st.tuples(st.lists(_segment, min_size=1, max_size=3), st.binary(max_size=3000)),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(files=_files, as_dir=st.booleans())
def test_round_trip_property(lab: dict[str, Path], files: list, as_dir: bool) -> None:
    wanted: dict[str, bytes] = {}
    dirs: set[str] = set()
    for parts, content in files:
        name = "/".join(parts)
        prefixes = {"/".join(parts[:i]) for i in range(1, len(parts))}
        if name in wanted or name in dirs or prefixes & wanted.keys():
            continue
        wanted[name] = content
        dirs |= prefixes
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        src = base / "payload"
        for name, content in wanted.items():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes(content)
        if as_dir:
            inputs, expected = [src], {f"payload/{k}": v for k, v in wanted.items()}
            expected = {k: v for k, v in expected.items()}
        else:
            top = sorted(p for p in src.iterdir())
            inputs = top
            expected = {}
            for p in top:
                if p.is_dir():
                    expected.update({f"{p.name}/{k}": v for k, v in tree(p).items()})
                else:
                    expected[p.name] = p.read_bytes()
        installer = sorted(expected)[0]
        result = wpk.pack(base / "rt.wpk", lab["cert"], lab["key"], inputs, installer=installer)
        assert {m.name: m.size for m in result.members} == {k: len(v) for k, v in expected.items()}
        assert wpk.verify(base / "rt.wpk", [lab["ca"]]).sha1 == result.sha1
        unpacked = wpk.verify_and_unpack(base / "rt.wpk", [lab["ca"]], base / "out", installer)
        assert tree(base / "out") == expected
        assert unpacked.installer == (base / "out" / installer).resolve()


# ---------------------------------------------------------------------------------------------
# the benchmark script runs (tiny size; the real figure is measured by bench/run.py)


def test_bench_script_runs() -> None:
    spec = importlib.util.spec_from_file_location("bench_wpk", ROOT / "bench" / "bench_wpk.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    figures = module.run(size_mb=2, quiet=True)
    assert figures["ratio"] > 0
    assert {"ours_seconds", "baseline_seconds", "size_bytes"} <= figures.keys()


def test_module_docstring_documents_codes() -> None:
    doc = wpk.__doc__ or ""
    for code in (
        "13 SIGNATURE",
        "14 UNCOMPRESS",
        "15 CLEAN_UPGRADE_DIR",
        "16 UNMERGE",
        "5  INVALID",
    ):
        assert code in doc
    assert re.search(r"gzip-bomb limits", doc)
