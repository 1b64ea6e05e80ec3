"""A real S3 endpoint on loopback for the S3 source tests: moto in server mode, no mocks.

* ``MotoS3``: ``moto.server.ThreadedMotoServer`` on 127.0.0.1 (free port), spoken to over real
  HTTP; ``admin()`` is a boto3 client to set buckets up, ``new_bucket()`` makes a fresh one,
  ``enforce_auth()`` turns moto's IAM authorization on (so missing permissions are a real
  ``AccessDenied``).
* ``BucketStore``: the contract suite's ``RepoStore`` on a bucket and prefix (``PutObject``).
* ``S3Proxy``: a recording reverse proxy in front of moto (optionally over TLS): counts what the
  source really asked (``GetObject`` of a key, ``Range``, ``If-Match``) and can cut the first
  N WPK bodies half-way, delay them, or run a hook at the cut (a
  ``wpk_upgrade.testing.loopback.LoopbackServer``).
* ``aws_test_environment``: hermetic AWS settings (test credentials, no shared files, no
  instance metadata, no proxies for loopback).

Imported by the test modules (not collected: no ``test_`` prefix).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from httpfixtures import TlsFiles

from wpk_upgrade.testing.loopback import LoopbackHandler, LoopbackHTTPServer, LoopbackServer, Seen
from wpk_upgrade.testing.source_contract import RepoStore

REGION = "us-east-1"
ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret"  # moto accepts any key while its authorization is off


def aws_test_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point boto3's standard credential chain at test credentials and nothing else."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


class MotoS3:
    """moto's S3 (and IAM) in server mode on 127.0.0.1; a context manager."""

    def __init__(self) -> None:
        self._server: Any = None
        self._clients: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.endpoint_url = ""

    def __enter__(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def port(self) -> int:
        return int(urlsplit(self.endpoint_url).port or 0)

    def admin(self, service: str = "s3") -> Any:
        """A boto3 client with explicit test credentials (independent of the environment),
        made once per service (boto3 clients are thread-safe)."""
        import boto3

        with self._lock:
            if service not in self._clients:
                self._clients[service] = boto3.session.Session(
                    aws_access_key_id=ACCESS_KEY,
                    aws_secret_access_key=SECRET_KEY,
                    region_name=REGION,
                ).client(service, endpoint_url=self.endpoint_url)
            return self._clients[service]

    def new_bucket(self, prefix: str = "wpk") -> str:
        """A fresh, empty bucket."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.admin().create_bucket(Bucket=name)
        return name

    def _set_auth(self, value: str) -> None:
        req = urllib.request.Request(
            self.endpoint_url + "/moto-api/reset-auth",
            data=value.encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            resp.read()

    @contextlib.contextmanager
    def enforce_auth(self) -> Iterator[None]:
        """IAM authorization on for every request inside the block (moto's reset-auth)."""
        self._set_auth("0")
        try:
            yield
        finally:
            self._set_auth("inf")


class BucketStore(RepoStore):
    """A ``RepoStore`` on ``s3://bucket/prefix`` (objects written with boto3 ``PutObject``)."""

    def __init__(self, moto: MotoS3, bucket: str, prefix: str = "4.x/wpk/") -> None:
        self.client = moto.admin()
        self.bucket = bucket
        self.prefix = prefix
        self.base_url = f"s3://{bucket}/{prefix}"

    def put(self, rel_path: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self.prefix + rel_path, Body=data)

    def delete(self, rel_path: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + rel_path)


# --------------------------------------------------------------------------- recording proxy


@dataclass
class ProxyBehaviour:
    """How an ``S3Proxy`` misbehaves; counters decrease as they are used."""

    cut_first: int = 0  # first N GETs of *.wpk keys stop after half the body
    on_cut: Callable[[], None] | None = None  # run after a cut, before the client resumes
    body_delay: float = 0.0  # sleep before relaying a *.wpk body (to overlap clients)
    stall_first: int = 0  # first N requests sleep stall_seconds before being relayed
    stall_seconds: float = 0.0
    seen: list[Seen] = field(default_factory=list)


_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "te"}


class _Handler(LoopbackHandler):
    server: LoopbackHTTPServer[S3Proxy]

    def do_GET(self) -> None:
        self._relay()

    def do_HEAD(self) -> None:
        self._relay()

    def do_PUT(self) -> None:
        self._relay()

    def _relay(self) -> None:
        proxy = self.server.owner
        b = proxy.behaviour
        path = unquote(urlsplit(self.path).path)
        is_wpk_get = self.command == "GET" and path.endswith(".wpk")
        with proxy.lock:
            b.seen.append(Seen(self.command, path, self.lower_headers()))
            stall = b.stall_first > 0
            if stall:
                b.stall_first -= 1
            cut = is_wpk_get and b.cut_first > 0
            if cut:
                b.cut_first -= 1
        if stall:
            time.sleep(b.stall_seconds)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.moto.port, timeout=30)
        try:
            forwarded = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            upstream.request(self.command, self.path, body=body, headers=forwarded)
            resp = upstream.getresponse()
            data = resp.read()
            self.send_response(resp.status, resp.reason)
            for k, v in resp.getheaders():
                if k.lower() not in _HOP and k.lower() != "content-length":
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
        finally:
            upstream.close()
        if self.command == "HEAD":
            return
        if is_wpk_get and b.body_delay:
            time.sleep(b.body_delay)
        if cut and resp.status < 300:
            self.send_cut(data)
            if b.on_cut is not None:
                b.on_cut()
            return
        self.wfile.write(data)


class S3Proxy(LoopbackServer):
    """A recording reverse proxy to ``moto`` on 127.0.0.1 (HTTPS with ``tls``)."""

    def __init__(self, moto: MotoS3, tls: TlsFiles | None = None) -> None:
        chain = None if tls is None else (tls.server_cert, tls.server_key)
        super().__init__(_Handler, cert_chain=chain)
        self.moto = moto
        self.tls = tls
        self.behaviour = ProxyBehaviour()

    @property
    def endpoint_url(self) -> str:
        return self.url

    @property
    def requests(self) -> list[Seen]:
        """Every request relayed since this proxy was made (kept in ``behaviour.seen``)."""
        assert self.running, "the proxy is not started"
        with self.lock:
            return list(self.behaviour.seen)

    def gets(self, bucket: str, key_suffix: str) -> list[Seen]:
        """``GetObject`` requests (path-style) for keys of ``bucket`` ending in ``key_suffix``."""
        return [
            r
            for r in self.requests
            if r.method == "GET"
            and r.path.startswith(f"/{bucket}/")
            and r.path.endswith(key_suffix)
        ]


def iam_reader(moto: MotoS3, user: str, bucket: str | None) -> tuple[str, str]:
    """An IAM user's access key pair; with ``bucket``, it may ``GetObject`` in that bucket."""
    iam = moto.admin("iam")
    iam.create_user(UserName=user)
    if bucket is not None:
        policy = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["s3:GetObject"],
                    "Resource": [f"arn:aws:s3:::{bucket}/*"],
                }
            ],
        }
        iam.put_user_policy(UserName=user, PolicyName="read-wpk", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]
