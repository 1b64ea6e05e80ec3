"""Wire messages of the ``tcp`` transport.

Every message is one frame (4-byte little-endian length, as on the reference sockets) holding
a JSON object with a ``type``:

=============  ===========  ===========================================================
type           direction    fields
=============  ===========  ===========================================================
hello          agent → mgr  ``agent``: id, name, version, os_platform, os_major, os_minor,
                            os_arch (announced at every connection); ``features``: the
                            protocol extensions the agent understands (see below);
                            ``heartbeat``: its ping interval (the manager waits three
                            of the longer of its own and this before dropping it)
welcome        mgr → agent  (nothing else)
refused        mgr → agent  ``reason``
request        mgr → agent  ``id``, ``target`` (``upgrade`` or ``com``), ``payload`` (the
                            reference command text, §7.2/§7.3); optionally ``bin``
response       agent → mgr  ``id``, ``payload`` (the reference reply text)
event          agent → mgr  ``id``, ``message`` (``upgrade_update_status`` report)
event_reply    mgr → agent  ``id``, ``reply``
ping / pong    both         heartbeat
=============  ===========  ===========================================================

Features an agent may announce in its hello (absent from older agents and simulators):

* ``bin`` (the transport itself): a request may carry its base64 ``buffer`` as raw bytes.
  The manager cuts the base64 text out of the payload, sends the request with ``bin`` = the
  character position it was cut from, and the raw bytes in the next frame; the agent's
  transport splices the (canonical) base64 text back in, so the command handler receives the
  very payload the manager built, while a third fewer bytes cross the network.
* ``offset``, ``resume``, ``sha256`` (the command handler, ``CommandHandler.features``):
  ``write`` with an ``offset``, ``open`` with ``"mode":"resume"``, the ``sha256`` command; the
  manager uses its windowed, resumable transfer only with agents announcing all three
  (``wpk_upgrade.transfer``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from typing import Any

from wpk_upgrade.errors import ProtocolError
from wpk_upgrade.framing import encode, read_frame
from wpk_upgrade.models import AgentInfo
from wpk_upgrade.untrusted import clip, loads

HELLO_FIELDS = ("name", "version", "os_platform", "os_major", "os_minor", "os_arch")
#: Features the transport itself provides (on top of those of the command handler).
TRANSPORT_FEATURES = ("bin",)
#: Base64 buffers shorter than this travel inside the JSON (not worth a second frame).
BIN_MIN = 2048
_BUFFER_KEY = '"buffer":"'
MAX_FEATURES = 32
MAX_HEARTBEAT = 3600.0


def pack(message: dict[str, Any]) -> bytes:
    """One framed message."""
    return encode(json.dumps(message, separators=(",", ":")).encode())


async def receive(reader: asyncio.StreamReader, limit: int) -> dict[str, Any]:
    """Read one message; ``ProtocolError`` when it is not a JSON object with a type."""
    raw = await read_frame(reader, limit)
    try:
        msg = loads(raw, nul=True)  # legacy payloads carry raw bytes, NUL included
    except ValueError as exc:
        raise ProtocolError(f"not JSON: {exc}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("message is not an object with a type")
    return msg


def hello(
    info: AgentInfo, features: tuple[str, ...] = (), heartbeat: float | None = None
) -> dict[str, Any]:
    """The agent's announcement."""
    agent: dict[str, Any] = {"id": info.agent_id}
    for name in HELLO_FIELDS:
        agent[name] = getattr(info, name)
    msg: dict[str, Any] = {"type": "hello", "agent": agent, "features": sorted(set(features))}
    if heartbeat is not None:
        msg["heartbeat"] = heartbeat
    return msg


def parse_heartbeat(msg: dict[str, Any]) -> float:
    """The ping interval a hello announces (0 when absent), bounded to an hour."""
    value = msg.get("heartbeat")
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return 0.0
    return float(min(max(value, 0.0), MAX_HEARTBEAT))


def parse_features(msg: dict[str, Any]) -> frozenset[str]:
    """The features a hello announces (none when absent or malformed)."""
    value = msg.get("features")
    if not isinstance(value, list) or len(value) > MAX_FEATURES:
        return frozenset()
    return frozenset(v for v in value if isinstance(v, str) and len(v) <= 64)


def lift_buffer(payload: str) -> tuple[str, int, bytes] | None:
    """Cut the canonical base64 ``buffer`` out of a JSON command text.

    Returns ``(payload without the base64 text, position, raw bytes)``, or None when there is
    no buffer worth lifting or its text is not exactly what ``splice_buffer`` rebuilds.
    """
    key = payload.find(_BUFFER_KEY)
    if key < 0:
        return None
    start = key + len(_BUFFER_KEY)
    end = payload.find('"', start)
    if end < 0 or end - start < BIN_MIN:
        return None
    text = payload[start:end]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != text:
        return None
    return payload[:start] + payload[end:], start, raw


def splice_buffer(payload: str, position: Any, raw: bytes) -> str:
    """Put the base64 text of ``raw`` back at ``position`` (``ProtocolError`` when invalid)."""
    if isinstance(position, bool) or not isinstance(position, int):
        raise ProtocolError("bin position is not an integer")
    if not len(_BUFFER_KEY) <= position <= len(payload) or (
        payload[position - len(_BUFFER_KEY) : position] != _BUFFER_KEY
    ):
        raise ProtocolError("bin position does not follow a buffer key")
    return payload[:position] + base64.b64encode(raw).decode("ascii") + payload[position:]


async def receive_attachment(reader: asyncio.StreamReader, limit: int) -> bytes:
    """The raw frame following a message with ``bin``."""
    return await read_frame(reader, limit)


def parse_hello(msg: dict[str, Any]) -> AgentInfo:
    """``AgentInfo`` of a hello message; ``ProtocolError`` when malformed."""
    if msg.get("type") != "hello" or not isinstance(msg.get("agent"), dict):
        raise ProtocolError("expected a hello message")
    agent = msg["agent"]
    agent_id = agent.get("id")
    if isinstance(agent_id, bool) or not isinstance(agent_id, int) or not 0 < agent_id < 2**31:
        raise ProtocolError(f"invalid agent id {clip(agent_id)}")
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
