"""``ManifestSource`` against real loopback web servers, through the kernel's contract suite.

The generic ``SourceContract`` of ``wpk_upgrade.testing.source_contract`` runs over HTTP and
HTTPS with a ``ManifestPublisher``; the rest covers how the plugin is found (entry points,
``wpk-upgrade plugins``, the manager's scheme lookup and ``[sources."manifest+https"]``
options), the manifest format, resume with ``Range``, one download for ten concurrent
upgrades, and the failure codes.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from manifest_server import ManifestPublisher, WebServer, closed_port, lab_tls
from wpk_upgrade.cache import WpkCache
from wpk_upgrade.drivers import SOURCES, available, driver_class
from wpk_upgrade.errors import PluginError, UpgradeError
from wpk_upgrade.sources import SourceRegistry, scheme_of
from wpk_upgrade.testing.source_contract import SourceContract, query_for, wpk_bytes

from wpk_source_manifest import (
    ManifestError,
    ManifestSource,
    ManifestSourceConfig,
    agent_target,
    manifest_url,
    parse,
)

DATA = wpk_bytes(200_000, b"manifest")
SHA1 = hashlib.sha1(DATA).hexdigest()


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return lab_tls(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def web() -> Iterator[WebServer]:
    with WebServer() as server:
        yield server


@pytest.fixture
def secure_web(tls: tuple[Path, Path, Path]) -> Iterator[WebServer]:
    with WebServer(tls=(tls[1], tls[2])) as server:
        yield server


def fast(**kw: object) -> ManifestSourceConfig:
    base: dict[str, object] = {"timeout": 5.0, "retries": 2, "backoff": 0.0}
    return ManifestSourceConfig(**{**base, **kw})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- contract suites


class TestManifestOverHttp(SourceContract):
    @pytest.fixture
    def publisher(self, web: WebServer) -> ManifestPublisher:
        return ManifestPublisher(web)

    @pytest.fixture
    def source(self) -> ManifestSource:
        return ManifestSource(fast())

    @pytest.fixture
    def unreachable_base_url(self) -> str:
        return f"manifest+http://127.0.0.1:{closed_port()}/manifest.json"


class TestManifestOverHttps(SourceContract):
    @pytest.fixture
    def publisher(self, secure_web: WebServer) -> ManifestPublisher:
        return ManifestPublisher(secure_web)

    @pytest.fixture
    def source(self, tls: tuple[Path, Path, Path]) -> ManifestSource:
        return ManifestSource(fast(ca_bundle=str(tls[0])))

    @pytest.fixture
    def unreachable_base_url(self, secure_web: WebServer) -> str:
        return ManifestPublisher(secure_web, "/nothing/").base_url  # answers 404


# --------------------------------------------------------------------------- discovery


def test_registered_only_by_entry_points() -> None:
    assert driver_class(SOURCES, "manifest+https") is ManifestSource
    assert driver_class(SOURCES, "manifest+http") is ManifestSource
    found = available(SOURCES)
    assert found["manifest+https"] == "wpk_source_manifest:ManifestSource (wpk-source-manifest)"


def test_the_manager_finds_it_by_scheme_with_its_options(tmp_path: Path) -> None:
    url = "manifest+https://repo.example.com/agents/manifest.json/"
    assert scheme_of(url) == "manifest+https"
    registry = SourceRegistry({"manifest+https": {"retries": 7, "ca_bundle": "/etc/ca.pem"}})
    source = registry.for_url(url)
    assert isinstance(source, ManifestSource)
    assert source.cfg == ManifestSourceConfig(retries=7, ca_bundle="/etc/ca.pem")
    with pytest.raises(PluginError, match=r"sources\.manifest\+https: retries"):
        SourceRegistry({"manifest+https": {"retries": "many"}}).get("manifest+https")


def test_plugins_command_names_the_distribution() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "wpk_upgrade.cli", "plugins"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wpk_source_manifest:ManifestSource (wpk-source-manifest)" in proc.stdout


def test_no_io_in_init() -> None:
    source = ManifestSource({"ca_bundle": "/nonexistent/ca.pem"})
    assert source.cfg.ca_bundle == "/nonexistent/ca.pem"


def test_unreadable_ca_bundle_is_14(secure_web: WebServer) -> None:
    publisher = ManifestPublisher(secure_web)
    publisher.publish(query_for(publisher.base_url, "v4.9.0", "ubuntu"), DATA)
    source = ManifestSource(fast(ca_bundle="/nonexistent/ca.pem"))
    with pytest.raises(UpgradeError) as info:
        source.resolve(query_for(publisher.base_url, "v4.9.0", "ubuntu"))
    assert info.value.code == 14
    assert "cannot load CA certificates" in info.value.detail


def test_untrusted_certificate_is_14(secure_web: WebServer) -> None:
    publisher = ManifestPublisher(secure_web)
    publisher.publish(query_for(publisher.base_url, "v4.9.0", "ubuntu"), DATA)
    with pytest.raises(UpgradeError) as info:
        ManifestSource(fast()).resolve(query_for(publisher.base_url, "v4.9.0", "ubuntu"))
    assert info.value.code == 14
    assert "certificate verification failed" in info.value.detail


# --------------------------------------------------------------------------- the format


def test_manifest_url_forms() -> None:
    assert manifest_url("manifest+https://h/a/manifest.json/") == "https://h/a/manifest.json"
    assert manifest_url("manifest+http://h:8/a/list.json") == "http://h:8/a/list.json"
    assert manifest_url("manifest+https://h/a/") == "https://h/a/manifest.json"
    for bad in ("https://h/a/manifest.json", "manifest+ftp://h/m.json"):
        with pytest.raises(ValueError):
            manifest_url(bad)


def test_agent_targets_use_repository_names() -> None:
    assert str(agent_target("ubuntu", "x86_64", "deb")) == "linux/deb/amd64"
    assert str(agent_target("centos", "aarch64", "rpm")) == "linux/rpm/aarch64"
    assert str(agent_target("darwin", "aarch64", "pkg")) == "macos/pkg/arm64"
    assert str(agent_target("windows", "x86_64", "msi")) == "windows/msi/*"
    assert str(agent_target("alpine", "x86_64", None)) == "linux/*/x86_64"


def test_bad_entries_are_skipped_not_fatal() -> None:
    good = {"os": "windows", "url": "w.wpk", "sha1": "a" * 40}
    doc = {
        "format": 1,
        "releases": [
            {
                "version": "v4.9.0",
                "wpks": [
                    good,
                    {**good, "os": "beos"},
                    {**good, "sha1": "xyz"},
                    {**good, "url": "http://elsewhere/w.wpk"},  # downgrade from https
                    {**good, "url": "ftp://elsewhere/w.wpk"},
                    {**good, "file_name": "../../etc/passwd"},
                    {**good, "size": -1},
                    {**good, "sha256": "short"},
                ],
            },
            {"version": "not a version", "wpks": []},
            {"version": "v4.8.0"},
        ],
    }
    manifest = parse(json.dumps(doc).encode(), "https://h/r/manifest.json")
    (release,) = manifest.releases
    assert [w.url for w in release.wpks] == ["https://h/r/w.wpk"]
    assert release.wpks[0].file_name == "w.wpk"
    assert len(manifest.skipped) == 9


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"<html>not json</html>", "not JSON"),
        (b'{"versions": []}', 'no "releases" list'),
        (b'{"format": 2, "releases": []}', "manifest format 2"),
    ],
)
def test_not_a_manifest(body: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse(body, "https://h/manifest.json")


def test_not_a_manifest_is_14_with_detail(web: WebServer) -> None:
    web.put("/m/manifest.json", b"<html>oops</html>")
    url = f"manifest+http://{web.url.split('://')[1]}/m/manifest.json"
    with pytest.raises(UpgradeError) as info:
        ManifestSource(fast()).resolve(query_for(url, "v4.9.0", "ubuntu"))
    assert info.value.code == 14
    assert info.value.detail.startswith(f"{web.url}/m/manifest.json: not JSON")


def test_version_listed_without_the_platform_is_9(web: WebServer) -> None:
    publisher = ManifestPublisher(web)
    publisher.publish(query_for(publisher.base_url, "v4.9.0", "windows"), DATA)
    with pytest.raises(UpgradeError) as info:
        ManifestSource(fast()).resolve(query_for(publisher.base_url, "v4.9.0", "centos"))
    assert info.value.code == 9
    assert "v4.9.0 has no WPK for linux/rpm/x86_64" in info.value.detail


# --------------------------------------------------------------------------- downloads


def test_cut_download_resumes_with_range(web: WebServer, tmp_path: Path) -> None:
    publisher = ManifestPublisher(web)
    q = query_for(publisher.base_url, "v4.9.0", "ubuntu")
    publisher.publish(q, DATA)
    source = ManifestSource(fast())
    cand = source.resolve(q)
    web.behaviour.cut_first = 1
    ref = WpkCache(tmp_path / "cache", attempts=1).obtain(source, cand)
    assert Path(ref.path).read_bytes() == DATA
    gets = [r for r in web.requests if r.path.endswith(".wpk")]
    assert [g.headers.get("range") for g in gets] == [None, f"bytes={len(DATA) // 2}-"]


def test_ten_threads_one_download(web: WebServer, tmp_path: Path) -> None:
    publisher = ManifestPublisher(web)
    q = query_for(publisher.base_url, "v4.9.0", "ubuntu")
    publisher.publish(q, DATA)
    web.behaviour.body_delay = 0.3
    source = ManifestSource(fast())
    cache = WpkCache(tmp_path / "cache")
    barrier = threading.Barrier(10)
    refs: list[object] = []

    def worker() -> None:
        barrier.wait()
        refs.append(cache.obtain(source, source.resolve(q)))

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(refs) == 10 and len(set(refs)) == 1
    assert sum(1 for r in web.requests if r.path.endswith(".wpk")) == 1
    assert web.count(publisher.manifest_path) == 1


def test_server_errors_are_retried(web: WebServer) -> None:
    publisher = ManifestPublisher(web)
    q = query_for(publisher.base_url, "v4.9.0", "ubuntu")
    publisher.publish(q, DATA)
    web.behaviour.fail_first = 2
    source = ManifestSource(fast())
    assert source.resolve(q).sha1 == SHA1
    assert web.count(publisher.manifest_path) == 3


def test_redirect_from_https_to_http_refused(
    secure_web: WebServer, web: WebServer, tls: tuple[Path, Path, Path]
) -> None:
    publisher = ManifestPublisher(secure_web)
    q = query_for(publisher.base_url, "v4.9.0", "ubuntu")
    publisher.publish(q, DATA)
    source = ManifestSource(fast(ca_bundle=str(tls[0])))
    cand = source.resolve(q)
    web.put("/plain.wpk", DATA)
    secure_web.behaviour.redirects = {cand.url.split(secure_web.url)[1]: web.url + "/plain.wpk"}
    with pytest.raises(UpgradeError) as info:
        source.fetch(cand, io.BytesIO(), 0, lambda _n: None)
    assert info.value.code == 16
    assert "refused redirect" in info.value.detail
    assert web.count("/plain.wpk") == 0


def test_missing_wpk_is_16(web: WebServer) -> None:
    publisher = ManifestPublisher(web)
    q = query_for(publisher.base_url, "v4.9.0", "ubuntu")
    publisher.publish(q, DATA)
    source = ManifestSource(fast())
    cand = source.resolve(q)
    web.delete(cand.url.split(web.url)[1])
    with pytest.raises(UpgradeError) as info:
        source.fetch(cand, io.BytesIO(), 0, lambda _n: None)
    assert info.value.code == 16
    assert info.value.detail == f"GET {cand.url}: HTTP 404 Not Found"
