"""Wire messages of the ``tcp`` transport.

Every message is one frame (4-byte little-endian length, as on the reference sockets) holding
a JSON object with a ``type``:

=============  ===========  ===========================================================
type           direction    fields
=============  ===========  ===========================================================
hello          agent → mgr  ``agent``: id, name, version, os_platform, os_major, os_minor,
                            os_arch (announced at every connection)
welcome        mgr → agent  ``node``: the manager node name
refused        mgr → agent  ``reason``
request        mgr → agent  ``id``, ``target`` (``upgrade`` or ``com``), ``payload`` (the
                            reference command text, §7.2/§7.3)
response       agent → mgr  ``id``, ``payload`` (the reference reply text)
event          agent → mgr  ``id``, ``message`` (``upgrade_update_status`` report)
event_reply    mgr → agent  ``id``, ``reply``
ping / pong    both         heartbeat
=============  ===========  ===========================================================
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from wpk_upgrade.errors import ProtocolError
from wpk_upgrade.framing import encode, read_frame
from wpk_upgrade.models import AgentInfo

HELLO_FIELDS = ("name", "version", "os_platform", "os_major", "os_minor", "os_arch")


def pack(message: dict[str, Any]) -> bytes:
    """One framed message."""
    return encode(json.dumps(message, separators=(",", ":")).encode())


async def receive(reader: asyncio.StreamReader, limit: int) -> dict[str, Any]:
    """Read one message; ``ProtocolError`` when it is not a JSON object with a type."""
    raw = await read_frame(reader, limit)
    try:
        msg = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("message is not an object with a type")
    return msg


def hello(info: AgentInfo) -> dict[str, Any]:
    """The agent's announcement."""
    agent: dict[str, Any] = {"id": info.agent_id}
    for name in HELLO_FIELDS:
        agent[name] = getattr(info, name)
    return {"type": "hello", "agent": agent}


def parse_hello(msg: dict[str, Any]) -> AgentInfo:
    """``AgentInfo`` of a hello message; ``ProtocolError`` when malformed."""
    if msg.get("type") != "hello" or not isinstance(msg.get("agent"), dict):
        raise ProtocolError("expected a hello message")
    agent = msg["agent"]
    agent_id = agent.get("id")
    if isinstance(agent_id, bool) or not isinstance(agent_id, int) or not 0 < agent_id < 2**31:
        raise ProtocolError(f"invalid agent id {agent_id!r}")
    values: dict[str, Any] = {}
    for name in HELLO_FIELDS:
        value = agent.get(name)
        if value is not None and not isinstance(value, str):
            raise ProtocolError(f"hello field {name} must be a string")
        if value is not None and len(value) > 255:
            raise ProtocolError(f"hello field {name} is too long")
        values[name] = value
    values["name"] = values["name"] or ""
    return AgentInfo(agent_id=agent_id, connection_status="active", **values)
