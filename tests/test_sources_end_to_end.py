"""The same upgrade from every kind of WPK source, through a real manager and a simulated agent.

One signed WPK (v4.9.1 for an Ubuntu x86_64 agent) is published four ways: a reference-layout
repository over HTTPS (loopback server, lab CA), the same tree through ``file://``, an S3
bucket (moto in server mode on loopback) and a JSON release manifest read by the third-party
example plugin ``wpk-source-manifest``. For each, a real manager node (``ManagerHarness``:
SQLite store, UNIX sockets, tcp transport, the source's ``[sources.<scheme>]`` options in its
configuration) pushes the WPK to a ``ScriptedAgent`` answering like a JSON-protocol agent; the
agent's report ends the task Updated. For S3, each repository failure shows the reference text
in ``upgrade_result`` and S3's precise reason in the task history.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from httpfixtures import RepoServer, TlsFiles, make_tls
from s3fixtures import REGION, BucketStore, MotoS3, aws_test_environment

from wpk_upgrade import pki, wpk
from wpk_upgrade.drivers import SOURCES, available
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, json_agent

VERSION = "v4.9.1"
WPK_DIR = "linux/deb/amd64/"
WPK_NAME = f"wazuh_agent_{VERSION}_linux_amd64.deb.wpk"
WRONG_SHA1 = "74691287f21a312ab2a12e31a23f21a33d242d52"
AGENT_ID = 7
DONE = {"error": 0, "message": "Upgrade was successful", "status": "Done"}

MakeHarness = Callable[..., ManagerHarness]


@dataclass(frozen=True)
class Published:
    """The lab: a signed WPK in a reference-layout tree (plus a manifest), and TLS files."""

    tree: Path
    wpk: wpk.PackResult
    tls: TlsFiles

    @property
    def data(self) -> bytes:
        return (self.tree / WPK_DIR / WPK_NAME).read_bytes()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> Published:
    root = tmp_path_factory.mktemp("sources-e2e")
    ca = pki.create_ca(root / "ca")
    signer = pki.issue_certificate(ca.cert, ca.key, root / "signer", "wpk signer", "code")
    src = root / "src"
    src.mkdir()
    (src / "upgrade.sh").write_text("#!/bin/sh\nexit 0\n")
    (src / "package.deb").write_bytes(b"package bytes\n" * 1000)
    tree = root / "tree"
    (tree / WPK_DIR).mkdir(parents=True)
    packed = wpk.pack(
        tree / WPK_DIR / WPK_NAME,
        signer.cert,
        signer.key,
        [src / "upgrade.sh", src / "package.deb"],
        installer="upgrade.sh",
    )
    shutil.rmtree(src)
    (tree / WPK_DIR / "versions").write_text(f"{VERSION} {packed.sha1}\nv4.9.0 {WRONG_SHA1}\n")
    manifest = {
        "format": 1,
        "releases": [
            {
                "version": VERSION,
                "wpks": [
                    {
                        "os": "linux",
                        "package_type": "deb",
                        "arch": "amd64",
                        "url": WPK_DIR + WPK_NAME,
                        "sha1": packed.sha1,
                        "sha256": packed.sha256,
                        "size": packed.size,
                    }
                ],
            }
        ],
    }
    (tree / "manifest.json").write_text(json.dumps(manifest))
    return Published(tree, packed, make_tls(root / "tls"))


@pytest.fixture(scope="module")
def https_server(published: Published) -> Iterator[RepoServer]:
    with RepoServer(published.tree, published.tls) as server:
        yield server


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoS3]:
    with MotoS3() as server:
        yield server


@pytest.fixture(scope="module")
def bucket(moto: MotoS3, published: Published) -> BucketStore:
    """The tree in a bucket under ``4.x/wpk/``; under ``bad/`` with a wrong SHA1 listed."""
    store = BucketStore(moto, moto.new_bucket("e2e"))
    data = published.data
    store.put(WPK_DIR + WPK_NAME, data)
    store.put(WPK_DIR + "versions", (published.tree / WPK_DIR / "versions").read_bytes())
    bad = BucketStore(moto, store.bucket, prefix="bad/")
    bad.put(WPK_DIR + WPK_NAME, data)
    bad.put(WPK_DIR + "versions", f"{VERSION} {WRONG_SHA1}\n".encode())
    return store


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    aws_test_environment(monkeypatch, tmp_path)


def s3_options(moto: MotoS3) -> dict[str, Any]:
    return {"endpoint_url": moto.endpoint_url, "region": REGION, "addressing_style": "path"}


def agent() -> AgentInfo:
    return AgentInfo(
        agent_id=AGENT_ID,
        name="agent7",
        version="Wazuh v4.8.0",
        os_platform="ubuntu",
        os_major="22",
        os_minor="04",
        os_arch="x86_64",
    )


def start_manager(make_harness: MakeHarness, sources: dict[str, Any]) -> ManagerHarness:
    return make_harness(
        upgrade={"command_timeout": 10.0, "installer_timeout": 1, "open_retry_delay": 0.01},
        sources=sources,
    )


def request_upgrade(h: ManagerHarness, repo: str, version: str = VERSION) -> None:
    reply = h.upgrade(
        {
            "command": "upgrade",
            "parameters": {"agents": [AGENT_ID], "version": version, "wpk_repo": repo},
        }
    )
    assert reply["error"] == 0 and reply["data"][0]["error"] == 0, reply


def commands(sim: ScriptedAgent) -> list[str]:
    """The commands the agent received, in order (``com`` or JSON ``upgrade`` targets)."""
    return [
        payload.split(" ", 1)[0] if target == "com" else json.loads(payload)["command"]
        for target, payload in list(sim.received)
    ]


def status(h: ManagerHarness) -> str:
    return str(h.result([AGENT_ID])[0].get("status"))


# --------------------------------------------------------------------------- one upgrade, 4 ways


@pytest.mark.parametrize(
    "kind",
    [
        "https",
        "file",
        "s3",
        "manifest",
    ],
)
def test_the_same_upgrade_from_each_source(
    kind: str,
    make_harness: MakeHarness,
    published: Published,
    https_server: RepoServer,
    moto: MotoS3,
    bucket: BucketStore,
) -> None:
    ca = {"ca_bundle": str(published.tls.ca_cert)}
    port = https_server.port
    if kind == "https":
        repo, sources = https_server.base_url, {"https": ca}
    elif kind == "file":
        repo, sources = published.tree.as_uri() + "/", {}
    elif kind == "s3":
        repo, sources = bucket.base_url, {"s3": s3_options(moto)}
    else:
        if "manifest+https" not in available(SOURCES):
            pytest.skip("wpk-source-manifest is not installed (pip install -e examples/...)")
        repo = f"manifest+https://127.0.0.1:{port}/manifest.json"
        sources = {"manifest+https": ca}
    h = start_manager(make_harness, sources)
    with ScriptedAgent(h, agent(), json_agent()) as sim:
        request_upgrade(h, repo)
        h.wait_for(lambda: "upgrade" in commands(sim) or status(h) == "Error", 30)
        item = h.result([AGENT_ID])[0]
        assert item["status"] == "Updating", item  # the installer runs; the report is awaited
        sent = commands(sim)
        assert sent[:2] == ["lock_restart", "open"] and sent[-3:] == ["close", "sha1", "upgrade"]
        opened = json.loads(next(p for t, p in sim.received if '"open"' in p))
        assert opened["parameters"]["file"] == WPK_NAME
        assert sim.report(DONE)["error"] == 0
        (final,) = h.wait_final([AGENT_ID])
    assert final["status"] == "Updated" and "error_msg" not in final
    cached = h.config.cache_dir / WPK_NAME
    assert hashlib.sha1(cached.read_bytes()).hexdigest() == published.wpk.sha1


# --------------------------------------------------------------------------- S3 failures


@pytest.mark.parametrize(
    ("case", "error_msg", "reason"),
    [
        ("bucket missing", "The repository is not reachable", "NoSuchBucket"),
        (
            "version absent",
            "The version of the WPK does not exist in the repository",
            "v4.55.55 is not listed in s3://",
        ),
        ("wrong sha1", "The WPK sha1 of the file is not valid", f"expected {WRONG_SHA1} got"),
    ],
)
def test_s3_failures_show_the_reference_error(
    case: str,
    error_msg: str,
    reason: str,
    make_harness: MakeHarness,
    moto: MotoS3,
    bucket: BucketStore,
) -> None:
    repo, version = {
        "bucket missing": ("s3://wpk-e2e-no-such-bucket/4.x/wpk/", VERSION),
        "version absent": (bucket.base_url, "v4.55.55"),
        "wrong sha1": (f"s3://{bucket.bucket}/bad/", VERSION),
    }[case]
    h = start_manager(make_harness, {"s3": s3_options(moto)})
    with ScriptedAgent(h, agent(), json_agent()) as sim:
        request_upgrade(h, repo, version)
        (item,) = h.wait_final([AGENT_ID])
        assert not [p for t, p in sim.received if '"open"' in p]  # nothing was sent
    assert (item["status"], item["error_msg"]) == ("Error", error_msg)
    history = h.store.history(int(item["task_id"]))
    assert reason in (history[-1].reason or ""), history[-1]
