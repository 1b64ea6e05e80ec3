"""The documentation never drifts from the code.

docs/configuration.md and the configuration schemas:

Every key of the manager schema (``ManagerConfigSchema`` and its nested schemas), of the agent
schema (``AgentConfigSchema``) and of the built-in drivers' option schemas is listed in the
page's tables; every key the tables list exists; the defaults written there (TOML literals in
backticks) are the schemas' defaults.

docs/user-guide.md and the error catalogue: its troubleshooting tables have one row per code
of each family (upgrade module, task manager, agent) with the catalogue's text.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from marshmallow import Schema, fields, missing

from wpk_upgrade.agent.config import AgentConfigSchema, Seconds
from wpk_upgrade.config import Duration, ManagerConfigSchema, parse_duration
from wpk_upgrade.drivers import SOURCES, STORES, TRANSPORTS, available, driver_class
from wpk_upgrade.errors import (
    AgentCode,
    TaskCode,
    UpgradeCode,
    agent_message,
    task_message,
    upgrade_message,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
ROW = re.compile(r"^\|\s*`([a-z0-9_.]+)`\s*\|([^|]*)\|")
PLUGINS = Path(__file__).resolve().parents[1] / "plugins"

#: Driver option tables documented with the manager (prefix -> driver); ``sources.http``
#: shares ``sources.https``'s class and is documented as "same keys".
MANAGER_DRIVERS = {
    "store.options": (STORES, "sqlite"),
    "transport.options": (TRANSPORTS, "tcp"),
    "sources.https": (SOURCES, "https"),
    "sources.s3": (SOURCES, "s3"),
    "sources.custom": (SOURCES, "custom"),
}


def schema_fields(schema: Schema, prefix: str = "") -> Iterator[tuple[str, fields.Field]]:
    """Every leaf key of ``schema`` as a dotted path, with its field."""
    for name, field in schema.fields.items():
        key = f"{prefix}{name}"
        if isinstance(field, fields.Nested):
            nested = field.schema
            assert isinstance(nested, Schema)
            yield from schema_fields(nested, key + ".")
        else:
            yield key, field


def driver_fields(prefix: str, group: str, name: str) -> Iterator[tuple[str, fields.Field]]:
    schema_cls = driver_class(group, name).config_schema
    if schema_cls is not None:
        yield from schema_fields(schema_cls(), prefix + ".")


def documented(section: str) -> dict[str, str]:
    """key -> default cell of the tables under the ``## <section>`` heading."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index(f"\n## {section}\n")
    end = text.find("\n## ", start + 1)
    rows: dict[str, str] = {}
    for line in text[start : end if end > 0 else None].splitlines():
        match = ROW.match(line)
        if match and match.group(1) != "key":
            assert match.group(1) not in rows, f"{match.group(1)} listed twice"
            rows[match.group(1)] = match.group(2).strip()
    return rows


def manager_keys() -> dict[str, fields.Field]:
    keys = dict(schema_fields(ManagerConfigSchema()))
    for prefix, (group, name) in MANAGER_DRIVERS.items():
        keys.update(driver_fields(prefix, group, name))
    return keys


def agent_keys() -> dict[str, fields.Field]:
    keys = dict(schema_fields(AgentConfigSchema()))
    return keys


@pytest.mark.parametrize(
    "section,expected",
    [("Manager configuration", manager_keys), ("Agent configuration", agent_keys)],
)
def test_every_key_is_documented_and_every_documented_key_exists(
    section: str, expected: Any
) -> None:
    schema = set(expected())
    doc = set(documented(section))
    assert not schema - doc, f"keys missing from docs/configuration.md ({section})"
    assert not doc - schema, f"keys in docs/configuration.md that do not exist ({section})"


def literal(cell: str) -> tuple[bool, Any]:
    """The TOML literal in backticks at the start of a default cell, if there is one."""
    match = re.match(r"^`([^`]*)`", cell)
    if not match or "<" in match.group(1):
        return False, None
    try:
        return True, tomllib.loads(f"v = {match.group(1)}")["v"]
    except tomllib.TOMLDecodeError:
        return False, None


@pytest.mark.parametrize(
    "section,expected",
    [("Manager configuration", manager_keys), ("Agent configuration", agent_keys)],
)
def test_documented_defaults_are_the_schema_defaults(section: str, expected: Any) -> None:
    keys = expected()
    checked = 0
    for key, cell in documented(section).items():
        field = keys[key]
        default = field.load_default
        if default is missing:
            assert "required" in cell, f"{key}: required, the page says {cell!r}"
            continue
        if callable(default):
            default = default()
            if not isinstance(default, list | dict):
                continue  # a nested section's defaults are its own keys
        found, value = literal(cell)
        if default is None:
            assert not found, f"{key}: no default, the page says {cell!r}"
            continue
        if not found:
            continue  # described in words (e.g. a path derived from home)
        if isinstance(field, Duration | Seconds) and isinstance(value, str):
            value = parse_duration(value)
        assert value == default, f"{key}: the page says {cell}, the schema {default!r}"
        checked += 1
    assert checked >= 20 if section.startswith("Manager") else checked >= 10


def test_every_builtin_source_driver_with_options_is_documented() -> None:
    documented_classes = {driver_class(g, n) for g, n in MANAGER_DRIVERS.values()}
    for group in (SOURCES, STORES, TRANSPORTS):
        for name in available(group):
            cls = driver_class(group, name)
            builtin = PLUGINS in Path(inspect.getfile(cls)).resolve().parents
            if builtin and cls.config_schema is not None:
                assert cls in documented_classes, f"{group} {name}: options not documented"


GUIDE = DOC.parent / "user-guide.md"


def code_rows(heading: str) -> dict[int, str]:
    """code -> message cell of the troubleshooting table under ``### <heading>``."""
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index(f"\n### {heading}")
    end = text.find("\n### ", start + 1)
    rows = {}
    for line in text[start : end if end > 0 else None].splitlines():
        match = re.match(r"^\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            rows[int(match.group(1))] = match.group(2).strip()
    return rows


@pytest.mark.parametrize(
    "heading,codes,message",
    [
        ("Upgrade module codes", UpgradeCode, upgrade_message),
        ("Task manager codes", TaskCode, task_message),
        ("Agent codes", AgentCode, agent_message),
    ],
)
def test_the_user_guide_explains_every_code_of_the_catalogue(
    heading: str, codes: Any, message: Any
) -> None:
    rows = code_rows(heading)
    assert sorted(rows) == sorted(int(c) for c in codes)
    for code in codes:
        text = message(code).strip().rstrip(":")
        if text:
            assert rows[int(code)] == text, f"{heading} {int(code)}: {rows[int(code)]!r}"


def test_contrib_example_configurations_are_valid() -> None:
    """contrib/config's example files load with the daemons' own checks (the schemas and the
    options of every driver they name)."""
    from wpk_upgrade.cli_ops import check_agent_config, check_manager_config

    contrib = Path(__file__).resolve().parents[1] / "contrib" / "config"
    manager = check_manager_config(str(contrib / "manager.toml"))
    assert manager["home"] == "/var/lib/wpk-upgrade"
    agent = check_agent_config(str(contrib / "agent.toml"))
    assert agent["agent"]["id"] == 5 and agent["logging"]["format"] == "text"
