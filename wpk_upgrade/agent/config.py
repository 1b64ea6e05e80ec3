"""The agent's TOML configuration: schema, defaults and the paths of the agent home.

``load_agent_config(path)`` reads and validates the file; every fault is a ``ConfigError`` naming
the file and the key path (``upgrade.notification_wait_factor: ...``). The ``[upgrade]`` table
mirrors the reference's agent-side ``<agent-upgrade>`` block (reference §9.2) plus the execd
internal options the agent needs (``installer_timeout`` = ``execd.request_timeout``,
``max_restart_lock`` = ``execd.max_restart_lock``). Differences from the reference:

* ``notification_wait_factor`` may be fractional (the reference parses it as an integer, §11.16);
* durations accept, besides ``30``/``"30s"``/``"5m"``/``"1h"``, a positive float number of seconds
  (``0.2``), which tests and demos use to keep waits short;
* ``result_wait`` (the reference's fixed 30 s wait before reading ``upgrade_result``) is
  configurable.

The OS fields of ``[agent]`` stay None when not configured; ``identity.py`` detects them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from marshmallow import Schema, ValidationError, fields, post_load, validate, validates_schema

from ..config import LoggingSchema, LoggingSection, load, parse_duration

DEFAULT_CA_STORE = "etc/wpk_root.pem"


class Seconds(fields.Field):
    """A duration in seconds: an int/float number, or ``"30s"``, ``"5m"``, ``"1h"`` text.

    ``minimum``/``maximum`` bound the value; ``allow_zero`` accepts exactly 0 even when
    ``minimum`` is larger (for "0 disables").
    """

    def __init__(
        self,
        *,
        minimum: float = 0.0,
        maximum: float | None = None,
        allow_zero: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.minimum = minimum
        self.maximum = maximum
        self.allow_zero = allow_zero

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> float:
        if isinstance(value, float) and not isinstance(value, bool):
            seconds = value
        else:
            try:
                seconds = float(parse_duration(value))
            except ValueError as exc:
                raise ValidationError(str(exc)) from exc
        if seconds == 0 and self.allow_zero:
            return 0.0
        if seconds <= 0 or seconds < self.minimum:
            bound = f"at least {self.minimum:g} seconds" if self.minimum else "greater than 0"
            raise ValidationError(f"must be {bound}")
        if self.maximum is not None and seconds > self.maximum:
            raise ValidationError(f"must be at most {self.maximum:g} seconds")
        return seconds

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> Any:
        return value


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class AgentSection:
    """``[agent]``: who this agent is. OS fields None = detect at run time."""

    id: int
    name: str = ""
    version_file: str = "etc/version"
    os_platform: str | None = None
    os_major: str | None = None
    os_minor: str | None = None
    os_arch: str | None = None


@dataclass(frozen=True)
class ManagerSection:
    """``[manager]``: the transport driver's name and its own options table."""

    transport: str = "tcp"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CaVerification:
    """``[upgrade.ca_verification]``: the trusted CA stores (files or hashed directories)."""

    enabled: bool = True
    ca_store: tuple[str, ...] = (DEFAULT_CA_STORE,)


@dataclass(frozen=True)
class UpgradeSection:
    """``[upgrade]``: the agent-side upgrade module (reference §9.2) and execd timings."""

    enabled: bool = True
    notification_wait_start: float = 30.0
    notification_wait_max: float = 3600.0
    notification_wait_factor: float = 2.0
    result_wait: float = 30.0
    installer_timeout: float = 60.0
    max_restart_lock: float = 600.0
    ca_verification: CaVerification = field(default_factory=CaVerification)


@dataclass(frozen=True)
class AgentConfig:
    """The whole agent configuration, with the paths of the agent home derived from ``home``."""

    home: Path
    agent: AgentSection
    manager: ManagerSection = field(default_factory=ManagerSection)
    upgrade: UpgradeSection = field(default_factory=UpgradeSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    max_message_size: int = 65536
    source_path: str | None = None

    # ---- layout (mirrors the reference install directory)
    @property
    def etc_dir(self) -> Path:
        return self.home / "etc"

    @property
    def version_file(self) -> Path:
        return self.home / self.agent.version_file

    @property
    def incoming_dir(self) -> Path:
        return self.home / "var" / "incoming"

    @property
    def upgrade_dir(self) -> Path:
        return self.home / "var" / "upgrade"

    @property
    def result_file(self) -> Path:
        return self.upgrade_dir / "upgrade_result"

    @property
    def run_dir(self) -> Path:
        return self.home / "var" / "run"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "agent.pid"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "agent.state"

    @property
    def socket_path(self) -> Path:
        return self.home / "queue" / "sockets" / "upgrade"

    @property
    def log_file(self) -> Path | None:
        return self.home / self.logging.file if self.logging.file else None

    @property
    def ca_stores(self) -> tuple[Path, ...] | None:
        """Absolute CA store paths, or None when CA verification is disabled."""
        ca = self.upgrade.ca_verification
        if not ca.enabled:
            return None
        return tuple(self.home / entry for entry in ca.ca_store if entry.strip())

    def layout_dirs(self) -> tuple[Path, ...]:
        """Every directory the daemon creates at start."""
        dirs = [
            self.etc_dir,
            self.incoming_dir,
            self.upgrade_dir,
            self.run_dir,
            self.socket_path.parent,
        ]
        if self.log_file is not None:
            dirs.append(self.log_file.parent)
        return tuple(dirs)


# --------------------------------------------------------------------------- schemas


def _no_blank(value: str) -> None:
    if not value.strip():
        raise ValidationError("must not be empty")


class _AgentSchema(Schema):
    id = fields.Integer(required=True, strict=True, validate=validate.Range(1, 999999))
    name = fields.String(load_default="", validate=validate.Length(max=255))
    version_file = fields.String(load_default="etc/version", validate=_no_blank)
    os_platform = fields.String(load_default=None, allow_none=True, validate=_no_blank)
    os_major = fields.String(load_default=None, allow_none=True)
    os_minor = fields.String(load_default=None, allow_none=True)
    os_arch = fields.String(load_default=None, allow_none=True, validate=_no_blank)

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> AgentSection:
        if data.get("os_platform"):
            data["os_platform"] = data["os_platform"].strip().lower()
        return AgentSection(**data)


class _ManagerSchema(Schema):
    transport = fields.String(load_default="tcp", validate=_no_blank)
    options = fields.Dict(keys=fields.String(), load_default=dict)

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> ManagerSection:
        return ManagerSection(**data)


class _CaSchema(Schema):
    enabled = fields.Boolean(load_default=True)
    ca_store = fields.List(
        fields.String(), load_default=lambda: [DEFAULT_CA_STORE], validate=validate.Length(min=1)
    )

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> CaVerification:
        return CaVerification(enabled=data["enabled"], ca_store=tuple(data["ca_store"]))


class _UpgradeSchema(Schema):
    enabled = fields.Boolean(load_default=True)
    notification_wait_start = Seconds(load_default=30.0)
    notification_wait_max = Seconds(load_default=3600.0)
    notification_wait_factor = fields.Float(load_default=2.0, allow_nan=False)
    result_wait = Seconds(load_default=30.0)
    installer_timeout = Seconds(load_default=60.0, minimum=1, maximum=3600)
    max_restart_lock = Seconds(load_default=600.0, maximum=3600, allow_zero=True)
    ca_verification = fields.Nested(_CaSchema, load_default=lambda: CaVerification())

    @validates_schema
    def check(self, data: dict[str, Any], **_: Any) -> None:
        factor = data.get("notification_wait_factor", 2.0)
        if factor <= 1:
            raise ValidationError("must be greater than 1", "notification_wait_factor")
        start = data.get("notification_wait_start", 30.0)
        if data.get("notification_wait_max", 3600.0) < start:
            raise ValidationError(
                "must be greater than or equal to notification_wait_start",
                "notification_wait_max",
            )

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> UpgradeSection:
        return UpgradeSection(**data)


class AgentConfigSchema(Schema):
    """The agent's TOML file (see the module docstring and docs/configuration.md)."""

    home = fields.String(required=True, validate=_no_blank)
    agent = fields.Nested(_AgentSchema, required=True)
    manager = fields.Nested(_ManagerSchema, load_default=lambda: ManagerSection())
    upgrade = fields.Nested(_UpgradeSchema, load_default=lambda: UpgradeSection())
    logging = fields.Nested(LoggingSchema, load_default=lambda: LoggingSection())
    max_message_size = fields.Integer(
        load_default=65536, strict=True, validate=validate.Range(1024, 1 << 26)
    )

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> AgentConfig:
        data["home"] = Path(data["home"]).expanduser().absolute()
        return AgentConfig(**data)


def load_agent_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Load and validate an agent configuration file (``ConfigError`` naming file and key)."""
    cfg: AgentConfig = load(path, AgentConfigSchema())
    return AgentConfig(**{**cfg.__dict__, "source_path": str(Path(path).absolute())})
