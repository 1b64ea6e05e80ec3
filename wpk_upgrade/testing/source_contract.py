"""Contract suites every WPK source passes (built-in or third-party).

Two classes, by how the source finds WPKs:

* ``SourceContract``: any source that resolves versions (reference layout or not, e.g. a
  release manifest). Fixtures from the subclass (whose name starts with ``Test``):

  * ``publisher``: a ``WpkPublisher``: publishes a WPK for an agent's platform and target
    version the way this source expects (its ``base_url`` is what queries carry);
  * ``source``: the ``WpkSource`` under test, configured to read what ``publisher`` publishes
    (a fresh instance per test, so its caches start empty);
  * ``unreachable_base_url``: a base URL of the same scheme that cannot be read.

  It covers ``resolve`` (found, the agent's own platform chosen, version missing -> 15,
  repository unreachable -> 14, missing package type -> 9), ``latest_version`` (decision D1),
  ``fetch`` from 0 and from an offset, a missing WPK -> 16, and checks through ``WpkCache``
  (uppercase SHA1, SHA-256, a wrong SHA1 or SHA-256 -> 17).

* ``WpkSourceContract(SourceContract)``: sources laid out as the reference repository
  (``<dir>versions`` + WPK files: https/http, file://, s3://). The subclass provides ``repo``
  (a ``RepoStore``: where files are put, and the ``base_url`` serving them) instead of
  ``publisher`` (derived from ``repo``), plus ``source`` and ``unreachable_base_url``. It adds
  each platform layout of reference §5.2, the ``versions`` file rules (first matching line,
  garbage, CRLF) and ``latest_version`` across the two Linux layouts.
"""

from __future__ import annotations

import hashlib
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest

from ..cache import WpkCache, check_file_name
from ..errors import UpgradeCode, UpgradeError
from ..interfaces import WpkCandidate, WpkQuery, WpkSource
from ..layout import locate


class RepoStore(ABC):
    """The backing store of a source under test."""

    base_url: str

    @abstractmethod
    def put(self, rel_path: str, data: bytes) -> None:
        """Publish ``data`` at ``rel_path`` (relative to ``base_url``)."""


class DirectoryStore(RepoStore):
    """A ``RepoStore`` that is a local directory (for file:// and HTTP servers of a dir)."""

    def __init__(self, root: Path, base_url: str) -> None:
        self.root = root
        self.base_url = base_url

    def put(self, rel_path: str, data: bytes) -> None:
        target = self.root / rel_path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def wpk_bytes(size: int = 150_000, seed: bytes = b"wpk") -> bytes:
    """Deterministic pseudo-random bytes standing for a WPK."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def query_for(base_url: str, version: str, platform: str = "windows", **kw: object) -> WpkQuery:
    """A ``WpkQuery`` with plausible agent data for ``platform``."""
    defaults: dict[str, object] = {
        "windows": {"os_major": "10", "os_minor": "0", "os_arch": "x86_64", "package_type": "msi"},
        "darwin": {"os_major": "14", "os_minor": "1", "os_arch": "x86_64", "package_type": "pkg"},
        "centos": {"os_major": "8", "os_minor": "4", "os_arch": "x86_64", "package_type": "rpm"},
        "ubuntu": {"os_major": "22", "os_minor": "04", "os_arch": "x86_64", "package_type": "deb"},
    }.get(platform, {"os_major": "1", "os_minor": "0", "os_arch": "x86_64", "package_type": None})
    args = {**defaults, **kw}  # type: ignore[dict-item]
    return WpkQuery(base_url=base_url, version=version, os_platform=platform, **args)  # type: ignore[arg-type]


def rel_dir(repo: RepoStore, query: WpkQuery) -> tuple[str, str]:
    """(directory relative to ``repo.base_url``, file name) of ``query``."""
    dir_url, file_name = locate(replace(query, base_url=repo.base_url))
    return dir_url[len(repo.base_url) :], file_name


def publish(
    repo: RepoStore,
    query: WpkQuery,
    data: bytes,
    *,
    others: tuple[str, ...] = (),
    newline: str = "\n",
    uppercase: bool = False,
    sha1: str | None = None,
    sha256: bool | str = False,
) -> str:
    """Publish the WPK of ``query`` and a ``versions`` file listing it (plus ``others``).

    ``others`` are extra ``versions`` lines written first. Returns the published SHA1.
    """
    directory, file_name = rel_dir(repo, query)
    repo.put(directory + file_name, data)
    digest = sha1 or hashlib.sha1(data).hexdigest()
    shown = digest.upper() if uppercase else digest
    line = f"{query.version} {shown}"
    if sha256:
        line += " " + (sha256 if isinstance(sha256, str) else hashlib.sha256(data).hexdigest())
    lines = [*others, line]
    repo.put(directory + "versions", "".join(x + newline for x in lines).encode())
    return digest


class WpkPublisher(ABC):
    """Publishes WPKs where a source under test finds them (any repository shape)."""

    base_url: str

    @abstractmethod
    def publish(
        self,
        query: WpkQuery,
        data: bytes,
        *,
        others: Sequence[tuple[str, str]] = (),
        uppercase: bool = False,
        sha1: str | None = None,
        sha256: bool | str = False,
    ) -> str:
        """Make ``data`` the WPK of ``query.version`` for the query's agent platform.

        ``others`` are (version, sha1) pairs also listed for that platform, with no file
        behind them. The published SHA1 is ``sha1`` when given, else the real one (in
        uppercase with ``uppercase``); ``sha256`` True also publishes the real SHA-256, a
        string publishes that text. Publishing again for the same platform and version
        replaces the entry. Returns the published SHA1 (lowercase unless given).
        """


class LayoutPublisher(WpkPublisher):
    """A ``WpkPublisher`` over a ``RepoStore``: WPK files plus ``versions`` files (§5.2)."""

    def __init__(self, repo: RepoStore) -> None:
        self.repo = repo
        self.base_url = repo.base_url

    def publish(
        self,
        query: WpkQuery,
        data: bytes,
        *,
        others: Sequence[tuple[str, str]] = (),
        uppercase: bool = False,
        sha1: str | None = None,
        sha256: bool | str = False,
    ) -> str:
        lines = tuple(f"{version} {digest}" for version, digest in others)
        return publish(
            self.repo, query, data, others=lines, uppercase=uppercase, sha1=sha1, sha256=sha256
        )


class SourceContract:
    """The tests every version-resolving source passes. Fixtures ``source``, ``publisher``
    and ``unreachable_base_url`` come from the subclass (see the module docstring)."""

    data = wpk_bytes()

    # ------------------------------------------------------------------ resolve
    def test_resolve_published(self, source: WpkSource, publisher: WpkPublisher) -> None:
        q = query_for(publisher.base_url, "v4.9.0", "ubuntu")
        sha1 = publisher.publish(q, self.data)
        cand = source.resolve(q)
        assert cand.sha1 == sha1
        assert check_file_name(cand.file_name).endswith(".wpk")
        assert cand.url

    def test_resolve_picks_the_agent_platform(
        self, source: WpkSource, publisher: WpkPublisher
    ) -> None:
        agents = {
            "windows": query_for(publisher.base_url, "v4.9.1", "windows"),
            "macos": query_for(publisher.base_url, "v4.9.1", "darwin"),
            "deb amd64": query_for(publisher.base_url, "v4.9.1", "ubuntu"),
            "deb arm64": query_for(publisher.base_url, "v4.9.1", "ubuntu", os_arch="aarch64"),
            "rpm": query_for(publisher.base_url, "v4.9.1", "centos"),
        }
        published = {
            label: publisher.publish(q, wpk_bytes(1000, label.encode()))
            for label, q in agents.items()
        }
        assert len(set(published.values())) == len(agents)
        for label, q in agents.items():
            assert source.resolve(q).sha1 == published[label], label

    def test_version_missing_is_15(self, source: WpkSource, publisher: WpkPublisher) -> None:
        publisher.publish(query_for(publisher.base_url, "v4.2.0", "windows"), self.data)
        with pytest.raises(UpgradeError) as info:
            source.resolve(query_for(publisher.base_url, "v4.55.55", "windows"))
        assert info.value.code == UpgradeCode.WPK_VERSION_DOES_NOT_EXIST
        assert info.value.text == "The version of the WPK does not exist in the repository"
        assert "v4.55.55" in info.value.detail

    def test_unreachable_is_14(self, source: WpkSource, unreachable_base_url: str) -> None:
        with pytest.raises(UpgradeError) as info:
            source.resolve(query_for(unreachable_base_url, "v4.2.0", "windows"))
        assert info.value.code == UpgradeCode.URL_NOT_FOUND
        assert info.value.text == "The repository is not reachable"
        assert info.value.detail

    def test_no_package_type_is_9(self, source: WpkSource, publisher: WpkPublisher) -> None:
        publisher.publish(query_for(publisher.base_url, "v4.9.0", "ubuntu"), self.data)
        with pytest.raises(UpgradeError) as info:
            source.resolve(query_for(publisher.base_url, "v4.9.0", "alpine"))
        assert info.value.code == UpgradeCode.SYSTEM_NOT_SUPPORTED
        assert info.value.text == "The WPK for this platform is not available"

    # ------------------------------------------------------------------ latest_version
    def test_latest_version_for_the_platform(
        self, source: WpkSource, publisher: WpkPublisher
    ) -> None:
        q = query_for(publisher.base_url, "v4.9.2", "windows")
        publisher.publish(q, self.data, others=(("v4.14.1", "e" * 40), ("v3.13.6", "f" * 40)))
        other = query_for(publisher.base_url, "v4.20.0", "centos")
        publisher.publish(other, self.data)  # another platform's newer version does not count
        assert source.latest_version(replace(q, version="")) == "v4.14.1"
        assert source.latest_version(replace(other, version="")) == "v4.20.0"

    def test_latest_version_unreachable_is_none(
        self, source: WpkSource, unreachable_base_url: str
    ) -> None:
        assert source.latest_version(query_for(unreachable_base_url, "", "centos")) is None

    # ------------------------------------------------------------------ fetch
    def _published(self, source: WpkSource, publisher: WpkPublisher, **kw: object) -> WpkCandidate:
        q = query_for(publisher.base_url, "v4.9.0", "ubuntu")
        publisher.publish(q, self.data, **kw)  # type: ignore[arg-type]
        return source.resolve(q)

    def test_fetch_full(self, source: WpkSource, publisher: WpkPublisher) -> None:
        cand = self._published(source, publisher)
        out = io.BytesIO()
        seen: list[int] = []
        source.fetch(cand, out, 0, seen.append)
        assert out.getvalue() == self.data
        assert sum(seen) == len(self.data)

    def test_fetch_from_offset(self, source: WpkSource, publisher: WpkPublisher) -> None:
        cand = self._published(source, publisher)
        offset = 40_000
        out = io.BytesIO()
        out.write(self.data[:offset])
        seen: list[int] = []
        source.fetch(cand, out, offset, seen.append)
        assert out.getvalue() == self.data
        assert sum(seen) == len(self.data) - offset

    def test_fetch_missing_is_16(self, source: WpkSource, publisher: WpkPublisher) -> None:
        cand = self._published(source, publisher)
        gone = replace(cand, url=cand.url[: -len(".wpk")] + "-gone.wpk")
        with pytest.raises(UpgradeError) as info:
            source.fetch(gone, io.BytesIO(), 0, lambda _n: None)
        assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST
        assert info.value.text == "The WPK file does not exist"

    # ------------------------------------------------------------------ through the cache
    def _cache(self, tmp_path: Path) -> WpkCache:
        return WpkCache(tmp_path / "cache", attempts=2, backoff=(0.0,))

    def test_uppercase_sha1_through_cache(
        self, source: WpkSource, publisher: WpkPublisher, tmp_path: Path
    ) -> None:
        cand = self._published(source, publisher, uppercase=True)
        ref = self._cache(tmp_path).obtain(source, cand)
        assert Path(ref.path).read_bytes() == self.data
        assert ref.sha1 == hashlib.sha1(self.data).hexdigest()
        assert ref.size == len(self.data)
        assert ref.file_name == cand.file_name

    def test_sha256_column(
        self, source: WpkSource, publisher: WpkPublisher, tmp_path: Path
    ) -> None:
        cand = self._published(source, publisher, sha256=True)
        assert cand.sha256 == hashlib.sha256(self.data).hexdigest()
        assert self._cache(tmp_path).obtain(source, cand).sha256 == cand.sha256

    def test_wrong_sha256_is_17(
        self, source: WpkSource, publisher: WpkPublisher, tmp_path: Path
    ) -> None:
        cand = self._published(source, publisher, sha256="ab" * 32)
        cache = self._cache(tmp_path)
        with pytest.raises(UpgradeError) as info:
            cache.obtain(source, cand)
        assert info.value.code == UpgradeCode.WPK_SHA1_DOES_NOT_MATCH
        assert not os.listdir(cache.cache_dir)

    def test_wrong_sha1_is_17(
        self, source: WpkSource, publisher: WpkPublisher, tmp_path: Path
    ) -> None:
        cand = self._published(source, publisher, sha1="74691287f21a312ab2a12e31a23f21a33d242d52")
        cache = self._cache(tmp_path)
        with pytest.raises(UpgradeError) as info:
            cache.obtain(source, cand)
        assert info.value.code == UpgradeCode.WPK_SHA1_DOES_NOT_MATCH
        assert info.value.text == "The WPK sha1 of the file is not valid"
        got = hashlib.sha1(self.data).hexdigest()
        assert f"expected 74691287f21a312ab2a12e31a23f21a33d242d52 got {got}" in info.value.detail
        assert not os.listdir(cache.cache_dir)


class WpkSourceContract(SourceContract):
    """The layout tests. Fixtures ``source``, ``repo`` and ``unreachable_base_url`` come from
    the subclass (see the module docstring); ``publisher`` is derived from ``repo``."""

    @pytest.fixture
    def publisher(self, repo: RepoStore) -> WpkPublisher:
        return LayoutPublisher(repo)

    # ------------------------------------------------------------------ resolve
    def test_resolve_windows(self, source: WpkSource, repo: RepoStore) -> None:
        q = query_for(repo.base_url, "v4.2.0", "windows")
        sha1 = publish(repo, q, self.data, others=("v4.1.0 " + "0" * 40,))
        cand = source.resolve(q)
        assert cand.file_name == "wazuh_agent_v4.2.0_windows.wpk"
        assert cand.url == repo.base_url + "windows/wazuh_agent_v4.2.0_windows.wpk"
        assert cand.sha1 == sha1

    @pytest.mark.parametrize(
        ("platform", "arch", "version", "directory", "file_name"),
        [
            ("centos", "x86_64", "v4.9.1", "linux/rpm/x86_64/",
             "wazuh_agent_v4.9.1_linux_x86_64.rpm.wpk"),
            ("ubuntu", "aarch64", "v4.9.1", "linux/deb/arm64/",
             "wazuh_agent_v4.9.1_linux_arm64.deb.wpk"),
            ("darwin", "x86_64", "v4.9.1", "macos/pkg/intel64/",
             "wazuh_agent_v4.9.1_macos_intel64.pkg.wpk"),
            ("darwin", "x86_64", "v4.8.0", "macos/x86_64/pkg/",
             "wazuh_agent_v4.8.0_macos_x86_64.wpk"),
            ("centos", "x86_64", "v4.2.1", "linux/x86_64/",
             "wazuh_agent_v4.2.1_linux_x86_64.wpk"),
            ("ubuntu", "x64", "v3.3.0", "ubuntu/22.04/x64/",
             "wazuh_agent_v3.3.0_ubuntu_22.04_x64.wpk"),
            ("rhel", "x86", "v3.3.0", "rhel/6/x86/",
             "wazuh_agent_v3.3.0_rhel_6_x86.wpk"),
        ],
    )  # fmt: skip
    def test_resolve_layouts(
        self,
        source: WpkSource,
        repo: RepoStore,
        platform: str,
        arch: str,
        version: str,
        directory: str,
        file_name: str,
    ) -> None:
        extra: dict[str, object] = {"os_arch": arch}
        if platform == "rhel":
            extra.update(os_major="6", package_type="rpm")
        q = query_for(repo.base_url, version, platform, **extra)
        sha1 = publish(repo, q, self.data)
        cand = source.resolve(q)
        assert cand.url == repo.base_url + directory + file_name
        assert cand.file_name == file_name
        assert cand.sha1 == sha1

    def test_resolve_first_matching_line(self, source: WpkSource, repo: RepoStore) -> None:
        q = query_for(repo.base_url, "v4.3.0", "windows")
        directory, _ = rel_dir(repo, q)
        publish(repo, q, self.data)
        repo.put(
            directory + "versions",
            b"v4.4.0 " + b"1" * 40 + b"\n4.3.0 " + b"2" * 40 + b"\nv4.3.0 " + b"3" * 40 + b"\n",
        )
        assert source.resolve(q).sha1 == "2" * 40

    def test_versions_garbage_is_15(self, source: WpkSource, repo: RepoStore) -> None:
        q = query_for(repo.base_url, "v4.2.0", "windows")
        directory, _ = rel_dir(repo, q)
        repo.put(directory + "versions", b"error\nerror\nerror")
        with pytest.raises(UpgradeError) as info:
            source.resolve(q)
        assert info.value.code == UpgradeCode.WPK_VERSION_DOES_NOT_EXIST

    def test_directory_without_versions_is_14(self, source: WpkSource, repo: RepoStore) -> None:
        publish(repo, query_for(repo.base_url, "v4.2.0", "windows"), self.data)
        with pytest.raises(UpgradeError) as info:
            source.resolve(query_for(repo.base_url, "v4.9.0", "centos", os_arch="ppc64le"))
        assert info.value.code == UpgradeCode.URL_NOT_FOUND
        assert "ppc64le" in info.value.detail

    # ------------------------------------------------------------------ latest_version
    def test_latest_version_across_layouts(self, source: WpkSource, repo: RepoStore) -> None:
        new = query_for(repo.base_url, "v4.10.1", "centos")
        publish(repo, new, self.data, others=("v4.9.0 " + "a" * 40, "v4.8.9 " + "b" * 40))
        old = query_for(repo.base_url, "v4.8.2", "centos")
        publish(repo, old, self.data, others=("v4.11.0 " + "c" * 40,))
        # v4.8.9 is listed in the new directory, v4.11.0 in the old one: neither resolvable.
        assert source.latest_version(replace(new, version="")) == "v4.10.1"

    def test_latest_version_old_layout_only(self, source: WpkSource, repo: RepoStore) -> None:
        old = query_for(repo.base_url, "v4.7.5", "ubuntu")
        publish(repo, old, self.data, others=("v4.3.0 " + "d" * 40,))
        assert source.latest_version(replace(old, version="")) == "v4.7.5"

    def test_latest_version_windows(self, source: WpkSource, repo: RepoStore) -> None:
        q = query_for(repo.base_url, "v4.9.2", "windows")
        publish(repo, q, self.data, others=("v4.14.1 " + "e" * 40, "v3.13.6 " + "f" * 40))
        assert source.latest_version(q) == "v4.14.1"

    # ------------------------------------------------------------------ through the cache
    def test_crlf_uppercase_sha1_through_cache(
        self, source: WpkSource, repo: RepoStore, tmp_path: Path
    ) -> None:
        q = query_for(repo.base_url, "v4.9.0", "ubuntu")
        publish(repo, q, self.data, newline="\r\n", uppercase=True)
        cand = source.resolve(q)
        assert cand.sha1 == hashlib.sha1(self.data).hexdigest()
        ref = self._cache(tmp_path).obtain(source, cand)
        assert Path(ref.path).read_bytes() == self.data
        assert ref.sha1 == cand.sha1
        assert ref.sha256 == hashlib.sha256(self.data).hexdigest()
        assert ref.size == len(self.data)
        assert ref.file_name == cand.file_name
