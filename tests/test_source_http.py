"""``HttpRepositorySource`` against real loopback HTTP(S) servers (``httpfixtures``).

The contract suite runs over HTTPS with the test CA (``ca_bundle``) and over plain HTTP; the
rest covers resume with ``Range``, redirects, retries, TLS, proxies, the 1 MiB limit, the
``versions`` cache and how every failure maps to its reference code and text.
"""

from __future__ import annotations

import base64
import hashlib
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpfixtures import ForwardProxy, RepoServer, TlsFiles, closed_port, make_tls
from wpk_source_http import HttpRepositorySource, HttpSourceConfig, HttpSourceConfigSchema

from wpk_upgrade.cache import WpkCache
from wpk_upgrade.drivers import SOURCES, driver_class, load_options
from wpk_upgrade.errors import PluginError, UpgradeCode, UpgradeError
from wpk_upgrade.interfaces import WpkCandidate, WpkQuery
from wpk_upgrade.repository import redact_url
from wpk_upgrade.testing.source_contract import (
    WpkSourceContract,
    publish,
    query_for,
    rel_dir,
    wpk_bytes,
)
from wpk_upgrade.versions_file import MAX_VERSIONS_SIZE

DATA = wpk_bytes(300_000, b"http")
SHA1 = hashlib.sha1(DATA).hexdigest()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("pki"))


def fast(**kw: object) -> HttpSourceConfig:
    """Test settings: short timeouts, quick backoff, no proxy from the environment."""
    base: dict[str, object] = {
        "timeout": 5.0,
        "download_timeout": 30.0,
        "retries": 3,
        "backoff": 0.01,
        "proxy": "",
    }
    return HttpSourceConfig(**{**base, **kw})


@pytest.fixture
def https(tmp_path: Path, tls: TlsFiles) -> Iterator[RepoServer]:
    with RepoServer(tmp_path / "https-root", tls) as srv:
        yield srv


@pytest.fixture
def http(tmp_path: Path) -> Iterator[RepoServer]:
    with RepoServer(tmp_path / "http-root") as srv:
        yield srv


@pytest.fixture
def src(tls: TlsFiles) -> HttpRepositorySource:
    return HttpRepositorySource(fast(ca_bundle=str(tls.ca_cert)))


def cache_at(tmp_path: Path, attempts: int = 3) -> WpkCache:
    return WpkCache(tmp_path / "cache", attempts=attempts, backoff=(0.0,))


def published(srv: RepoServer, version: str = "v4.9.0", **kw: object) -> tuple[WpkQuery, str]:
    """Publish an ubuntu WPK on ``srv``; returns (query, wpk path on the server)."""
    q = query_for(srv.base_url, version, "ubuntu")
    publish(srv, q, DATA, **kw)  # type: ignore[arg-type]
    directory, name = rel_dir(srv, q)
    return q, "/" + directory + name


# --------------------------------------------------------------------------- contract suites


class TestHttpsContract(WpkSourceContract):
    @pytest.fixture
    def repo(self, https: RepoServer) -> RepoServer:
        return https

    @pytest.fixture
    def source(self, src: HttpRepositorySource) -> HttpRepositorySource:
        return src

    @pytest.fixture
    def unreachable_base_url(self) -> str:
        return f"https://127.0.0.1:{closed_port()}/wpk/"


class TestHttpContract(WpkSourceContract):
    @pytest.fixture
    def repo(self, http: RepoServer) -> RepoServer:
        return http

    @pytest.fixture
    def source(self) -> HttpRepositorySource:
        return HttpRepositorySource(fast())

    @pytest.fixture
    def unreachable_base_url(self, http: RepoServer) -> str:
        return http.base_url + "missing/"  # the server answers 404


# --------------------------------------------------------------------------- plumbing


def test_entry_points_and_config_schema() -> None:
    assert driver_class(SOURCES, "https") is HttpRepositorySource
    assert driver_class(SOURCES, "http") is HttpRepositorySource
    cfg = load_options(HttpRepositorySource, {"ca_bundle": "/etc/ca.pem", "retries": 2}, "src")
    assert cfg == HttpSourceConfig(ca_bundle="/etc/ca.pem", retries=2)
    assert HttpSourceConfigSchema().load({}) == HttpSourceConfig()
    with pytest.raises(PluginError):
        load_options(HttpRepositorySource, {"timeout": -1}, "src")
    with pytest.raises(PluginError):
        load_options(HttpRepositorySource, {"bogus": 1}, "src")


def test_no_io_in_init() -> None:
    src = HttpRepositorySource(HttpSourceConfig(ca_bundle="/nonexistent/ca.pem"))
    assert src.cfg.ca_bundle == "/nonexistent/ca.pem"


def test_unreadable_ca_bundle_is_14(https: RepoServer, tmp_path: Path) -> None:
    src = HttpRepositorySource(fast(ca_bundle=str(tmp_path / "nope.pem")))
    q, _ = published(https)
    with pytest.raises(UpgradeError) as info:
        src.resolve(q)
    assert info.value.code == UpgradeCode.URL_NOT_FOUND
    assert "cannot load CA certificates" in info.value.detail


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("source_retries", [0, 3])
def test_cut_connections_resume_with_range(
    https: RepoServer, tls: TlsFiles, tmp_path: Path, source_retries: int
) -> None:
    """retries=0: the cache resumes between attempts; retries=3: the source resumes itself."""
    src = HttpRepositorySource(fast(ca_bundle=str(tls.ca_cert), retries=source_retries))
    q, path = published(https)
    https.behaviour.drop_first = 2
    cand = src.resolve(q)
    ref = cache_at(tmp_path).obtain(src, cand)
    assert ref.sha1 == SHA1
    assert Path(ref.path).read_bytes() == DATA
    wpk_requests = [r for r in https.requests if r.path == path]
    assert len(wpk_requests) == 3
    assert "range" not in wpk_requests[0].headers
    assert wpk_requests[1].headers["range"] == f"bytes={len(DATA) // 2}-"
    assert all("range" in r.headers for r in wpk_requests[1:])


def test_server_ignoring_range_restarts_from_zero(http: RepoServer, tmp_path: Path) -> None:
    src = HttpRepositorySource(fast())
    q, path = published(http)
    http.behaviour.drop_first = 1
    http.behaviour.ignore_range = True
    ref = cache_at(tmp_path).obtain(src, src.resolve(q))
    assert Path(ref.path).read_bytes() == DATA
    assert http.count(path) == 2


def test_complete_part_answered_416(http: RepoServer) -> None:
    src = HttpRepositorySource(fast())
    q, _ = published(http)
    cand = src.resolve(q)
    out = io.BytesIO(DATA)
    out.seek(len(DATA))
    src.fetch(cand, out, len(DATA), lambda _n: None)
    assert out.getvalue() == DATA
    assert http.requests[-1].headers["range"] == f"bytes={len(DATA)}-"


def test_part_longer_than_file_restarts(http: RepoServer) -> None:
    src = HttpRepositorySource(fast())
    q, _ = published(http)
    cand = src.resolve(q)
    out = io.BytesIO(b"\0" * (len(DATA) + 7))
    out.seek(len(DATA) + 7)
    src.fetch(cand, out, len(DATA) + 7, lambda _n: None)
    assert out.getvalue() == DATA


# --------------------------------------------------------------------------- concurrency, cache


def test_ten_threads_one_download(https: RepoServer, src: HttpRepositorySource, tmp_path: Path):
    q, path = published(https)
    https.behaviour.body_delay = 0.3
    cache = cache_at(tmp_path)
    barrier = threading.Barrier(10)
    refs: list[object] = []

    def worker() -> None:
        barrier.wait()
        cand = src.resolve(q)
        refs.append(cache.obtain(src, cand))

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(refs) == 10 and len(set(refs)) == 1
    assert https.count(path) == 1
    assert https.count("/versions") == 1  # cached for the other nine


def test_cached_wpk_not_downloaded(https: RepoServer, src: HttpRepositorySource, tmp_path: Path):
    q, path = published(https, uppercase=True)
    cache = cache_at(tmp_path)
    cache.cache_dir.mkdir(parents=True)
    cand = src.resolve(q)
    (cache.cache_dir / cand.file_name).write_bytes(DATA)
    assert cache.obtain(src, cand).sha1 == SHA1
    assert https.count(path) == 0


def test_wrong_sha1_published_is_17(http: RepoServer, tmp_path: Path) -> None:
    src = HttpRepositorySource(fast())
    q, path = published(http, sha1="74691287f21a312ab2a12e31a23f21a33d242d52")
    cache = cache_at(tmp_path)
    with pytest.raises(UpgradeError) as info:
        cache.obtain(src, src.resolve(q))
    assert info.value.code == 17
    assert str(info.value).startswith("The WPK sha1 of the file is not valid (expected 7469")
    assert list(cache.cache_dir.iterdir()) == []
    assert http.count(path) == 1


def test_versions_cache_ttl(http: RepoServer) -> None:
    src = HttpRepositorySource(fast())
    q, _ = published(http)
    src.resolve(q)
    src.resolve(q)
    assert http.count("/versions") == 1
    src.versions_cache.clear()
    src.resolve(q)
    assert http.count("/versions") == 2


# --------------------------------------------------------------------------- redirects


def test_redirect_followed(http: RepoServer, tmp_path: Path) -> None:
    with RepoServer(tmp_path / "final") as final:
        _, path = published(final)
        directory = path.rsplit("/", 1)[0] + "/"
        http.behaviour.redirects = {
            directory + "versions": final.base_url.rstrip("/") + directory + "versions",
            path: final.base_url.rstrip("/") + path,
        }
        src = HttpRepositorySource(fast())
        moved = query_for(http.base_url, "v4.9.0", "ubuntu")
        cand = src.resolve(moved)
        assert cand.url == http.base_url.rstrip("/") + path
        ref = cache_at(tmp_path).obtain(src, cand)
        assert ref.sha1 == SHA1
        assert http.count(path) == 1 and final.count(path) == 1


def test_redirect_downgrade_refused(https: RepoServer, http: RepoServer, tls: TlsFiles) -> None:
    _, path = published(http)
    https.behaviour.redirects = {path: http.base_url.rstrip("/") + path}
    src = HttpRepositorySource(fast(ca_bundle=str(tls.ca_cert)))
    cand = WpkCandidate(url=https.base_url.rstrip("/") + path, file_name="x.wpk", sha1=SHA1)
    with pytest.raises(UpgradeError) as info:
        src.fetch(cand, io.BytesIO(), 0, lambda _n: None)
    assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST
    assert "refused redirect" in info.value.detail
    assert http.count(path) == 0


def test_too_many_redirects(http: RepoServer) -> None:
    http.behaviour.redirects = {"/loop/versions": http.base_url + "loop/versions"}
    src = HttpRepositorySource(fast(max_redirects=2))
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(http.base_url + "loop/", "v4.2.0", "windows"))
    assert info.value.code == UpgradeCode.URL_NOT_FOUND
    assert info.value.code == 14


# --------------------------------------------------------------------------- retries


def test_500_twice_then_200(http: RepoServer, tmp_path: Path) -> None:
    q, path = published(http)
    http.behaviour.fail_first, http.behaviour.fail_suffix = 2, "/versions"
    src = HttpRepositorySource(fast())
    cand = src.resolve(q)
    assert http.count("/versions") == 3
    http.behaviour.fail_first, http.behaviour.fail_suffix = 2, ".wpk"
    ref = cache_at(tmp_path, attempts=1).obtain(src, cand)
    assert ref.sha1 == SHA1
    assert http.count(path) == 3


def test_500_forever_is_14_then_16(http: RepoServer, tmp_path: Path) -> None:
    q, path = published(http)
    http.behaviour.fail_first, http.behaviour.fail_suffix = 1000, ""
    src = HttpRepositorySource(fast(retries=2))
    with pytest.raises(UpgradeError) as info:
        src.resolve(q)
    assert info.value.code == UpgradeCode.URL_NOT_FOUND
    assert "HTTP 500" in info.value.detail and "after 3 attempts" in info.value.detail
    cand = WpkCandidate(url=http.base_url.rstrip("/") + path, file_name="a.wpk", sha1=SHA1)
    with pytest.raises(UpgradeError) as info:
        cache_at(tmp_path, attempts=2).obtain(src, cand)
    assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST
    assert "HTTP 500" in info.value.detail
    assert http.count(path) == 6  # 2 cache attempts x 3 source attempts


def test_stalled_server_times_out_and_retries(http: RepoServer) -> None:
    q, _ = published(http)
    http.behaviour.stall_first, http.behaviour.stall_seconds = 1, 1.5
    src = HttpRepositorySource(fast(timeout=0.3))
    assert src.resolve(q).sha1 == SHA1
    assert http.count("/versions") == 2


def test_download_timeout(http: RepoServer) -> None:
    q, _ = published(http)
    src = HttpRepositorySource(fast())
    cand = src.resolve(q)
    http.behaviour.body_delay = 0.5
    slow = HttpRepositorySource(fast(download_timeout=0.2))
    with pytest.raises(UpgradeError) as info:
        slow.fetch(cand, io.BytesIO(), 0, lambda _n: None)
    assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST
    assert "download_timeout" in info.value.detail or "time limit" in info.value.detail


# --------------------------------------------------------------------------- failure mapping


def test_versions_404_is_14_with_url(http: RepoServer) -> None:
    src = HttpRepositorySource(fast())
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(http.base_url, "v4.2.0", "windows"))
    err = info.value
    assert err.code == 14
    assert err.text == "The repository is not reachable"
    assert err.detail == f"GET {http.base_url}windows/versions: HTTP 404 Not Found"
    assert http.count("/versions") == 1  # a 404 is not retried


def test_wpk_404_is_16_after_attempts(http: RepoServer, tmp_path: Path) -> None:
    q, path = published(http)
    src = HttpRepositorySource(fast())
    cand = src.resolve(q)
    (http.root / path.lstrip("/")).unlink()
    with pytest.raises(UpgradeError) as info:
        cache_at(tmp_path, attempts=3).obtain(src, cand)
    assert info.value.code == 16
    assert str(info.value).startswith("The WPK file does not exist (")
    assert "HTTP 404 Not Found" in info.value.detail
    assert http.count(path) == 3


def test_connection_refused_is_14() -> None:
    src = HttpRepositorySource(fast())
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(f"http://127.0.0.1:{closed_port()}/", "v4.2.0", "windows"))
    assert info.value.code == 14
    assert "connection refused" in info.value.detail


def test_untrusted_certificate_is_14(https: RepoServer) -> None:
    q, _ = published(https)
    src = HttpRepositorySource(fast())  # system CAs do not know the test CA
    with pytest.raises(UpgradeError) as info:
        src.resolve(q)
    assert info.value.code == 14
    assert "certificate verif" in info.value.detail
    assert https.count("/versions") == 0


def test_unresolvable_host_is_14() -> None:
    src = HttpRepositorySource(fast())
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for("http://no-such-host.invalid/", "v4.2.0", "windows"))
    assert info.value.code == 14


def test_versions_over_1_mib_is_14(http: RepoServer) -> None:
    http.put("windows/versions", b"# padding\n" * (MAX_VERSIONS_SIZE // 10 + 1))
    src = HttpRepositorySource(fast())
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(http.base_url, "v4.2.0", "windows"))
    assert info.value.code == 14
    assert f"larger than {MAX_VERSIONS_SIZE} bytes" in info.value.detail


def test_version_absent_is_15(http: RepoServer) -> None:
    published(http)
    src = HttpRepositorySource(fast())
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(http.base_url, "v4.55.55", "ubuntu"))
    assert info.value.code == 15
    assert info.value.text == "The version of the WPK does not exist in the repository"


def test_credentials_sent_but_never_shown(http: RepoServer) -> None:
    published(http)
    token = "Basic " + base64.b64encode(b"reader:s3cret").decode()
    http.behaviour.basic_auth = token
    url = http.base_url.replace("http://", "http://reader:s3cret@")
    src = HttpRepositorySource(fast())
    cand = src.resolve(query_for(url, "v4.9.0", "ubuntu"))
    assert cand.sha1 == SHA1
    assert http.requests[-1].headers["authorization"] == token
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(url.replace("s3cret", "wrong"), "v4.9.0", "ubuntu"))
    assert info.value.code == 14
    assert "HTTP 401" in info.value.detail
    assert "wrong" not in str(info.value) and "reader:***@" in info.value.detail


# --------------------------------------------------------------------------- proxies


def test_https_through_proxy_from_environment(
    https: RepoServer, tls: TlsFiles, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    q, path = published(https)
    with ForwardProxy() as proxy:
        monkeypatch.setenv("https_proxy", proxy.url)
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        src = HttpRepositorySource(fast(ca_bundle=str(tls.ca_cert), proxy=None))
        ref = cache_at(tmp_path).obtain(src, src.resolve(q))
        assert ref.sha1 == SHA1
        tunnels = [r for r in proxy.requests if r.method == "CONNECT"]
        assert len(tunnels) == 2 and tunnels[0].path == f"127.0.0.1:{https.port}"
    assert https.count(path) == 1


def test_http_through_configured_proxy(http: RepoServer) -> None:
    q, _ = published(http)
    with ForwardProxy() as proxy:
        src = HttpRepositorySource(fast(proxy=proxy.url))
        assert src.resolve(q).sha1 == SHA1
        assert [r.path for r in proxy.requests] == [q.base_url + "linux/deb/amd64/versions"]


def test_redact_url() -> None:
    assert redact_url("https://u:p@h:1/a?b") == "https://u:***@h:1/a?b"
    assert redact_url("https://tok3n@h/a") == "https://***@h/a"
    assert redact_url("https://h/a") == "https://h/a"
    assert redact_url("file:///srv/wpk/") == "file:///srv/wpk/"
