"""Reading and quoting what peers send: socket frames, agent messages, transport frames.

``loads(raw)`` is the one JSON decoder for input that crosses a trust boundary. Besides invalid
UTF-8 and invalid JSON it refuses, with ``ValueError``:

* nesting deeper than ``MAX_DEPTH`` (protocol messages nest four levels; the C decoder would
  raise ``RecursionError`` around a thousand, which no caller expected);
* strings that cannot be encoded back to UTF-8 (lone surrogates written as ``\\ud800``
  escapes): no reply, log line, store or file name can hold them;
* with ``nul=False``, strings holding NUL (``\\u0000``): PostgreSQL text columns refuse it.

``clip(value)`` is the ``repr`` of a peer-supplied value cut to ``limit`` characters, for log
lines and error details: a 1 MiB command name costs one short line, not a megabyte of log.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

MAX_DEPTH = 64
CLIP = 120

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_NUL_ESCAPE = re.compile(r"\\u0000")


def _too_deep(value: Any, max_depth: int) -> bool:
    """True when ``value`` nests more than ``max_depth`` lists/objects (iterative walk)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def loads(raw: bytes | str, *, max_depth: int = MAX_DEPTH, nul: bool = False) -> Any:
    """Decode peer JSON; ``ValueError`` (with the reason) for anything unusable."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw  # UnicodeDecodeError: ValueError
    try:
        value = json.loads(text)
    except RecursionError:  # the C decoder stops cleanly at the interpreter's recursion limit
        raise ValueError(f"JSON nested deeper than {max_depth} levels") from None
    if text.count("[") + text.count("{") > max_depth and _too_deep(value, max_depth):
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    nuls = not nul and _NUL_ESCAPE.search(text) is not None
    if surrogates or nuls:
        for string in _strings(value):
            if surrogates:
                try:
                    string.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("JSON string holds a lone surrogate (not text)") from None
            if nuls and "\x00" in string:
                raise ValueError("JSON string holds a NUL character")
    return value


def _strings(value: Any) -> Iterator[str]:
    """Every string of a decoded JSON value, object keys included."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def clip(value: Any, limit: int = CLIP) -> str:
    """``repr(value)``, cut to ``limit`` characters with the full length said."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def clip_text(text: str, limit: int = 3 * CLIP) -> str:
    """``text`` (a detail already formatted) cut to ``limit`` characters, full length said."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class LogBudget:
    """At most ``limit`` log lines of one kind for one request (``take``); a request naming
    ten thousand agents logs ten of them and then how many were left out (``skipped``)."""

    def __init__(self, limit: int = 10) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        """Count one event; True while it may still be logged."""
        self.used += 1
        return self.used <= self.limit

    @property
    def skipped(self) -> int:
        return max(0, self.used - self.limit)
