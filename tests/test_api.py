"""The HTTP API (``api.py``) over real HTTP: a manager node serving it, ``urllib`` as client,
and schemathesis checking the server against its own OpenAPI document."""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from httpfixtures import closed_port, make_tls
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from wpk_upgrade.api import openapi_document
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.testing.harness import ManagerHarness, ScriptedAgent, json_agent, manager_config

TOKEN = "api-token-0123456789abcdef"
DONE = {"error": 0, "message": "Upgrade was successful", "status": "Done"}


def api_config(**extra: Any) -> dict[str, Any]:
    return {"enabled": True, "listen": "127.0.0.1:0", "tokens": [TOKEN], **extra}


class Api:
    """A tiny client of one running API."""

    def __init__(self, base: str, context: ssl.SSLContext | None = None) -> None:
        self.base = base
        self.context = context

    def call(
        self, method: str, path: str, token: str | None = TOKEN, header: str | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        request = urllib.request.Request(self.base + path, method=method)
        if header is not None:
            request.add_header("Authorization", header)
        elif token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as reply:
                return reply.status, json.loads(reply.read()), dict(reply.headers)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read()), dict(exc.headers)


def api_of(h: ManagerHarness, scheme: str = "http", **kwargs: Any) -> Api:
    assert h.manager is not None
    (server,) = [w for w in h.manager.web if w.name == "api"]
    return Api(f"{scheme}://127.0.0.1:{server.port}", **kwargs)


def agent(agent_id: int, version: str = "Wazuh v4.8.0") -> AgentInfo:
    return AgentInfo(
        agent_id=agent_id,
        name=f"a{agent_id}",
        version=version,
        os_platform="ubuntu",
        os_major="22",
        os_minor="04",
        os_arch="x86_64",
    )


@pytest.fixture
def node(make_harness: Callable[..., ManagerHarness]) -> ManagerHarness:
    return make_harness(api=api_config(), manager_version="v4.9.1")


@pytest.fixture
def agents(node: ManagerHarness) -> Iterator[Callable[..., ScriptedAgent]]:
    started: list[ScriptedAgent] = []

    def start(info: AgentInfo, script: Any = None) -> ScriptedAgent:
        a = ScriptedAgent(node, info, script or json_agent())
        a.start()
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


def failed(body: dict[str, Any]) -> list[tuple[int, str, list[str]]]:
    return [(f["error"]["code"], f["error"]["message"], f["id"]) for f in body["failed_items"]]


# --------------------------------------------------------------------------- reference endpoints


def test_upgrade_custom_result_and_tasks(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], tmp_path: Path
) -> None:
    api = api_of(node)
    a5 = agents(agent(5))
    agents(agent(6), json_agent(stall_at="sha1"))  # cancellable: its installer never starts
    node.seed_agent(AgentInfo(agent_id=9, connection_status="disconnected"))
    wpk_file = tmp_path / "agent.wpk"
    wpk_file.write_bytes(b"W" * 5000)
    path = f"/agents/upgrade_custom?agents_list=000,5,6,7,9&file_path={quote(str(wpk_file))}"
    status, body, _ = api.call("PUT", path)
    assert status == 200
    assert body["message"] == "Some upgrade tasks were not created" and body["error"] == 1
    data = body["data"]
    assert [i["agent"] for i in data["affected_items"]] == ["005", "006"]
    assert data["total_affected_items"] == 2 and data["total_failed_items"] == 3
    assert failed(data) == [
        (1703, "Action not available for Manager (agent 000)", ["000"]),
        (1701, "Agent does not exist", ["007"]),
        (1707, "Cannot send request, agent is not active", ["009"]),
    ]
    status, body, _ = api.call("PUT", f"/agents/upgrade_custom?agents_list=5&file_path={wpk_file}")
    assert (body["error"], body["message"]) == (2, "No upgrade task was created")
    assert failed(body["data"]) == [
        (1820, "Upgrade procedure could not start. Agent already upgrading", ["005"])
    ]
    node.wait_for(lambda: any('"upgrade"' in p for _, p in list(a5.received)))
    a5.report(DONE)
    node.wait_for(lambda: node.result([5])[0]["status"] == "Updated")
    status, body, _ = api.call("GET", "/agents/upgrade_result?agents_list=5,8")
    assert status == 200 and body["message"] == "Some upgrade tasks were not returned"
    (item,) = body["data"]["affected_items"]
    assert item["agent"] == "005" and item["status"] == "Updated"
    assert item["command"] == "upgrade_custom" and item["module"] == "upgrade_module"
    assert item["create_time"].endswith("Z") and "T" in item["update_time"]
    assert item["progress"] == {"sent": 5000, "total": 5000}
    assert failed(body["data"]) == [(1701, "Agent does not exist", ["008"])]
    # Without agents_list: every agent the manager knows.
    _, body, _ = api.call("GET", "/agents/upgrade_result")
    assert [i["agent"] for i in body["data"]["affected_items"]] == ["005", "006"]
    assert failed(body["data"]) == [(1813, "No task in DB", ["009"])]
    # The task listing with its filters.
    _, body, _ = api.call("GET", "/tasks?status=Updated")
    assert [(t["agent"], t["status"]) for t in body["data"]["affected_items"]] == [
        ("005", "Updated")
    ]
    assert body["message"] == "All specified task's status were returned"
    _, body, _ = api.call("GET", "/tasks?agents_list=6&limit=1")
    assert [t["agent"] for t in body["data"]["affected_items"]] == ["006"]
    _, body, _ = api.call("GET", "/tasks?since=4102444800")
    assert body["data"]["affected_items"] == [] and body["message"] == "No status was returned"
    # Cancel: agent 6 is still Updating, agent 5 is final.
    _, body, _ = api.call("PUT", "/agents/upgrade_cancel?agents_list=5,6")
    assert [i["agent"] for i in body["data"]["affected_items"]] == ["006"]
    assert failed(body["data"]) == [(1813, "No task in DB", ["005"])]
    assert body["message"] == "Some upgrade tasks were not cancelled"


def test_upgrade_cancel_refuses_a_task_whose_installer_started(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent], tmp_path: Path
) -> None:
    """Once the agent was sent ``upgrade`` the task cannot be cancelled (failed item 1818)
    and the agent's report is still recorded."""
    api = api_of(node)
    a5 = agents(agent(5))
    # the API's pre-filter reads the store, which records the connection asynchronously
    node.wait_for(lambda: (known := node.store.get_agent(5)) is not None and known.active)
    wpk_file = tmp_path / "agent.wpk"
    wpk_file.write_bytes(b"W" * 5000)
    _, body, _ = api.call("PUT", f"/agents/upgrade_custom?agents_list=5&file_path={wpk_file}")
    assert body["error"] == 0, body
    node.wait_for(lambda: any('"upgrade"' in p for _, p in list(a5.received)))
    _, body, _ = api.call("PUT", "/agents/upgrade_cancel?agents_list=5")
    assert (body["error"], body["message"]) == (2, "No upgrade task was cancelled")
    refused = "Task is already being installed, cannot be cancelled"
    assert failed(body["data"]) == [(1818, refused, ["005"])]
    assert a5.report(DONE)["data"][0]["error"] == 0
    node.wait_for(lambda: node.result([5])[0]["status"] == "Updated")


def test_upgrade_maps_module_codes_to_1810_plus_code(
    node: ManagerHarness, agents: Callable[..., ScriptedAgent]
) -> None:
    """Codes 12 and 13 are failed items 1822/1823 (13 does not abort the request here)."""
    api = api_of(node)
    agents(agent(5, "Wazuh v4.9.1"))
    agents(agent(6))
    agents(agent(7, "Wazuh v4.8.0"), json_agent(stall_at="open"))
    status, body, _ = api.call("PUT", "/agents/upgrade?agents_list=5,6&upgrade_version=4.9.1")
    assert status == 200
    assert failed(body["data"]) == [(1822, "Current agent version is greater or equal", ["005"])]
    assert body["data"]["affected_items"][0]["agent"] == "006"
    _, body, _ = api.call("PUT", "/agents/upgrade?agents_list=7&upgrade_version=wazuh%20v4.10.0")
    assert failed(body["data"]) == [
        (
            1823,
            "Upgrading an agent to a version higher than the manager requires the force flag",
            ["007"],
        )
    ]
    _, body, _ = api.call(
        "PUT",
        "/agents/upgrade?agents_list=7&upgrade_version=v4.10.0&force=true&use_http=false"
        "&package_type=deb&wpk_repo=127.0.0.1:1/wpk/&wait_for_complete=true&pretty=false",
    )
    assert body["message"] == "All upgrade tasks were created" and body["error"] == 0


@pytest.mark.parametrize(
    "path,detail",
    [
        ("/agents/upgrade", "parameter 'agents_list' is required"),
        ("/agents/upgrade?agents_list=5,x", "'agents_list' item 'x'"),
        ("/agents/upgrade?agents_list=5&upgrade_version=latest", "'upgrade_version'"),
        ("/agents/upgrade?agents_list=5&force=yes", "parameter 'force' must be true or false"),
        ("/agents/upgrade?agents_list=5&package_type=msi", "'package_type' must be rpm or deb"),
        ("/agents/upgrade?agents_list=5&q=id=5", "unknown query parameter(s): q"),
        ("/agents/upgrade?agents_list=5&agents_list=6", "given more than once"),
        ("/agents/upgrade_custom?agents_list=5", "parameter 'file_path' is required"),
        ("/agents/upgrade_custom?agents_list=5&file_path=/x&installer=a;b", "'installer'"),
        ("/tasks?status=Done", "'status' 'Done' is not one of"),
        ("/tasks?limit=-1", "parameter 'limit' must be an integer"),
    ],
)
def test_bad_parameters_are_400(node: ManagerHarness, path: str, detail: str) -> None:
    method = "GET" if path.startswith("/tasks") else "PUT"
    status, body, _ = api_of(node).call(method, path)
    assert status == 400 and body["title"] == "Bad Request"
    assert detail in body["detail"]


def test_authentication(node: ManagerHarness) -> None:
    api = api_of(node)
    for token, header in [(None, None), ("wrong-token", None), (None, f"Basic {TOKEN}")]:
        status, body, headers = api.call("GET", "/tasks", token=token, header=header)
        assert status == 401 and body["title"] == "Unauthorized"
        assert headers["WWW-Authenticate"] == "Bearer"
    assert api.call("GET", "/tasks", header=f"bearer {TOKEN}")[0] == 200
    status, body, _ = api.call("GET", "/openapi.json", token=None)
    assert status == 200 and body == openapi_document()
    assert api.call("GET", "/nowhere")[0] == 404
    status, body, headers = api.call("DELETE", "/tasks")
    assert status == 405 and "GET" in headers["Allow"]


def test_tls(make_harness: Callable[..., ManagerHarness], tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    h = make_harness(api=api_config(cert=str(tls.server_cert), key=str(tls.server_key)))
    context = ssl.create_default_context(cafile=str(tls.ca_cert))
    status, body, _ = api_of(h, "https", context=context).call("GET", "/tasks")
    assert status == 200 and body["error"] == 0
    with pytest.raises((OSError, http.client.HTTPException)):  # plain HTTP is not served
        api_of(h, "http").call("GET", "/tasks")


# --------------------------------------------------------------------------- schemathesis


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A served API and its own document as loaded by schemathesis. One active agent (not
    connected) so that requests reach the upgrade module; every WPK fetch fails at once (a
    closed proxy port) and custom files are confined to an empty directory: nothing leaves
    the machine."""
    root = tmp_path_factory.mktemp("schemathesis")
    allowed = root / "wpks"
    allowed.mkdir()
    dead = {"proxy": f"http://127.0.0.1:{closed_port()}", "retries": 0, "timeout": 1}
    config = manager_config(
        root / "home",
        api=api_config(),
        upgrade={"command_timeout": 1, "wpk_repository": "https://127.0.0.1:1/wpk/"},
        sources={"https": dead, "http": dead, "custom": {"allowed_dirs": [str(allowed)]}},
    )
    with ManagerHarness(config) as h:
        h.seed_agent(AgentInfo(**{**agent(5).__dict__, "connection_status": "active"}))
        base = api_of(h).base
        loaded = schemathesis.openapi.from_url(f"{base}/openapi.json")
        loaded.config.update(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"})
        yield loaded


OPERATIONS = [
    (path, method.upper()) for path, item in openapi_document()["paths"].items() for method in item
]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("path,method", OPERATIONS)
def test_the_api_conforms_to_its_openapi_document(
    live: Any, path: str, method: str, mode: GenerationMode
) -> None:
    """Generated requests (valid ones, then invalid ones) never get a 5xx, invalid ones are
    refused, and every response conforms to the document (status, content type, schema)."""
    operation = live[path][method]
    if mode is GenerationMode.NEGATIVE and not operation.query:
        pytest.skip("no parameter to get wrong")

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=20,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        case.call_and_validate()

    check()
