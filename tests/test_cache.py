"""``WpkCache``: reuse, single download under concurrency, resume, digest checks, file names.

The source here is a real ``WpkSource`` over bytes in memory that can fail after writing part
of the file, following a plan, and records the offset of every ``fetch`` call.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import IO

import pytest

from wpk_upgrade.cache import WpkCache, check_file_name
from wpk_upgrade.errors import UpgradeCode, UpgradeError
from wpk_upgrade.interfaces import ProgressFn, WpkCandidate, WpkQuery, WpkSource
from wpk_upgrade.testing.source_contract import wpk_bytes

DATA = wpk_bytes(120_000, b"cache")
SHA1 = hashlib.sha1(DATA).hexdigest()
SHA256 = hashlib.sha256(DATA).hexdigest()
NAME = "wazuh_agent_v4.9.0_linux_amd64.deb.wpk"


class PlannedSource(WpkSource):
    """Serves ``data``; call i writes ``plan[i]`` bytes then fails (None: succeeds)."""

    name = "planned"

    def __init__(
        self,
        data: bytes = DATA,
        plan: list[int | None] | None = None,
        always_fail: bool = False,
        delay: float = 0.0,
        error: type[Exception] | None = None,
    ) -> None:
        super().__init__()
        self.data = data
        self.plan = plan or []
        self.always_fail = always_fail
        self.delay = delay
        self.error = error
        self.calls: list[int] = []
        self._lock = threading.Lock()

    def resolve(self, query: WpkQuery) -> WpkCandidate:
        raise NotImplementedError

    def fetch(
        self, candidate: WpkCandidate, out: IO[bytes], offset: int, progress: ProgressFn
    ) -> None:
        with self._lock:
            index = len(self.calls)
            self.calls.append(offset)
        step = self.plan[index] if index < len(self.plan) else None
        if self.always_fail:
            step = 0
        rest = self.data[offset:]
        if step is not None:
            out.write(rest[:step])
            progress(step)
            if self.error is not None:
                raise self.error("connection reset by peer")
            raise UpgradeError(UpgradeCode.WPK_FILE_DOES_NOT_EXIST, f"cut after {step} bytes")
        time.sleep(self.delay)
        out.write(rest)
        progress(len(rest))


def candidate(sha1: str | None = SHA1, **kw: object) -> WpkCandidate:
    return WpkCandidate(url="mem://x/" + NAME, file_name=NAME, sha1=sha1, **kw)  # type: ignore[arg-type]


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def cache(tmp_path: Path, sleeps: Sleeps) -> WpkCache:
    return WpkCache(tmp_path / "var" / "upgrade", sleep=sleeps)


def test_download_verified_and_renamed(cache: WpkCache) -> None:
    src = PlannedSource()
    seen: list[int] = []
    ref = cache.obtain(src, candidate(), seen.append)
    assert Path(ref.path) == cache.cache_dir / NAME
    assert Path(ref.path).read_bytes() == DATA
    assert (ref.file_name, ref.sha1, ref.sha256, ref.size) == (NAME, SHA1, SHA256, len(DATA))
    assert sorted(p.name for p in cache.cache_dir.iterdir()) == [NAME]
    assert sum(seen) == len(DATA)
    assert src.calls == [0]


def test_resume_from_part_after_failures(cache: WpkCache, sleeps: Sleeps) -> None:
    src = PlannedSource(plan=[1000, 5000])
    ref = cache.obtain(src, candidate())
    assert src.calls == [0, 1000, 6000]
    assert sleeps == [1.0, 2.0]
    assert Path(ref.path).read_bytes() == DATA


def test_os_errors_of_a_source_are_retried(cache: WpkCache) -> None:
    src = PlannedSource(plan=[700], error=ConnectionResetError)
    assert Path(cache.obtain(src, candidate()).path).read_bytes() == DATA
    assert src.calls == [0, 700]


def test_gives_up_after_attempts_then_resumes_later(cache: WpkCache, sleeps: Sleeps) -> None:
    src = PlannedSource(plan=[100] * 5)
    with pytest.raises(UpgradeError) as info:
        cache.obtain(src, candidate())
    assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST
    assert info.value.text == "The WPK file does not exist"
    assert "5 attempts failed" in info.value.detail
    assert "cut after 100 bytes" in info.value.detail
    assert sleeps == [1.0, 2.0, 3.0, 4.0]
    assert src.calls == [0, 100, 200, 300, 400]
    assert (cache.cache_dir / (NAME + ".part")).stat().st_size == 500
    # a later request resumes the partial file
    later = PlannedSource()
    assert Path(cache.obtain(later, candidate()).path).read_bytes() == DATA
    assert later.calls == [500]


def test_cached_file_reused_without_download(cache: WpkCache) -> None:
    cache.cache_dir.mkdir(parents=True)
    (cache.cache_dir / NAME).write_bytes(DATA)
    src = PlannedSource()
    ref = cache.obtain(src, candidate(SHA1.upper(), sha256=SHA256.upper()))
    assert src.calls == []
    assert ref.sha1 == SHA1
    assert cache.obtain(src, candidate()).path == ref.path  # remembered, still no download
    assert src.calls == []


def test_cached_file_with_other_digest_downloaded_again(cache: WpkCache) -> None:
    cache.cache_dir.mkdir(parents=True)
    (cache.cache_dir / NAME).write_bytes(b"old bytes")
    src = PlannedSource()
    ref = cache.obtain(src, candidate())
    assert src.calls == [0]
    assert Path(ref.path).read_bytes() == DATA


def test_file_changed_on_disk_is_checked_again(cache: WpkCache) -> None:
    src = PlannedSource()
    ref = cache.obtain(src, candidate())
    Path(ref.path).write_bytes(b"tampered")
    cache.obtain(src, candidate())
    assert src.calls == [0, 0]
    assert Path(ref.path).read_bytes() == DATA


def test_stale_part_discarded_once(cache: WpkCache) -> None:
    cache.cache_dir.mkdir(parents=True)
    (cache.cache_dir / (NAME + ".part")).write_bytes(b"\0" * 500)
    src = PlannedSource()
    ref = cache.obtain(src, candidate())
    assert src.calls == [500, 0]
    assert Path(ref.path).read_bytes() == DATA


def test_part_longer_than_announced_size_restarts(cache: WpkCache) -> None:
    cache.cache_dir.mkdir(parents=True)
    (cache.cache_dir / (NAME + ".part")).write_bytes(b"\0" * (len(DATA) + 10))
    src = PlannedSource()
    cache.obtain(src, candidate(size=len(DATA)))
    assert src.calls == [0]


def test_wrong_sha1_is_17_and_removed(cache: WpkCache) -> None:
    bad = "74691287f21a312ab2a12e31a23f21a33d242d52"
    with pytest.raises(UpgradeError) as info:
        cache.obtain(PlannedSource(), candidate(bad))
    assert info.value.code == UpgradeCode.WPK_SHA1_DOES_NOT_MATCH
    assert info.value.text == "The WPK sha1 of the file is not valid"
    assert info.value.detail.startswith(f"expected {bad} got {SHA1}")
    assert list(cache.cache_dir.iterdir()) == []


def test_wrong_sha256_is_17(cache: WpkCache) -> None:
    with pytest.raises(UpgradeError) as info:
        cache.obtain(PlannedSource(), candidate(sha256="0" * 64))
    assert info.value.code == UpgradeCode.WPK_SHA1_DOES_NOT_MATCH
    assert f"expected {'0' * 64} got {SHA256}" in info.value.detail


def test_no_published_digest_downloads_and_computes(cache: WpkCache) -> None:
    src = PlannedSource()
    ref = cache.obtain(src, candidate(None))
    assert ref.sha1 == SHA1
    cache.obtain(src, candidate(None))
    assert src.calls == [0, 0]  # nothing to trust a cached copy against


def test_ten_threads_one_download(cache: WpkCache) -> None:
    src = PlannedSource(delay=0.3)
    barrier = threading.Barrier(10)
    refs: list[object] = []

    def worker() -> None:
        barrier.wait()
        refs.append(cache.obtain(src, candidate()))

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert src.calls == [0]
    assert len(refs) == 10 and len(set(refs)) == 1  # type: ignore[arg-type]


def test_waiters_share_a_failure(tmp_path: Path) -> None:
    cache = WpkCache(tmp_path, attempts=2, backoff=(0.2,))
    src = PlannedSource(always_fail=True)
    barrier = threading.Barrier(8)
    codes: list[int] = []

    def worker() -> None:
        barrier.wait()
        try:
            cache.obtain(src, candidate())
        except UpgradeError as exc:
            codes.append(int(exc.code))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert codes == [16] * 8
    assert len(src.calls) < 8  # not 8 x 2: most callers waited for the one in flight


def test_same_name_other_digest_gets_its_own_download(cache: WpkCache) -> None:
    other = wpk_bytes(5000, b"other")
    cache.obtain(PlannedSource(), candidate())
    ref = cache.obtain(PlannedSource(other), candidate(hashlib.sha1(other).hexdigest()))
    assert Path(ref.path).read_bytes() == other


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../x.wpk",
        "a/b.wpk",
        "a\\b.wpk",
        ".hidden.wpk",
        "x.wpk.part",
        "a\0b.wpk",
        "..",
        "x" * 300,
    ],
)
def test_invalid_file_names(cache: WpkCache, name: str) -> None:
    src = PlannedSource()
    with pytest.raises(UpgradeError) as info:
        cache.obtain(src, WpkCandidate(url="mem://x", file_name=name, sha1=SHA1))
    assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST
    assert "invalid WPK file name" in info.value.detail
    assert src.calls == []


def test_valid_file_names() -> None:
    for name in (NAME, "wazuh_agent_v4.9.0-rc1_windows.wpk", "a+b.wpk"):
        assert check_file_name(name) == name


def test_unwritable_cache_is_16(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    cache = WpkCache(tmp_path / "file" / "cache")
    with pytest.raises(UpgradeError) as info:
        cache.obtain(PlannedSource(), candidate())
    assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST
    assert "cache" in info.value.detail
