"""The ``versions`` file parser (reference §5.4, decisions D1 and D5) and its cache."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wpk_upgrade import versions
from wpk_upgrade.errors import UpgradeCode, UpgradeError
from wpk_upgrade.repository import VersionsCache
from wpk_upgrade.versions_file import VersionEntry, find, format_entries, latest, parse

SHA_A = "f835015c6bbf87356a62bdfd513c7f1ffc16e0af"
SHA_B = "df5397c8c4a1b29c42726dfa821330fa1bac7058"


def test_reference_example() -> None:
    text = f"v4.9.1 {SHA_A}\nv4.9.0 {SHA_B}"  # no final newline
    assert parse(text) == [VersionEntry("v4.9.1", SHA_A), VersionEntry("v4.9.0", SHA_B)]


def test_crlf_tabs_spaces_blank_lines_comments() -> None:
    text = (
        "# official mirror\r\n"
        "\r\n"
        f"v4.9.1\t{SHA_A.upper()}   \r\n"
        f"   v4.9.0    {SHA_B}  # previous release\r\n"
        "\t\r\n"
        "#v4.8.0 " + "0" * 40 + "\r"
        "v4.7.0 " + "1" * 40
    )
    assert parse(text) == [
        VersionEntry("v4.9.1", SHA_A),
        VersionEntry("v4.9.0", SHA_B),
        VersionEntry("v4.7.0", "1" * 40),
    ]


def test_sha256_third_column() -> None:
    sha256 = hashlib.sha256(b"x").hexdigest()
    entries = parse(f"v4.9.1 {SHA_A} {sha256.upper()}\nv4.9.0 {SHA_B} not-a-digest\n")
    assert entries[0].sha256 == sha256
    assert entries[1].sha256 is None


def test_unusable_lines_are_skipped() -> None:
    text = "error\nerror\nerror\nv4.9.1\nnot-a-version " + SHA_A + "\nv4.9.0 zzzz\n"
    assert parse(text) == []
    assert parse("\ufeffv4.9.1 " + SHA_A) == [VersionEntry("v4.9.1", SHA_A)]


def test_short_sha1_of_reference_fixtures_kept() -> None:
    # the reference's unit tests use 32-digit values; a wrong length simply fails the check later
    assert parse("v4.0.0 231ef123a32d312b4123c21313ee6780")[0].sha1 == (
        "231ef123a32d312b4123c21313ee6780"
    )


def test_find_first_equal_version() -> None:
    entries = parse(f"v4.10.0 {SHA_A}\n4.9.0 {SHA_B}\nv4.9.0 {SHA_A}\nv4.9.0-rc1 {'2' * 40}\n")
    assert find(entries, "v4.9.0") == VersionEntry("4.9.0", SHA_B)
    assert find(entries, "4.10.0") == VersionEntry("v4.10.0", SHA_A)
    assert find(entries, "v4.55.55") is None
    assert find(entries, "v.4.1") is None
    assert find([], "v4.9.0") is None


def test_latest_is_highest_not_first() -> None:
    entries = parse(f"v4.9.0 {SHA_A}\nv4.10.0 {SHA_B}\nv4.2.9 {SHA_A}\nv4.10.0 {'3' * 40}\n")
    assert latest(entries) == VersionEntry("v4.10.0", SHA_B)
    assert latest([]) is None


def test_format_entries() -> None:
    entries = [VersionEntry("v4.9.1", SHA_A, "ab" * 32), VersionEntry("v4.9.0", SHA_B)]
    assert format_entries(entries) == f"v4.9.1 {SHA_A} {'ab' * 32}\nv4.9.0 {SHA_B}\n"
    assert parse(format_entries(entries, "\r\n")) == entries


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parse_never_raises(text: str) -> None:
    for entry in parse(text):
        assert entry.sha1 == entry.sha1.lower()
        versions.parse(entry.version)
        find(parse(text), entry.version)
    latest(parse(text))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_parse_never_raises_on_decoded_bytes(data: bytes) -> None:
    parse(data.decode("utf-8", errors="replace"))


_version = st.builds(
    lambda v, a, b, c, s: f"{v}{a}.{b}.{c}{s}",
    st.sampled_from(["v", ""]),
    st.integers(0, 99),
    st.integers(0, 99),
    st.integers(0, 999),
    st.sampled_from(["", "-rc1", "-beta7"]),
)
_hex40 = st.text(alphabet="0123456789abcdef", min_size=40, max_size=40)
_hex64 = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_entry = st.builds(VersionEntry, _version, _hex40, st.one_of(st.none(), _hex64))


@st.composite
def _rendered(draw: st.DrawFn) -> tuple[list[VersionEntry], str]:
    """Entries and one of the many ways a hand-made file may spell them."""
    entries = draw(st.lists(_entry, max_size=12))
    newline = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    sep = st.sampled_from([" ", "  ", "\t", " \t "])
    lines: list[str] = []
    for e in entries:
        if draw(st.booleans()):
            lines.append(draw(st.sampled_from(["", "   ", "# comment", "\t# x y z"])))
        sha1 = e.sha1.upper() if draw(st.booleans()) else e.sha1
        line = draw(st.sampled_from(["", " ", "\t"])) + e.version + draw(sep) + sha1
        if e.sha256:
            line += draw(sep) + (e.sha256.upper() if draw(st.booleans()) else e.sha256)
        line += draw(st.sampled_from(["", " ", "\t", "  # note"]))
        lines.append(line)
    text = newline.join(lines) + draw(st.sampled_from(["", newline]))
    return entries, text


@settings(max_examples=300, deadline=None)
@given(_rendered())
def test_round_trip_of_generated_files(sample: tuple[list[VersionEntry], str]) -> None:
    entries, text = sample
    assert parse(text) == entries
    assert parse(format_entries(entries)) == entries
    if entries:
        best = latest(entries)
        assert best is not None
        assert all(versions.compare(best.version, e.version) >= 0 for e in entries)
        first = find(entries, entries[-1].version)
        assert first is not None
        assert versions.compare(first.version, entries[-1].version) == 0


# --------------------------------------------------------------------------- VersionsCache


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_versions_cache_ttl_and_error_ttl() -> None:
    clock = Clock()
    cache = VersionsCache(ttl=30, error_ttl=5, clock=clock)
    loads: list[str] = []

    def ok() -> list[VersionEntry]:
        loads.append("ok")
        return [VersionEntry("v4.9.0", SHA_A)]

    def down() -> list[VersionEntry]:
        loads.append("down")
        raise UpgradeError(UpgradeCode.URL_NOT_FOUND, "GET u: connection refused")

    assert cache.get("u", ok) == [VersionEntry("v4.9.0", SHA_A)]
    clock.now = 29.9
    cache.get("u", ok)
    assert loads == ["ok"]
    clock.now = 30.0
    with pytest.raises(UpgradeError):
        cache.get("u", down)
    clock.now = 34.0
    with pytest.raises(UpgradeError) as info:
        cache.get("u", ok)  # the failure is remembered for error_ttl
    assert info.value.code == UpgradeCode.URL_NOT_FOUND
    assert info.value.detail == "GET u: connection refused"
    clock.now = 35.0
    cache.get("u", ok)
    assert loads == ["ok", "down", "ok"]
    cache.get("other", ok)
    assert loads == ["ok", "down", "ok", "ok"]


def test_versions_cache_one_loader_for_many_threads() -> None:
    cache = VersionsCache()
    loads: list[int] = []
    barrier = threading.Barrier(20)

    def load() -> list[VersionEntry]:
        loads.append(1)
        time.sleep(0.2)
        return []

    def worker() -> None:
        barrier.wait()
        cache.get("u", load)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert loads == [1]
