"""Generated and hand-written hostile inputs for the R1 fuzzing (hypothesis strategies).

``cases(strategy, n, seed, run)`` feeds ``n`` generated examples to ``run`` (no shrinking: a
measurement counts every failure instead of stopping at the first). ``Case`` is one input: a
payload and how it is framed on the wire (exact, trailing garbage, truncated, header cut, an
absurd announced size, or over the socket's limit).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hardlib import HEADER, frame
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

FRAMINGS = ("exact",) * 12 + ("trailing", "truncated", "short-header", "huge", "over-limit")

KEYS = (
    "command",
    "parameters",
    "origin",
    "agents",
    "module",
    "name",
    "node",
    "version",
    "wpk_repo",
    "use_http",
    "force_upgrade",
    "package_type",
    "file_path",
    "installer",
    "status",
    "error",
    "message",
    "error_msg",
    "statuses",
    "limit",
    "since",
    "until",
    "task_id",
    "target",
    "file",
    "mode",
    "buffer",
    "length",
    "offset",
    "type",
    "id",
    "payload",
    "bin",
    "features",
    "reply",
)

MANAGER_COMMANDS = (
    "upgrade",
    "upgrade_custom",
    "upgrade_result",
    "upgrade_update_status",
    "upgrade_get_status",
    "upgrade_cancel_tasks",
    "upgrade_cancel",
    "agents_list",
    "tasks_list",
    "task_history",
)
AGENT_COMMANDS = (
    "open",
    "write",
    "close",
    "sha1",
    "sha256",
    "upgrade",
    "clear_upgrade_result",
)
STATUSES = ("Pending", "In progress", "Done", "Failed", "Cancelled", "Timeout", "Legacy", "Updated")

nasty_text = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ud800",
        "\udfff",
        "../../etc/passwd",
        "../x",
        "/etc/passwd.wpk",
        "a" * 5000,
        "%s%n",
        "{}",
        "\u202e",
        "💥",
        "NaN",
        "node01",
        "api",
        "upgrade_module",
    ]
)
texts = st.text(max_size=40) | nasty_text
numbers = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, 2, 5, -1, 2**31 - 1, 2**31, 2**63, 1.0, 1.5, -0.0])
)
scalars = st.none() | st.booleans() | numbers | texts
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.sampled_from(KEYS) | texts, inner, max_size=6)
    ),
    max_leaves=25,
)
agent_lists = st.lists(numbers | scalars, max_size=30) | st.lists(
    st.integers(min_value=0, max_value=50), max_size=30
)


def messages(commands: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """Message-shaped JSON values: known keys and commands, wrong types, missing and extra
    keys, nested garbage."""
    params = (
        st.dictionaries(
            st.sampled_from(KEYS) | texts,
            json_values
            | agent_lists
            | st.sampled_from(STATUSES)
            | st.sampled_from(("wb", "w", "r", "a+"))
            | texts,
            max_size=8,
        )
        | json_values
    )
    shaped = st.fixed_dictionaries(
        {},
        optional={
            "command": st.sampled_from(commands) | json_values,
            "parameters": params
            | st.fixed_dictionaries(
                {"agents": agent_lists},
                optional={k: json_values | texts for k in KEYS[4:20]},
            ),
            "origin": st.fixed_dictionaries(
                {}, optional={"module": texts | json_values, "name": texts | json_values}
            )
            | json_values,
        },
    ).flatmap(
        lambda d: st.dictionaries(texts, json_values, max_size=3).map(lambda extra: {**extra, **d})
    )
    return shaped | json_values


def encodings(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """JSON text of ``values`` (lone surrogates kept as escapes), sometimes corrupted."""

    def dump(value: Any) -> bytes:
        return json.dumps(value).encode("ascii")

    def corrupt(data: bytes, how: int, where: int, byte: int) -> bytes:
        if not data:
            return bytes([byte])
        pos = where % len(data)
        if how == 0:
            return data[:pos]  # cut
        if how == 1:
            return data[:pos] + bytes([byte | 0x80]) + data[pos:]  # invalid UTF-8
        if how == 2:
            return data[:pos] + bytes([byte]) + data[pos + 1 :]  # one byte replaced
        return data + data[:pos]  # duplicated tail

    plain = values.map(dump)
    broken = st.tuples(
        plain,
        st.integers(0, 3),
        st.integers(0, 1 << 16),
        st.integers(0, 255),
    ).map(lambda t: corrupt(*t))
    raw = st.binary(max_size=300)
    return st.one_of(plain, plain, plain, broken, raw)


@dataclass(frozen=True)
class Case:
    """One input: ``payload`` framed as ``framing``."""

    payload: bytes
    framing: str = "exact"
    salt: int = 0

    def wire(self, limit: int) -> bytes:
        """The bytes to send for a socket whose frame limit is ``limit``."""
        p = self.payload
        if self.framing == "trailing":
            return frame(p) + b"\x07garbage after the frame"
        if self.framing == "truncated":
            return HEADER.pack(len(p) + 1 + self.salt % 1000) + p
        if self.framing == "short-header":
            return frame(p)[: self.salt % 4]
        if self.framing == "huge":
            return HEADER.pack(0xFFFFFFFF - self.salt % 7) + p[:100]
        if self.framing == "over-limit":
            body = (p + b" " * (limit + 1))[: limit + 1 + self.salt % 100]
            return frame(body)
        return frame(p)

    def must_answer(self, limit: int) -> bool:
        """True when the server has a whole frame (or a refusable size) and must reply."""
        return self.framing in ("exact", "trailing", "over-limit")

    def describe(self) -> str:
        head = self.payload[:120]
        return f"{self.framing} {len(self.payload)} bytes {head!r}"


def case_strategy(commands: tuple[str, ...]) -> st.SearchStrategy[Case]:
    return st.builds(
        Case,
        encodings(messages(commands)),
        st.sampled_from(FRAMINGS),
        st.integers(0, 1 << 20),
    )


def run_examples(
    strategy: st.SearchStrategy[Any], n: int, seed_value: int, run: Callable[[Any], None]
) -> None:
    """Feed ``n`` generated examples to ``run`` (generation phase only, reproducible)."""
    if n <= 0:
        return

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=False,
    )
    @seed(seed_value)
    @given(strategy)
    def feed(example: Any) -> None:
        run(example)

    feed()


# --------------------------------------------------------------------------- nasties


def deep(opening: bytes, closing: bytes, depth: int) -> bytes:
    return opening * depth + closing * depth


def _fill(command: str, limit: int, extra: str = "") -> bytes:
    """A well-formed request naming as many distinct agents as fit in ``limit`` bytes."""
    head = (
        '{"origin":{"module":"api","name":"node01"},"command":"'
        + command
        + '","parameters":{'
        + extra
        + '"agents":['
    )
    ids: list[str] = []
    size = len(head) + 3
    agent = 1
    while size + len(str(agent)) + 1 < limit:
        ids.append(str(agent))
        size += len(ids[-1]) + 1
        agent += 1
    return (head + ",".join(ids) + "]}}").encode()


def nasties(commands: tuple[str, ...], limit: int, full: bool = False) -> list[Case]:
    """Hand-written hostile inputs for a socket whose frame limit is ``limit`` (``full``: also
    the slow ones, such as a report naming 12,000 agents)."""
    command = commands[0]
    within = limit - 64
    many_ids = ",".join(str(i) for i in range(1, 100_001))
    same_ids = ",".join("1" for _ in range(100_000))
    out = [
        Case(b""),
        Case(b" "),
        Case(b"null"),
        Case(b"[]"),
        Case(b"{}"),
        Case(b'"just a string"'),
        Case(b"\xff\xfe\xfd"),
        Case(b'{"command":"\xc3\x28","parameters":{}}'),
        Case(b'{"command":"\xc0\xaf","parameters":{}}'),  # overlong encoding
        Case(b'{"command":"\xed\xa0\x80","parameters":{}}'),  # encoded surrogate
        Case(b"\x00" * 100),
        Case(b"[" * within),  # deep nesting within the size limit
        Case(b"{" * within),
        Case(deep(b'{"a":', b"}", within // 6)),
        Case(deep(b'{"command":', b"}", within // 12)),
        Case(
            b'{"command":"' + command.encode() + b'","parameters":{"agents":' + b"[" * (within - 80)
        ),
        Case(b"[" * 100_000),  # over the limit
        Case(f'{{"command":"{command}","parameters":{{"agents":[{many_ids}]}}}}'.encode()),
        Case(f'{{"command":"{command}","parameters":{{"agents":[{same_ids}]}}}}'.encode()),
        Case(b'{"command":"' + b"x" * within + b'"}'),  # huge string, logged?
        Case(
            json.dumps(
                {
                    "origin": {"module": "api", "name": "node01"},
                    "command": "y" * within,
                    "parameters": {"agents": [1]},
                }
            ).encode()[:limit]
        ),
        Case(_fill(command, limit)),
        Case(json.dumps({"command": "x" * within, "parameters": {}}).encode()),
        Case(b'{"command":"upgrade","parameters":{"agents":[1e400,-1e400,NaN,Infinity]}}'),
        Case(b'{"command":"upgrade","parameters":{"agents":[' + b"9" * 5000 + b"]}}"),
        Case(b'{"command":"upgrade","command":"upgrade_result","parameters":{"agents":[1]}}'),
        Case(b"1" * 5000),
        Case(frame(b'{"command":"upgrade_result"}')),  # a frame inside the frame
    ]
    if full:
        out.append(Case(_fill("upgrade_update_status", limit, '"status":"Done",')))
    out += [Case(b'{"command":"upgrade_result"}', f, s) for f in FRAMINGS[12:] for s in (1, 3)]
    rng = random.Random(1)
    out += [Case(bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 400)))) for _ in range(8)]
    return out
