"""Process logging of the manager and the agent: text or JSON lines, secrets redacted, one line
per task event.

Library code never configures logging (DESIGN.md §5); the daemon's process shell calls
``configure_logging`` once the configuration is read. What it installs:

* one handler on stderr, plus ``[logging] file`` (relative to the manager's home) when set;
* ``[logging] format``: ``text`` (``time level logger: message``) or ``json`` (one JSON object per
  line: ``time``, ``level``, ``logger``, ``message``, and ``task_id``/``agent_id`` when the
  record carries them, as ``extra`` fields or, for the kernel's older messages, in the text
  ``task 12 ... agent 005``);
* redaction in every formatter, whatever logger the line comes from: URL passwords
  (``https://user:***@host``), ``Bearer`` credentials and every configured secret value (the
  API tokens) are replaced by ``***`` before a line is written.

``EventLogPlugin`` is a hook plugin the daemon registers: it writes one line per task event
(created, each status change, WPK delivered) with ``task_id`` and ``agent_id`` as extras.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .config import ManagerConfig
from .hookspecs import hookimpl
from .models import Task, TaskStatus

EVENT_LOGGER = "wpk_upgrade.events"
MASK = "***"
#: Longest message a line carries; the rest is cut (after redaction) and counted. Peer text
#: is already clipped where it is quoted; this bounds whatever slips through.
MAX_MESSAGE = 4096

#: A scheme starts where no scheme character precedes it (the lookbehind keeps the search
#: linear: without it a long run of letters is tried from each of its positions, quadratic).
_URL_PASSWORD = re.compile(
    r"(?<![A-Za-z0-9+.\-])(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@]*):(?P<pw>[^\s@/]*)@"
)
_BEARER = re.compile(r"(?i)\b(?P<head>bearer\s+)(?P<tok>[^\s,;\"']+)")
_TASK_ID = re.compile(r"\btask(?:_id)?[ =:'\"]*(\d+)", re.IGNORECASE)
_AGENT_ID = re.compile(r"\bagent(?:_id)?[ =:'\"]*(\d+)", re.IGNORECASE)


class Redactor:
    """Replaces URL passwords, bearer credentials and known secret values by ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        text = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
        text = _BEARER.sub(lambda m: f"{m.group('head')}{MASK}", text)
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``."""
    return Redactor()(url)


def ids_of(record: logging.LogRecord, message: str) -> dict[str, int]:
    """``task_id``/``agent_id`` of a record: its extras first, else found in the text."""
    found: dict[str, int] = {}
    for key, pattern in (("task_id", _TASK_ID), ("agent_id", _AGENT_ID)):
        value = getattr(record, key, None)
        if isinstance(value, int) and not isinstance(value, bool):
            found[key] = value
            continue
        match = pattern.search(message)
        if match:
            found[key] = int(match.group(1))
    return found


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    """``text`` cut to ``limit`` characters, saying how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... [{len(text) - limit} more characters cut]"


class TextFormatter(logging.Formatter):
    """``time level logger: message`` (or another ``%``-style layout), redacted."""

    def __init__(self, redactor: Redactor, layout: str = TEXT_FORMAT) -> None:
        super().__init__(layout)
        self.redactor = redactor

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = bounded(self.redactor(record.message))
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        return self.redactor(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line (see the module docstring), redacted."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def format(self, record: logging.LogRecord) -> str:
        message = bounded(self.redactor(record.getMessage()))
        stamp = datetime.fromtimestamp(record.created, tz=UTC)
        entry: dict[str, Any] = {
            "time": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            **ids_of(record, message),
        }
        if record.exc_info:
            entry["exception"] = self.redactor(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


_INSTALLED: list[logging.Handler] = []


def configure_logging(
    level: str = "INFO",
    fmt: str = "text",
    file: str | Path | None = None,
    secrets: Iterable[str] = (),
    text_layout: str = TEXT_FORMAT,
    record_filter: logging.Filter | None = None,
) -> None:
    """Install the process's log handlers (replacing any installed before by this function
    or by ``logging.basicConfig``). ``text_layout`` is the ``text`` format's line layout;
    ``record_filter`` (the agent's, which stamps its id on every record) goes on each
    handler."""
    redactor = Redactor(secrets)
    formatter: logging.Formatter = (
        JsonFormatter(redactor) if fmt == "json" else TextFormatter(redactor, text_layout)
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file is not None:
        path = Path(file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if handler in _INSTALLED:
            handler.close()
    _INSTALLED.clear()
    for handler in handlers:
        handler.setFormatter(formatter)
        if record_filter is not None:
            handler.addFilter(record_filter)
        root.addHandler(handler)
        _INSTALLED.append(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def configure_manager_logging(config: ManagerConfig, level: str | None = None) -> None:
    """The manager process's logging from ``[logging]`` (``level`` overrides its level);
    the API tokens are redacted from every line."""
    section = config.logging
    configure_logging(
        level=level or section.level,
        fmt=section.format,
        file=config.home / section.file if section.file else None,
        secrets=config.api.tokens,
    )


class EventLogPlugin:
    """Hook plugin: one log line per task event, with ``task_id`` and ``agent_id`` extras."""

    def __init__(self) -> None:
        self.log = logging.getLogger(EVENT_LOGGER)

    @hookimpl
    def wpk_after_task_status_changed(
        self,
        task: Task,
        old_status: TaskStatus | None,
        new_status: TaskStatus,
        reason: str | None,
    ) -> None:
        before = old_status.display if old_status is not None else "created"
        extra = {"task_id": task.task_id, "agent_id": task.agent_id}
        level = (
            logging.WARNING
            if new_status in (TaskStatus.FAILED, TaskStatus.TIMEOUT)
            else logging.INFO
        )
        text = "task %d agent %03d: %s -> %s"
        args: list[Any] = [task.task_id, task.agent_id, before, new_status.display]
        if task.error_msg and new_status.final:
            text += " (%s)"
            args.append(task.error_msg)
        if reason and old_status is not None:
            text += " [%s]"
            args.append(reason)
        self.log.log(level, text, *args, extra=extra)

    @hookimpl
    def wpk_transfer_progress(self, task_id: int, agent_id: int, sent: int, total: int) -> None:
        if total and sent >= total:
            self.log.info(
                "task %d agent %03d: WPK delivered (%d bytes)",
                task_id,
                agent_id,
                total,
                extra={"task_id": task_id, "agent_id": agent_id},
            )
