"""Parsing of the upgrade and task socket requests: reference texts and robustness."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shared_cases import case

from wpk_upgrade.protocol import (
    RequestRejected,
    parse_task_request,
    parse_upgrade_request,
)

A_RESPONSE_CASES = ["C001", "C003", "C004", "C005", "C006", "C007", "C008", "C009", "C010"]


def _input_bytes(c: dict[str, Any]) -> bytes:
    inp = c["input"]
    return inp["raw"].encode() if "raw" in inp else json.dumps(inp["message"]).encode()


@pytest.mark.parametrize("case_id", A_RESPONSE_CASES)
def test_upgrade_parsing_cases(case_id: str) -> None:
    c = case(case_id)
    with pytest.raises(RequestRejected) as exc:
        parse_upgrade_request(_input_bytes(c))
    assert exc.value.reply == c["expected"]["response"]


def test_parameter_defaults_c014() -> None:
    c = case("C014")
    req = parse_upgrade_request(_input_bytes(c))
    parsed = c["expected"]["parsed"]
    assert list(req.agents) == parsed["agents"]
    for key in ("wpk_repo", "version", "package_type"):
        assert req.params.get(key) == parsed[key]
    assert req.params.get("use_http", False) is parsed["use_http"]
    assert req.params.get("force_upgrade", False) is parsed["force_upgrade"]
    full = {
        "command": "upgrade",
        "parameters": {
            "agents": [1],
            "wpk_repo": "wazuh.com",
            "version": "v4.0.0",
            "use_http": False,
            "force_upgrade": True,
            "extra": 1,
        },
    }
    req = parse_upgrade_request(json.dumps(full).encode())
    assert req.params == {
        "wpk_repo": "wazuh.com",
        "version": "v4.0.0",
        "use_http": False,
        "force_upgrade": True,
    }


@pytest.mark.parametrize(
    "message",
    [
        {"command": 5, "parameters": {"agents": [1]}},
        {"command": "upgrade", "parameters": []},
        {"command": "upgrade", "parameters": {}},
        {"command": "upgrade", "parameters": {"agents": 1}},
        [1, 2],
    ],
)
def test_required_parameters_c003_variants(message: Any) -> None:
    with pytest.raises(RequestRejected) as exc:
        parse_upgrade_request(json.dumps(message).encode())
    assert exc.value.reply["error"] == 2


@pytest.mark.parametrize("agents", [[1, "15", 24], [True], [1.5], [-1], [2**40]])
def test_agent_ids_must_be_integers(agents: list[Any]) -> None:
    msg = {"command": "upgrade_custom", "parameters": {"agents": agents}}
    with pytest.raises(RequestRejected) as exc:
        parse_upgrade_request(json.dumps(msg).encode())
    assert exc.value.reply["data"] == [{"error": 3, "message": "Agent id not recognized"}]


def test_package_type_value_and_origin() -> None:
    msg = {"command": "upgrade", "parameters": {"agents": [1], "package_type": "msi"}}
    with pytest.raises(RequestRejected) as exc:
        parse_upgrade_request(json.dumps(msg).encode())
    assert exc.value.reply["data"][0]["message"] == (
        'Invalid parameter "package_type", value should be "rpm" or "deb"'
    )
    msg = {"origin": {"module": "cluster"}, "command": "upgrade", "parameters": {"agents": [1]}}
    with pytest.raises(RequestRejected) as exc:
        parse_upgrade_request(json.dumps(msg).encode())
    assert exc.value.reply["error"] == 3
    ok = {"origin": {"module": "api"}, "command": "upgrade_result", "parameters": {"agents": [1]}}
    assert parse_upgrade_request(json.dumps(ok).encode()).command == "upgrade_result"


def test_invalid_utf8_is_a_parse_error() -> None:
    with pytest.raises(RequestRejected) as exc:
        parse_upgrade_request(b'{"command":"\xff"}')
    assert exc.value.reply["error"] == 1
    with pytest.raises(RequestRejected) as exc:
        parse_task_request(b"\xff\xfe")
    assert exc.value.reply["error"] == 1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
keys = st.sampled_from(
    [
        "origin",
        "command",
        "parameters",
        "agents",
        "name",
        "module",
        "status",
        "wpk_repo",
        "version",
        "use_http",
        "force_upgrade",
        "package_type",
        "file_path",
        "installer",
        "error",
        "message",
        "error_msg",
    ]
)
commands = st.sampled_from(
    [
        "upgrade",
        "upgrade_custom",
        "upgrade_result",
        "upgrade_update_status",
        "upgrade_get_status",
        "upgrade_cancel_tasks",
        "x",
    ]
)
messages = st.fixed_dictionaries(
    {
        "command": commands | json_values,
        "parameters": st.dictionaries(keys, json_values | st.lists(st.integers()), max_size=6)
        | json_values,
        "origin": st.dictionaries(keys, json_values | st.text(), max_size=3) | json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | messages.map(lambda m: json.dumps(m).encode()))
def test_parsers_never_crash(raw: bytes) -> None:
    for parse in (parse_upgrade_request, parse_task_request):
        try:
            parse(raw)
        except RequestRejected as rej:
            assert set(rej.reply) == {"error", "data", "message"}
            assert rej.reply["error"] > 0
