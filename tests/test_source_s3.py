"""``S3RepositorySource`` against a real S3 endpoint on loopback (moto in server mode).

boto3 speaks real HTTP to ``moto.server.ThreadedMotoServer``; request counts, ``Range`` and
``If-Match`` headers are read from a recording reverse proxy in front of it (``s3fixtures``).
The contract suite runs on a bucket; the rest covers the options, resume inside one call and
across calls, one ``GetObject`` for ten concurrent upgrades, a WPK replaced mid-download, TLS
endpoints, profiles and IAM permissions (moto's authorization on), how each failure maps to
14 or 16 with S3's own error code, and the error without boto3 (a real interpreter with an
import blocker).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from httpfixtures import TlsFiles, closed_port, make_tls
from s3fixtures import (
    ACCESS_KEY,
    REGION,
    BucketStore,
    MotoS3,
    S3Proxy,
    aws_test_environment,
    iam_reader,
)
from wpk_source_s3 import (
    MISSING_BOTO3,
    S3RepositorySource,
    S3SourceConfig,
    S3SourceConfigSchema,
    split_s3_url,
)

from wpk_upgrade.cache import WpkCache
from wpk_upgrade.drivers import SOURCES, driver_class, load_options
from wpk_upgrade.errors import PluginError, UpgradeError
from wpk_upgrade.interfaces import WpkCandidate, WpkQuery
from wpk_upgrade.testing.source_contract import (
    WpkSourceContract,
    publish,
    query_for,
    rel_dir,
    wpk_bytes,
)
from wpk_upgrade.versions_file import MAX_VERSIONS_SIZE

DATA = wpk_bytes(300_000, b"s3")
SHA1 = hashlib.sha1(DATA).hexdigest()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    aws_test_environment(monkeypatch, tmp_path)


@pytest.fixture
def store(moto: MotoS3) -> BucketStore:
    return BucketStore(moto, moto.new_bucket())


@pytest.fixture
def proxy(moto: MotoS3) -> Iterator[S3Proxy]:
    with S3Proxy(moto) as p:
        yield p


def fast(endpoint_url: str, **kw: object) -> S3SourceConfig:
    """Test settings: path-style addressing, short timeouts, no sleeping between resumptions."""
    base: dict[str, object] = {
        "endpoint_url": endpoint_url,
        "region": REGION,
        "addressing_style": "path",
        "timeout": 5.0,
        "retries": 2,
        "backoff": 0.0,
    }
    return S3SourceConfig(**{**base, **kw})  # type: ignore[arg-type]


def cache_at(tmp_path: Path, attempts: int = 3) -> WpkCache:
    return WpkCache(tmp_path / "cache", attempts=attempts, backoff=(0.0,))


def published(store: BucketStore, version: str = "v4.9.0", **kw: object) -> tuple[WpkQuery, str]:
    """Publish an ubuntu WPK; returns (query, the WPK's object key)."""
    q = query_for(store.base_url, version, "ubuntu")
    publish(store, q, DATA, **kw)  # type: ignore[arg-type]
    directory, name = rel_dir(store, q)
    return q, store.prefix + directory + name


# --------------------------------------------------------------------------- contract suite


class TestS3Contract(WpkSourceContract):
    @pytest.fixture
    def repo(self, store: BucketStore) -> BucketStore:
        return store

    @pytest.fixture
    def source(self, moto: MotoS3) -> S3RepositorySource:
        return S3RepositorySource(fast(moto.endpoint_url))

    @pytest.fixture
    def unreachable_base_url(self) -> str:
        return "s3://wpk-no-such-bucket-4a1f/4.x/wpk/"


# --------------------------------------------------------------------------- plumbing


def test_entry_point_and_config_schema() -> None:
    assert driver_class(SOURCES, "s3") is S3RepositorySource
    options = {"endpoint_url": "http://127.0.0.1:9000", "region": "eu-west-3", "profile": "wpk"}
    cfg = load_options(S3RepositorySource, options, "sources.s3")
    assert cfg == S3SourceConfig(
        endpoint_url="http://127.0.0.1:9000", region="eu-west-3", profile="wpk"
    )
    assert S3SourceConfigSchema().load({}) == S3SourceConfig()
    for bad in (
        {"addressing_style": "sideways"},
        {"endpoint_url": "ftp://host/"},
        {"region": "Not A Region"},
        {"retries": -1},
        {"aws_secret_access_key": "x"},  # credentials are never options
    ):
        with pytest.raises(PluginError, match=r"sources\.s3"):
            load_options(S3RepositorySource, bad, "sources.s3")


def test_no_io_in_init() -> None:
    src = S3RepositorySource({"endpoint_url": f"http://127.0.0.1:{closed_port()}", "profile": "x"})
    assert src.cfg.profile == "x"
    assert src._client is None  # created on the first request


def test_split_s3_url() -> None:
    assert split_s3_url("s3://bkt/4.x/wpk/windows/versions") == ("bkt", "4.x/wpk/windows/versions")
    assert split_s3_url("S3://bkt/a%20b/c") == ("bkt", "a b/c")
    for bad in ("s3:///key", "s3://bkt/", "https://bkt/key", "s3://user@bkt/key"):
        with pytest.raises(ValueError):
            split_s3_url(bad)


def test_bucket_root_as_repository(moto: MotoS3) -> None:
    store = BucketStore(moto, moto.new_bucket(), prefix="")
    q = query_for(store.base_url, "v4.9.0", "ubuntu")
    publish(store, q, DATA)
    assert store.base_url.count("/") == 3
    assert S3RepositorySource(fast(moto.endpoint_url)).resolve(q).sha1 == SHA1


# --------------------------------------------------------------------------- resume


def test_cut_download_resumes_inside_the_call(
    moto: MotoS3, store: BucketStore, proxy: S3Proxy, tmp_path: Path
) -> None:
    """The source resumes a body cut half-way with Range + If-Match (same object only)."""
    q, key = published(store)
    src = S3RepositorySource(fast(proxy.endpoint_url))
    proxy.behaviour.cut_first = 1
    ref = cache_at(tmp_path, attempts=1).obtain(src, src.resolve(q))
    assert ref.sha1 == SHA1 and Path(ref.path).read_bytes() == DATA
    first, second = proxy.gets(store.bucket, key)
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={len(DATA) // 2}-"
    etag = moto.admin().head_object(Bucket=store.bucket, Key=key)["ETag"]
    assert second.headers["if-match"] == etag


def test_cut_download_resumed_by_the_cache(
    store: BucketStore, proxy: S3Proxy, tmp_path: Path
) -> None:
    """retries=0: the source gives up (16), the cache's next attempt asks for the rest."""
    q, key = published(store)
    src = S3RepositorySource(fast(proxy.endpoint_url, retries=0))
    proxy.behaviour.cut_first = 1
    ref = cache_at(tmp_path, attempts=2).obtain(src, src.resolve(q))
    assert Path(ref.path).read_bytes() == DATA
    _first, second = proxy.gets(store.bucket, key)
    assert second.headers["range"] == f"bytes={len(DATA) // 2}-"
    assert "if-match" not in second.headers  # a new call: the digest check guards it


def test_fetch_from_offset_returns_exactly_the_rest(store: BucketStore, proxy: S3Proxy) -> None:
    q, key = published(store)
    src = S3RepositorySource(fast(proxy.endpoint_url))
    cand = src.resolve(q)
    out = io.BytesIO()
    out.write(DATA[:123_457])
    got: list[int] = []
    src.fetch(cand, out, 123_457, got.append)
    assert out.getvalue() == DATA
    assert sum(got) == len(DATA) - 123_457
    (request,) = proxy.gets(store.bucket, key)
    assert request.headers["range"] == "bytes=123457-"


def test_object_replaced_mid_download_restarts(
    moto: MotoS3, store: BucketStore, proxy: S3Proxy
) -> None:
    """If-Match fails (412) after the object changed: rewind and take the new one whole."""
    q, key = published(store)
    newer = wpk_bytes(250_000, b"newer")
    src = S3RepositorySource(fast(proxy.endpoint_url))
    cand = src.resolve(q)
    proxy.behaviour.cut_first = 1
    proxy.behaviour.on_cut = lambda: store.put(key[len(store.prefix) :], newer)
    out = io.BytesIO(b"kept header:")
    out.seek(0, io.SEEK_END)
    src.fetch(cand, out, 0, lambda _n: None)
    assert out.getvalue() == b"kept header:" + newer
    ranges = [r.headers.get("range") for r in proxy.gets(store.bucket, key)]
    assert ranges == [None, f"bytes={len(DATA) // 2}-", None]


def test_offset_at_the_end_is_complete(store: BucketStore, proxy: S3Proxy) -> None:
    q, key = published(store)
    src = S3RepositorySource(fast(proxy.endpoint_url))
    cand = src.resolve(q)
    out = io.BytesIO(DATA)
    out.seek(len(DATA))
    src.fetch(cand, out, len(DATA), lambda _n: None)
    assert out.getvalue() == DATA
    (request,) = proxy.gets(store.bucket, key)
    assert request.headers["range"] == f"bytes={len(DATA)}-"


def test_part_longer_than_the_object_restarts(store: BucketStore, proxy: S3Proxy) -> None:
    q, _ = published(store)
    src = S3RepositorySource(fast(proxy.endpoint_url))
    cand = src.resolve(q)
    out = io.BytesIO(b"\0" * (len(DATA) + 9))
    out.seek(len(DATA) + 9)
    src.fetch(cand, out, len(DATA) + 9, lambda _n: None)
    assert out.getvalue() == DATA


# --------------------------------------------------------------------------- concurrency


def test_ten_threads_one_get_object(store: BucketStore, proxy: S3Proxy, tmp_path: Path) -> None:
    q, key = published(store)
    proxy.behaviour.body_delay = 0.3
    src = S3RepositorySource(fast(proxy.endpoint_url))
    cache = cache_at(tmp_path)
    barrier = threading.Barrier(10)
    refs: list[object] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            refs.append(cache.obtain(src, src.resolve(q)))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert len(refs) == 10 and len(set(refs)) == 1
    assert len(proxy.gets(store.bucket, key)) == 1
    assert len(proxy.gets(store.bucket, "/versions")) == 1  # cached for the other nine


# --------------------------------------------------------------------------- failure mapping


def test_missing_bucket_is_14_with_s3_code(moto: MotoS3) -> None:
    src = S3RepositorySource(fast(moto.endpoint_url))
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for("s3://wpk-absent-bucket-77/", "v4.2.0", "windows"))
    err = info.value
    assert (err.code, err.text) == (14, "The repository is not reachable")
    assert err.detail.startswith("GET s3://wpk-absent-bucket-77/windows/versions: NoSuchBucket")
    assert "(HTTP 404)" in err.detail


def test_missing_versions_is_14(moto: MotoS3, store: BucketStore) -> None:
    src = S3RepositorySource(fast(moto.endpoint_url))
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(store.base_url, "v4.2.0", "windows"))
    assert info.value.code == 14
    assert "NoSuchKey" in info.value.detail


def test_missing_wpk_is_16_after_attempts(
    store: BucketStore, proxy: S3Proxy, tmp_path: Path
) -> None:
    q, key = published(store)
    src = S3RepositorySource(fast(proxy.endpoint_url))
    cand = src.resolve(q)
    store.delete(key[len(store.prefix) :])
    with pytest.raises(UpgradeError) as info:
        cache_at(tmp_path, attempts=3).obtain(src, cand)
    assert info.value.code == 16
    assert str(info.value).startswith("The WPK file does not exist (")
    assert "NoSuchKey" in info.value.detail
    assert len(proxy.gets(store.bucket, key)) == 3  # a 404 is not retried by the source


def test_version_absent_is_15(moto: MotoS3, store: BucketStore) -> None:
    published(store)
    src = S3RepositorySource(fast(moto.endpoint_url))
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(store.base_url, "v4.55.55", "ubuntu"))
    assert info.value.code == 15
    assert "v4.55.55" in info.value.detail


def test_connection_refused_is_14() -> None:
    src = S3RepositorySource(fast(f"http://127.0.0.1:{closed_port()}", retries=0))
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for("s3://any-bucket/", "v4.2.0", "windows"))
    assert info.value.code == 14
    assert "Could not connect to the endpoint URL" in info.value.detail


def test_stalled_endpoint_times_out_and_is_retried(store: BucketStore, proxy: S3Proxy) -> None:
    q, _ = published(store)
    proxy.behaviour.stall_first, proxy.behaviour.stall_seconds = 1, 1.5
    src = S3RepositorySource(fast(proxy.endpoint_url, timeout=0.4, retries=1))
    assert src.resolve(q).sha1 == SHA1
    assert len(proxy.gets(store.bucket, "/versions")) == 2


def test_versions_over_1_mib_is_14(moto: MotoS3, store: BucketStore) -> None:
    store.put("windows/versions", b"# padding\n" * (MAX_VERSIONS_SIZE // 10 + 1))
    src = S3RepositorySource(fast(moto.endpoint_url))
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(store.base_url, "v4.2.0", "windows"))
    assert info.value.code == 14
    assert f"larger than {MAX_VERSIONS_SIZE} bytes" in info.value.detail


def test_not_an_s3_url() -> None:
    src = S3RepositorySource()
    with pytest.raises(UpgradeError) as info:
        src.read_text("s3:///windows/versions", 100)
    assert info.value.code == 14
    with pytest.raises(UpgradeError) as info:
        src.fetch(WpkCandidate("s3://bkt/", "a.wpk", None), io.BytesIO(), 0, lambda _n: None)
    assert info.value.code == 16


# --------------------------------------------------------------------------- credentials, TLS


def test_access_denied_is_14_and_16(moto: MotoS3, store: BucketStore, tmp_path: Path) -> None:
    """moto's IAM authorization on: a user without s3:GetObject gets a real AccessDenied."""
    q, _ = published(store)
    key_id, secret = iam_reader(moto, f"nobody-{store.bucket}", None)
    creds = tmp_path / "credentials"
    creds.write_text(f"[nobody]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
        src = S3RepositorySource(fast(moto.endpoint_url, profile="nobody"))
        cand = WpkCandidate(store.base_url + "x.wpk", "x.wpk", SHA1)
        with moto.enforce_auth():
            with pytest.raises(UpgradeError) as info:
                src.resolve(q)
            with pytest.raises(UpgradeError) as fetched:
                src.fetch(cand, io.BytesIO(), 0, lambda _n: None)
    assert info.value.code == 14 and "AccessDenied" in info.value.detail
    assert "(HTTP 403)" in info.value.detail
    assert fetched.value.code == 16 and "AccessDenied" in fetched.value.detail


def test_profile_credentials_are_used(
    moto: MotoS3, store: BucketStore, proxy: S3Proxy, tmp_path: Path
) -> None:
    """``profile`` picks the shared-file profile; the default chain's key is refused."""
    q, _ = published(store)
    key_id, secret = iam_reader(moto, f"reader-{store.bucket}", store.bucket)
    creds = tmp_path / "credentials"
    creds.write_text(f"[wpk]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
        with moto.enforce_auth():
            default_chain = S3RepositorySource(fast(proxy.endpoint_url))
            with pytest.raises(UpgradeError) as info:
                default_chain.resolve(q)
            assert info.value.code == 14 and "InvalidAccessKeyId" in info.value.detail
            src = S3RepositorySource(fast(proxy.endpoint_url, profile="wpk"))
            ref = cache_at(tmp_path).obtain(src, src.resolve(q))
    assert ref.sha1 == SHA1
    used = {
        r.headers["authorization"].split("Credential=")[1].split("/")[0] for r in proxy.requests
    }
    assert used == {ACCESS_KEY, key_id}


def test_unknown_profile_is_14() -> None:
    src = S3RepositorySource(fast("http://127.0.0.1:9", profile="no-such-profile"))
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for("s3://bkt/", "v4.2.0", "windows"))
    assert info.value.code == 14
    assert "no-such-profile" in info.value.detail


def test_secrets_never_logged(
    moto: MotoS3, store: BucketStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    q, _ = published(store)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value-0042")
        caplog.set_level(logging.DEBUG)
        src = S3RepositorySource(fast(moto.endpoint_url))
        cache_at(tmp_path).obtain(src, src.resolve(q))
        with pytest.raises(UpgradeError) as info:
            src.resolve(query_for("s3://wpk-absent-bucket-78/", "v4.2.0", "windows"))
    assert caplog.records  # botocore and we did log, at debug level
    assert "very-secret-value-0042" not in caplog.text
    assert "very-secret-value-0042" not in str(info.value)


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("s3-pki"))


def test_https_endpoint_with_ca_bundle(
    moto: MotoS3, store: BucketStore, tls: TlsFiles, tmp_path: Path
) -> None:
    q, _ = published(store)
    with S3Proxy(moto, tls) as secure:
        assert secure.endpoint_url.startswith("https://")
        trusted = S3RepositorySource(fast(secure.endpoint_url, ca_bundle=str(tls.ca_cert)))
        ref = cache_at(tmp_path).obtain(trusted, trusted.resolve(q))
        assert ref.sha1 == SHA1
        untrusted = S3RepositorySource(fast(secure.endpoint_url, retries=0))
        with pytest.raises(UpgradeError) as info:
            untrusted.resolve(q)
    assert info.value.code == 14
    assert "SSL" in info.value.detail or "certificate" in info.value.detail


# --------------------------------------------------------------------------- without boto3

_WITHOUT_BOTO3 = textwrap.dedent(
    """
    import io, json, sys

    class BlockBoto:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("boto3", "botocore"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, BlockBoto())
    from wpk_upgrade.drivers import SOURCES, driver_class
    from wpk_upgrade.errors import UpgradeError
    from wpk_upgrade.interfaces import WpkCandidate
    from wpk_upgrade.testing.source_contract import query_for

    cls = driver_class(SOURCES, "s3")
    src = cls({"endpoint_url": "http://127.0.0.1:9"})
    out = {"loaded": cls.__name__}
    try:
        src.resolve(query_for("s3://bkt/wpk/", "v4.2.0", "windows"))
    except UpgradeError as exc:
        out["resolve"] = [int(exc.code), str(exc)]
    try:
        src.fetch(WpkCandidate("s3://bkt/a.wpk", "a.wpk", None), io.BytesIO(), 0, print)
    except UpgradeError as exc:
        out["fetch"] = [int(exc.code), str(exc)]
    out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore"))
    print(json.dumps(out))
    """
)


def test_without_boto3_the_error_names_the_extra() -> None:
    """A real interpreter where boto3 cannot be imported: the driver loads, requests fail
    with 14/16 naming ``pip install 'wpk-upgrade[s3]'``."""
    proc = subprocess.run(
        [sys.executable, "-c", _WITHOUT_BOTO3], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == "S3RepositorySource"
    assert out["imported"] == []
    code, text = out["resolve"]
    assert code == 14 and "pip install 'wpk-upgrade[s3]'" in text
    code, text = out["fetch"]
    assert code == 16 and MISSING_BOTO3 in text


def test_plugins_command_lists_s3_without_boto3() -> None:
    script = (
        "import sys\n"
        "class B:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('boto3', 'botocore'):\n"
        "            raise ModuleNotFoundError(name, name=name)\n"
        "sys.meta_path.insert(0, B())\n"
        "sys.argv = ['wpk-upgrade', 'plugins']\n"
        "from wpk_upgrade.cli import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "wpk_source_s3:S3RepositorySource (wpk-upgrade)" in proc.stdout
