"""``wpk-upgrade demo``: the main job end to end on the embedded default, in a temporary folder.

It builds a lab CA and a signed WPK repository for a new agent version whose installer really
changes the version the agent reports (and restarts the agent), serves the repository over
HTTPS on loopback, issues the transport certificates (``wpk-upgrade ca``: the manager's, and
one per agent with ``CN=agent:NNN``), starts a manager and N agents as real processes at an
older version, talking over mutual TLS (with a revocation list), sends
the mission's example ``upgrade`` message, shows live per-agent status, prints the
``upgrade_result`` reply, then does the same with an ``upgrade_custom`` of a local WPK.
Exit status 0 only when every agent ends Updated on the expected version.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from . import cli_ca, pki, wpk
from .framing import request_unix

OLD_VERSION = "v4.8.0"
NEW_VERSION = "v4.9.1"
CUSTOM_VERSION = "v4.9.2"
PLATFORM = {"os_platform": "ubuntu", "os_major": "22", "os_minor": "04", "os_arch": "x86_64"}
FINAL = {"Updated", "Error", "Cancelled", "Timeout", "Legacy"}

# The installer shipped in the demo WPKs: the template of ``wpk-upgrade wpk installer-template``
# (wpk_upgrade/agent/upgrade.sh). Like the reference upgrade.sh it detaches and exits 0 at once;
# the background part installs (rewrites the agent's version file), restarts the agent (SIGHUP
# makes it re-execute itself), waits until the new process is connected, and writes
# var/upgrade/upgrade_result (0 success, 2 failure).
INSTALLER = (resources.files("wpk_upgrade.agent") / "upgrade.sh").read_text()


@dataclass
class DemoPaths:
    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def repo(self) -> Path:
        return self.root / "repo"

    @property
    def transport_ca(self) -> Path:
        return self.root / "pki" / "transport-ca"

    @property
    def manager_home(self) -> Path:
        return self.root / "manager"

    def agent_home(self, agent_id: int) -> Path:
        return self.root / "agents" / f"{agent_id:03d}"


def say(text: str = "") -> None:
    print(text, flush=True)


def build_wpk(paths: DemoPaths, signer: pki.CertFiles, version: str, out: Path) -> wpk.PackResult:
    """A WPK whose installer moves the agent to ``version``; 2 MiB of package data inside."""
    src = paths.root / "build" / version
    src.mkdir(parents=True, exist_ok=True)
    (src / "upgrade.sh").write_text(INSTALLER)
    (src / "VERSION").write_text(f"{version}\n")
    (src / f"wazuh-agent_{version[1:]}-1_amd64.deb").write_bytes(os.urandom(2 << 20))
    files = [src / "upgrade.sh", src / "VERSION", src / f"wazuh-agent_{version[1:]}-1_amd64.deb"]
    return wpk.pack(out, signer.cert, signer.key, files, installer="upgrade.sh")


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_https(root: Path, cert: pki.CertFiles) -> tuple[http.server.ThreadingHTTPServer, int]:
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert, cert.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _inline(options: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in options.items())


def write_manager_config(paths: DemoPaths, ca: pki.CaFiles, port: int) -> Path:
    home = paths.manager_home
    home.mkdir(parents=True, exist_ok=True)
    tls = cli_ca.issue_manager(paths.transport_ca, home / "tls", ["127.0.0.1", "localhost"])
    transport = {
        "listen": f"127.0.0.1:{port}",
        "heartbeat": 5.0,
        "ca": str(home / "tls" / "ca.pem"),
        "cert": str(tls.cert),
        "key": str(tls.key),
        "crl": str(paths.transport_ca / cli_ca.CRL_NAME),
    }
    config = home / "manager.toml"
    config.write_text(
        f'home = "{home}"\n'
        'node_name = "node01"\n'
        "[upgrade]\nmax_threads = 8\nchunk_size = 32768\n"
        '[task_manager]\ntask_timeout = "5m"\nsweep_interval = 5\n'
        f'[transport]\nname = "tcp"\noptions = {{ {_inline(transport)} }}\n'
        f'[sources.https]\nca_bundle = "{ca.cert}"\n'
    )
    return config


def write_agent_config(paths: DemoPaths, ca: pki.CaFiles, agent_id: int, port: int) -> Path:
    home = paths.agent_home(agent_id)
    (home / "etc").mkdir(parents=True, exist_ok=True)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    (home / "etc" / "version").write_text(f"{OLD_VERSION}\n")
    shutil.copy(ca.cert, home / "etc" / "wpk_root.pem")
    tls = cli_ca.issue_agent(paths.transport_ca, agent_id, home / "etc")
    transport = {
        "address": f"127.0.0.1:{port}",
        "heartbeat": 5.0,
        "reconnect_max": 1.0,
        "ca": str(tls.ca),
        "cert": str(tls.cert),
        "key": str(tls.key),
    }
    config = home / "etc" / "agent.toml"
    config.write_text(
        f'home = "{home}"\n'
        f'[agent]\nid = {agent_id}\nname = "demo-{agent_id:03d}"\n'
        + "".join(f'{k} = "{v}"\n' for k, v in PLATFORM.items())
        + f'[manager]\ntransport = "tcp"\noptions = {{ {_inline(transport)} }}\n'
        '[upgrade]\nenabled = true\nresult_wait = "2s"\nnotification_wait_start = "2s"\n'
        'installer_timeout = "60s"\n'
    )
    return config


def start(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    fh = log.open("ab")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)


def send(path: Path, message: dict[str, Any]) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(request_unix(str(path), json.dumps(message).encode()))
    return reply


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def connected(home: Path) -> bool:
    try:
        return "status=connected" in (home / "var" / "run" / "agent.state").read_text()
    except OSError:
        return False


def watch(task_socket: Path, agents: list[int], timeout: float) -> dict[str, Any]:
    """Poll ``upgrade_result``, printing one line per agent whenever something changes."""
    query = {
        "origin": {"module": "api"},
        "command": "upgrade_result",
        "parameters": {"agents": agents},
    }
    shown: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    reply: dict[str, Any] = {}
    while time.monotonic() < deadline:
        reply = send(task_socket, query)
        for item in reply["data"]:
            status = item.get("status", item.get("message"))
            progress = item.get("progress")
            pct = ""
            if progress and progress["total"]:
                pct = (
                    f" {100 * progress['sent'] // progress['total']:3d}% of "
                    f"{progress['total'] / 1048576:.1f} MiB"
                )
            line = f"  agent {item['agent']:03d}: {status}{pct}"
            if item.get("error_msg") and status not in ("Updated",):
                line += f" ({item['error_msg']})"
            if shown.get(item["agent"]) != line:
                shown[item["agent"]] = line
                say(line)
        if all(i.get("status") in FINAL for i in reply["data"]):
            return reply
        time.sleep(0.2)
    raise TimeoutError("the upgrade did not finish in time")


def versions_of(paths: DemoPaths, agents: list[int]) -> dict[int, str]:
    return {a: (paths.agent_home(a) / "etc" / "version").read_text().strip() for a in agents}


def announced_versions(manager_home: Path, agents: list[int]) -> dict[int, str | None]:
    """What the manager's store says each agent announced at its last connection."""
    from .config import load_manager_config
    from .daemon import open_store

    store = open_store(load_manager_config(manager_home / "manager.toml"))
    store.open()
    try:
        return {a: (info.version if (info := store.get_agent(a)) else None) for a in agents}
    finally:
        store.close()


def run_demo(agents: int = 3, keep: bool = False) -> int:
    """Run the demo; returns the exit status."""
    root = Path(tempfile.mkdtemp(prefix="wpk-upgrade-demo-"))
    paths = DemoPaths(root)
    procs: list[subprocess.Popen[bytes]] = []
    server = None
    started = time.monotonic()
    ok = False
    try:
        say(f"wpk-upgrade demo in {root}")
        say("1. lab PKI: a CA, a WPK signing certificate, a TLS certificate for the repository")
        ca = pki.create_ca(paths.pki / "ca")
        cli_ca.init_ca(paths.transport_ca)
        say(
            f"   transport CA {paths.transport_ca} (manager and agents talk over mutual TLS; "
            "each agent's certificate names it: CN=agent:NNN)"
        )
        signer = pki.issue_certificate(
            ca.cert, ca.key, paths.pki, "demo WPK signer", "code", basename="signer"
        )
        tls = pki.issue_certificate(
            ca.cert,
            ca.key,
            paths.pki,
            "localhost",
            "server",
            san=["127.0.0.1", "localhost"],
            basename="repo-tls",
        )

        say(f"2. signed WPK repository for {NEW_VERSION} (layout linux/deb/amd64, versions file)")
        directory = paths.repo / "4.x" / "wpk" / "linux" / "deb" / "amd64"
        directory.mkdir(parents=True)
        name = f"wazuh_agent_{NEW_VERSION}_linux_amd64.deb.wpk"
        packed = build_wpk(paths, signer, NEW_VERSION, directory / name)
        (directory / "versions").write_text(f"{NEW_VERSION} {packed.sha1}\nv4.9.0 {'0' * 40}\n")
        server, https_port = serve_https(paths.repo, tls)
        repo_url = f"https://127.0.0.1:{https_port}/4.x/wpk/"
        say(f"   served at {repo_url} ({packed.size} bytes, sha1 {packed.sha1})")

        transport_port = free_port()
        manager_config = write_manager_config(paths, ca, transport_port)
        python = sys.executable
        say(f"3. manager and {agents} agents as real processes (agents at {OLD_VERSION})")
        procs.append(
            start(
                [python, "-m", "wpk_upgrade.cli", "manager", "--config", str(manager_config)],
                paths.manager_home / "manager.log",
            )
        )
        upgrade_socket = paths.manager_home / "queue" / "tasks" / "upgrade"
        task_socket = paths.manager_home / "queue" / "tasks" / "task"
        wait_until(
            lambda: upgrade_socket.exists() and task_socket.exists(), 20, "the manager sockets"
        )
        ids = list(range(1, agents + 1))
        for agent_id in ids:
            config = write_agent_config(paths, ca, agent_id, transport_port)
            procs.append(
                start(
                    [python, "-m", "wpk_upgrade.cli", "agent", "--config", str(config)],
                    paths.agent_home(agent_id) / "logs" / "agent.out",
                )
            )
        wait_until(
            lambda: all(connected(paths.agent_home(a)) for a in ids), 30, "the agents to connect"
        )
        say(f"   sockets: {upgrade_socket} and {task_socket}")

        message = {
            "origin": {"module": "api"},
            "command": "upgrade",
            "parameters": {
                "agents": ids,
                "wpk_repo": repo_url,
                "version": NEW_VERSION,
                "use_http": False,
                "force_upgrade": False,
            },
        }
        say("4. the mission's example upgrade request:")
        say("   " + json.dumps(message))
        reply = send(upgrade_socket, message)
        say("   reply: " + json.dumps(reply))
        say("   live status:")
        result = watch(task_socket, ids, 120)
        say("   upgrade_result reply:")
        say(json.dumps(result, indent=2))
        first_ok = all(i.get("status") == "Updated" for i in result["data"])
        wait_until(lambda: all(connected(paths.agent_home(a)) for a in ids), 30, "reconnect")
        on_disk = versions_of(paths, ids)
        say(f"   agent versions now: {on_disk}")

        say(f"5. upgrade_custom with a local WPK ({CUSTOM_VERSION})")
        custom = paths.root / "custom" / f"agent-{CUSTOM_VERSION}.wpk"
        custom.parent.mkdir(parents=True)
        build_wpk(paths, signer, CUSTOM_VERSION, custom)
        message = {
            "origin": {"module": "api"},
            "command": "upgrade_custom",
            "parameters": {"agents": ids, "file_path": str(custom), "installer": "upgrade.sh"},
        }
        say("   " + json.dumps(message))
        say("   reply: " + json.dumps(send(upgrade_socket, message)))
        result = watch(task_socket, ids, 120)
        say("   upgrade_result reply:")
        say(json.dumps(result, indent=2))
        second_ok = all(i.get("status") == "Updated" for i in result["data"])
        wait_until(lambda: all(connected(paths.agent_home(a)) for a in ids), 30, "reconnect")
        on_disk = versions_of(paths, ids)
        announced = announced_versions(paths.manager_home, ids)
        say(f"   agent versions now: {on_disk}; announced to the manager: {announced}")
        ok = (
            first_ok
            and second_ok
            and all(v == CUSTOM_VERSION for v in on_disk.values())
            and all(v == CUSTOM_VERSION for v in announced.values())
        )
    except Exception as exc:  # noqa: BLE001 - the demo reports any failure as one line
        say(f"demo failed: {type(exc).__name__}: {exc}")
        say(f"logs are under {root}")
        keep = True
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        if server is not None:
            server.shutdown()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    say(
        f"{'SUCCESS' if ok else 'FAILURE'}: every agent Updated to {CUSTOM_VERSION}"
        if ok
        else "FAILURE: not every agent ended Updated on the new version"
    )
    say(f"demo took {elapsed:.1f} s")
    return 0 if ok else 1
