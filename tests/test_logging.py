"""Manager logging (``logging_setup.py``): JSON lines with task and agent ids, one line per task
event, and no secret (API tokens, URL passwords) in any line, checked on a real manager
process driven through its HTTP API."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from wpk_upgrade.config import load_manager_config
from wpk_upgrade.daemon import open_store
from wpk_upgrade.logging_setup import (
    EVENT_LOGGER,
    JsonFormatter,
    Redactor,
    TextFormatter,
    redact_url,
)
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, json_agent

TOKEN = "tok-" + "9f8e7d6c5b4a" * 3
PASSWORD = "s3cr3t-pw"


def record(message: str, *args: Any, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("wpk_upgrade.x", logging.INFO, __file__, 1, message, args, None)
    rec.__dict__.update(extra)
    return rec


def test_redactor_masks_url_passwords_bearer_tokens_and_secrets() -> None:
    redact = Redactor([TOKEN])
    assert redact(f"GET https://op:{PASSWORD}@repo.example/wpk/ failed") == (
        "GET https://op:***@repo.example/wpk/ failed"
    )
    assert redact("s3://key:se%2Fcr!t@bucket/x") == "s3://key:***@bucket/x"
    assert redact(f"Authorization: Bearer {TOKEN}") == "Authorization: Bearer ***"
    assert redact(f"token={TOKEN}!") == "token=***!"
    assert redact("https://repo.example:8443/wpk/ and agent 005") == (
        "https://repo.example:8443/wpk/ and agent 005"
    )
    assert redact_url(f"https://u:{PASSWORD}@h/") == "https://u:***@h/"


def test_json_formatter_lines() -> None:
    fmt = JsonFormatter(Redactor([TOKEN]))
    line = json.loads(fmt.format(record("task %d agent %03d: %s", 12, 5, "Updated")))
    assert line["message"] == "task 12 agent 005: Updated"
    assert (line["task_id"], line["agent_id"], line["level"]) == (12, 5, "INFO")
    assert line["logger"] == "wpk_upgrade.x" and line["time"].endswith("Z")
    # Extras win over the text; the kernel's "Agent '7'" style is understood too.
    line = json.loads(fmt.format(record("agent 9", task_id=3, agent_id=4)))
    assert (line["task_id"], line["agent_id"]) == (3, 4)
    line = json.loads(fmt.format(record("Received upgrade notification from agent '7'.")))
    assert line["agent_id"] == 7 and "task_id" not in line
    try:
        raise ValueError(f"https://a:{PASSWORD}@b/ {TOKEN}")
    except ValueError:
        rec = record("boom")
        rec.exc_info = sys.exc_info()
    text = fmt.format(rec)
    assert PASSWORD not in text and TOKEN not in text and "ValueError" in text
    plain = TextFormatter(Redactor([TOKEN])).format(record("x %s", f"Bearer {TOKEN}"))
    assert plain.endswith("INFO wpk_upgrade.x: x Bearer ***")


def test_one_event_line_per_transition(
    harness: ManagerHarness, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wpk_file = tmp_path / "a.wpk"
    wpk_file.write_bytes(b"x" * 3000)
    info = AgentInfo(
        agent_id=5,
        version="Wazuh v4.8.0",
        os_platform="ubuntu",
        os_major="22",
        os_minor="04",
        os_arch="x86_64",
    )
    caplog.set_level(logging.INFO, logger=EVENT_LOGGER)
    with ScriptedAgent(harness, info, json_agent()) as a:
        harness.upgrade(
            {"command": "upgrade_custom", "parameters": {"agents": [5], "file_path": str(wpk_file)}}
        )
        harness.wait_for(lambda: any('"upgrade"' in p for _, p in list(a.received)))
        a.report({"error": 0, "message": "Upgrade was successful", "status": "Done"})
        harness.wait_final([5])
    events = [r for r in caplog.records if r.name == EVENT_LOGGER]
    assert [r.getMessage().split(": ", 1)[1].split(" [")[0] for r in events] == [
        "created -> In queue",
        "In queue -> Updating",
        "WPK delivered (3000 bytes)",
        "Updating -> Updated",
    ]
    assert {(r.task_id, r.agent_id) for r in events} == {(1, 5)}  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- a real process


def wait_line(path: Path, pattern: str, timeout: float = 20) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                found = re.search(pattern, json.loads(line)["message"])
                if found:
                    return found
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r}")


def call(port: int, path: str, header: str | None) -> dict[str, Any]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="PUT")
    if path.startswith("/agents/upgrade_result"):
        request.method = "GET"
    if header:
        request.add_header("Authorization", header)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            body: dict[str, Any] = json.loads(reply.read())
            return body
    except urllib.error.HTTPError as exc:
        return {"status": exc.code}


def test_manager_process_logs_json_without_secrets(tmp_path: Path) -> None:
    home = tmp_path / "home"
    config = tmp_path / "manager.toml"
    config.write_text(
        f'home = "{home}"\n'
        '[transport.options]\nlisten = "127.0.0.1:0"\n'
        f'[api]\nenabled = true\nlisten = "127.0.0.1:0"\ntokens = ["{TOKEN}"]\n'
        '[logging]\nformat = "json"\nfile = "logs/manager.log"\nlevel = "DEBUG"\n'
        "[sources.https]\nretries = 0\ntimeout = 2\n"
    )
    log_file = home / "logs" / "manager.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wpk_upgrade.cli", "manager", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port = int(wait_line(log_file, r"api listening on http://127\.0\.0\.1:(\d+)").group(1))
        store = open_store(load_manager_config(config))  # the agent registry, as global.db
        store.open()
        store.upsert_agent(
            AgentInfo(
                agent_id=5,
                version="Wazuh v4.8.0",
                os_platform="ubuntu",
                os_major="22",
                os_minor="04",
                os_arch="x86_64",
                connection_status="active",
                node="node01",
            )
        )
        store.close()
        assert call(port, "/agents/upgrade_result", f"Bearer {TOKEN}x") == {"status": 401}
        repo = quote(f"https://operator:{PASSWORD}@127.0.0.1:1/wpk/", safe="")
        body = call(
            port,
            f"/agents/upgrade?agents_list=5&upgrade_version=v4.9.1&wpk_repo={repo}",
            f"Bearer {TOKEN}",
        )
        assert body["message"] == "All upgrade tasks were created", body
        wait_line(log_file, r"Updating -> Error \(The repository is not reachable\)")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0
    lines = log_file.read_text().splitlines()
    assert stderr.splitlines()[-len(lines) :] == lines  # the same lines on stderr
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    text = "\n".join(lines)
    assert PASSWORD not in text and TOKEN not in text
    assert "operator:***@127.0.0.1:1" in text
    events = [e for e in entries if e["logger"] == EVENT_LOGGER]
    assert [e["message"].split(": ", 1)[1].split(" [")[0] for e in events] == [
        "created -> In queue",
        "In queue -> Updating",
        "Updating -> Error (The repository is not reachable)",
    ]
    assert all((e["task_id"], e["agent_id"]) == (1, 5) for e in events)
    access = [e["message"] for e in entries if e["logger"] == "wpk_upgrade.api.access"]
    assert any(" PUT /agents/upgrade 200 " in m for m in access)
    assert any(" GET /agents/upgrade_result 401 " in m for m in access)
    assert not any("?" in m for m in access)  # never the query string
