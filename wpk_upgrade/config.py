"""TOML configuration loading and the manager's configuration schema (marshmallow).

``load(path, schema)`` reads a TOML file and validates it; any fault becomes a ``ConfigError``
naming the file, the key path (``upgrade.chunk_size``) and what is wrong. Durations accept an
integer number of seconds or a string with a unit suffix ``s``, ``m``, ``h`` or ``d``
(reference §9.2-9.3).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from .errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> int:
    """Seconds of ``30``, ``"30s"``, ``"15m"``, ``"2h"``, ``"7d"``; ``ValueError`` otherwise."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30, '30s', '15m', '2h' or '7d'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return int(m.group(1)) * _UNITS[m.group(2)]
    raise ValueError(f"expected a duration such as 30, '30s', '15m', '2h' or '7d', got {value!r}")


class Duration(fields.Field):
    """A marshmallow field for durations (seconds, or a number with s/m/h/d)."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> int:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from exc
        if seconds <= 0:
            raise ValidationError("must be greater than 0")
        return seconds

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return value


def flatten_errors(messages: Any, prefix: str = "") -> list[str]:
    """marshmallow's nested error dict as ``key.path: message`` lines."""
    out: list[str] = []
    if isinstance(messages, dict):
        for key, value in messages.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.extend(flatten_errors(value, path))
    elif isinstance(messages, list):
        texts = [m for m in messages if not isinstance(m, dict | list)]
        if texts:
            out.append(f"{prefix or '(top level)'}: {' '.join(str(t) for t in texts)}")
        for m in messages:
            if isinstance(m, dict | list):
                out.extend(flatten_errors(m, prefix))
    else:
        out.append(f"{prefix or '(top level)'}: {messages}")
    return out


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file; ``ConfigError`` naming the file on any fault."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"{p}: configuration file not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from exc


def load(path: str | os.PathLike[str], schema: Schema) -> Any:
    """Read ``path`` and validate it with ``schema``; ``ConfigError`` with every fault."""
    data = read_toml(path)
    return load_data(data, schema, str(path))


def load_data(data: dict[str, Any], schema: Schema, where: str = "<config>") -> Any:
    """Validate an already-parsed mapping with ``schema``."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        lines = flatten_errors(exc.messages)
        raise ConfigError(f"{where}: " + "; ".join(lines)) from exc


# --------------------------------------------------------------------------- manager schema


@dataclass(frozen=True)
class UpgradeSection:
    max_threads: int = 8
    chunk_size: int = 32768
    wpk_repository: str | None = None
    command_timeout: float = 60.0
    installer_timeout: float = 600.0
    open_attempts: int = 10
    open_retry_delay: float = 1.0
    #: "windowed" (default): many chunks in flight, resumable (agents announcing the
    #: extensions); "reference": the reference's stop-and-wait exchange for every agent.
    transfer_mode: str = "windowed"
    window: int = 16
    resume_timeout: float = 300.0
    resume_attempts: int = 5
    not_ready_wait: float = 60.0
    max_inflight_mb: float = 32.0


@dataclass(frozen=True)
class TaskManagerSection:
    """``[task_manager]``: timeouts, cleanup and history retention (seconds), restart policy.

    ``on_restart``: ``resume`` (queued tasks resumed, cut transfers pushed again) or
    ``cancel`` (the reference: queued tasks Cancelled, In progress ones left to report or
    time out). ``poll_interval``: how often the dispatcher claims its node's Pending tasks
    created by other nodes (float seconds).
    """

    task_timeout: int = 900
    cleanup_time: int = 604800
    pending_timeout: int | None = None
    on_restart: str = "resume"
    sweep_interval: int = 60
    history_retention: int = 90 * 86400
    poll_interval: float = 2.0


@dataclass(frozen=True)
class DriverSection:
    name: str | None = None
    url: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ApiSection:
    """``[api]``: the HTTP API (extra ``api``); bearer ``tokens`` are never shown in reprs."""

    enabled: bool = False
    listen: str = "127.0.0.1:55000"
    tokens: tuple[str, ...] = field(default=(), repr=False)
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class MetricsSection:
    """``[metrics]``: the Prometheus endpoint (extra ``api``)."""

    enabled: bool = False
    listen: str = "127.0.0.1:9516"
    refresh_interval: int = 15


@dataclass(frozen=True)
class LoggingSection:
    """``[logging]`` of the manager and of the agent: log level, line format (``text`` or
    ``json``) and an optional file (relative to home) besides stderr."""

    level: str = "INFO"
    format: str = "text"
    file: str | None = None


@dataclass(frozen=True)
class ManagerConfig:
    home: Path
    node_name: str = "node01"
    manager_version: str | None = None
    max_message_size: int = 65536
    upgrade: UpgradeSection = field(default_factory=UpgradeSection)
    task_manager: TaskManagerSection = field(default_factory=TaskManagerSection)
    store: DriverSection = field(default_factory=DriverSection)
    transport: DriverSection = field(default_factory=lambda: DriverSection(name="tcp"))
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    api: ApiSection = field(default_factory=ApiSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    source_path: str | None = None

    @property
    def upgrade_socket(self) -> Path:
        return self.home / "queue" / "tasks" / "upgrade"

    @property
    def task_socket(self) -> Path:
        return self.home / "queue" / "tasks" / "task"

    @property
    def cache_dir(self) -> Path:
        return self.home / "var" / "upgrade"

    @property
    def store_url(self) -> str:
        return self.store.url or f"sqlite:///{self.home / 'queue' / 'tasks' / 'tasks.db'}"


class _UpgradeSchema(Schema):
    max_threads = fields.Integer(load_default=8, validate=validate.Range(0, 256))
    chunk_size = fields.Integer(load_default=32768, validate=validate.Range(64, 60000))
    wpk_repository = fields.String(load_default=None, allow_none=True)
    command_timeout = fields.Float(load_default=60.0, validate=validate.Range(min=0.1))
    installer_timeout = fields.Float(load_default=600.0, validate=validate.Range(min=1))
    open_attempts = fields.Integer(load_default=10, validate=validate.Range(1, 100))
    open_retry_delay = fields.Float(load_default=1.0, validate=validate.Range(0, 60))
    transfer_mode = fields.String(
        load_default="windowed", validate=validate.OneOf(["windowed", "reference"])
    )
    window = fields.Integer(load_default=16, validate=validate.Range(1, 256))
    resume_timeout = fields.Float(load_default=300.0, validate=validate.Range(0, 86400))
    resume_attempts = fields.Integer(load_default=5, validate=validate.Range(0, 1000))
    not_ready_wait = fields.Float(load_default=60.0, validate=validate.Range(0, 3600))
    max_inflight_mb = fields.Float(load_default=32.0, validate=validate.Range(1, 4096))

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> UpgradeSection:
        if data["max_threads"] == 0:
            data["max_threads"] = os.cpu_count() or 1
        return UpgradeSection(**data)


class _TaskManagerSchema(Schema):
    task_timeout = Duration(load_default=900)
    cleanup_time = Duration(load_default=604800)
    pending_timeout = Duration(load_default=None, allow_none=True)
    on_restart = fields.String(load_default="resume", validate=validate.OneOf(["resume", "cancel"]))
    sweep_interval = Duration(load_default=60)
    history_retention = Duration(load_default=None, allow_none=True)
    poll_interval = fields.Float(load_default=2.0, validate=validate.Range(0.05, 3600))

    @validates_schema
    def check(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("cleanup_time", 604800) < data.get("task_timeout", 900):
            raise ValidationError(
                "Too short cleanup_time at module 'task-manager' (must be >= task_timeout)",
                "cleanup_time",
            )
        retention = data.get("history_retention")
        if retention is not None and retention < data.get("cleanup_time", 604800):
            raise ValidationError(
                "history_retention must be >= cleanup_time (history outlives its tasks)",
                "history_retention",
            )

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> TaskManagerSection:
        if data.get("history_retention") is None:  # default: 90 days, at least cleanup_time
            data["history_retention"] = max(90 * 86400, data["cleanup_time"])
        return TaskManagerSection(**data)


class DriverSchema(Schema):
    """``[store]`` / ``[transport]``: a driver name or URL, plus its own options table."""

    name = fields.String(load_default=None, allow_none=True)
    url = fields.String(load_default=None, allow_none=True)
    options = fields.Dict(keys=fields.String(), load_default=dict)

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> DriverSection:
        return DriverSection(**data)


def split_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` allowed) of a listen address -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _listen(value: str) -> None:
    try:
        split_listen(value)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


class _ApiSchema(Schema):
    enabled = fields.Boolean(load_default=False)
    listen = fields.String(load_default="127.0.0.1:55000", validate=_listen)
    tokens = fields.List(fields.String(validate=validate.Length(min=16)), load_default=list)
    cert = fields.String(load_default=None, allow_none=True)
    key = fields.String(load_default=None, allow_none=True)

    @validates_schema
    def check(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("enabled") and not data.get("tokens"):
            raise ValidationError("at least one token is needed when the API is enabled", "tokens")
        if bool(data.get("cert")) != bool(data.get("key")):
            raise ValidationError("cert and key go together", "cert")

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> ApiSection:
        return ApiSection(**{**data, "tokens": tuple(data["tokens"])})


class _MetricsSchema(Schema):
    enabled = fields.Boolean(load_default=False)
    listen = fields.String(load_default="127.0.0.1:9516", validate=_listen)
    refresh_interval = Duration(load_default=15)

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> MetricsSection:
        return MetricsSection(**data)


class LoggingSchema(Schema):
    """``[logging]`` (manager and agent alike)."""

    level = fields.String(
        load_default="INFO",
        validate=validate.OneOf(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    )
    format = fields.String(load_default="text", validate=validate.OneOf(["text", "json"]))
    file = fields.String(load_default=None, allow_none=True)

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> LoggingSection:
        return LoggingSection(**data)


class ManagerConfigSchema(Schema):
    """The manager's TOML file (see docs/configuration.md)."""

    home = fields.String(required=True)
    node_name = fields.String(load_default="node01", validate=validate.Length(1, 255))
    manager_version = fields.String(load_default=None, allow_none=True)
    max_message_size = fields.Integer(load_default=65536, validate=validate.Range(1024, 1 << 26))
    upgrade = fields.Nested(_UpgradeSchema, load_default=lambda: UpgradeSection())
    task_manager = fields.Nested(_TaskManagerSchema, load_default=lambda: TaskManagerSection())
    store = fields.Nested(DriverSchema, load_default=lambda: DriverSection())
    transport = fields.Nested(DriverSchema, load_default=lambda: DriverSection(name="tcp"))
    sources = fields.Dict(keys=fields.String(), values=fields.Dict(), load_default=dict)
    api = fields.Nested(_ApiSchema, load_default=lambda: ApiSection())
    metrics = fields.Nested(_MetricsSchema, load_default=lambda: MetricsSection())
    logging = fields.Nested(LoggingSchema, load_default=lambda: LoggingSection())

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> ManagerConfig:
        data["home"] = Path(data["home"]).expanduser().absolute()
        return ManagerConfig(**data)


def load_manager_config(path: str | os.PathLike[str]) -> ManagerConfig:
    """Load and validate a manager configuration file."""
    cfg = load(path, ManagerConfigSchema())
    return ManagerConfig(**{**cfg.__dict__, "source_path": str(path)})
