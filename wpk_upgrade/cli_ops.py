"""Operator commands of ``wpk-upgrade``: upgrade, follow and list, through the manager's sockets.

Attached to the main group by ``cli.py`` (``attach``). Every command finds the manager by its
home directory: ``--home DIR``, or the ``home`` of ``--config FILE``, else ``$WPK_UPGRADE_HOME``,
else ``/var/lib/wpk-upgrade``; it talks to ``<home>/queue/tasks/upgrade`` (the reference's
``upgrade``/``upgrade_custom`` messages) and ``<home>/queue/tasks/task`` (``upgrade_result``,
the ``upgrade_cancel`` extension and the admin listings of ``admin.py``).

Agent ids are given as ``5``, ``005``, ``5,6`` or ``all`` (every agent the manager knows).
Read commands take ``--json``. Exit statuses (the same as ``cli.py``'s): 0 success, 1 the
operation failed (an agent not upgraded, a task ended in error, nothing to cancel), 2 bad
usage or configuration, 3 the manager cannot be reached. Failures print one line on stderr,
never a traceback. See docs/cli.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from . import versions
from .errors import ConfigError, WpkUpgradeError
from .framing import request_unix

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
#: The highest agent id (as an agent's ``agent.id`` and ``wpk-upgrade ca issue-agent``); the
#: socket protocol itself takes any non-negative 32-bit integer.
LAST_AGENT_ID = 999999
HOME_ENV = "WPK_UPGRADE_HOME"
DEFAULT_HOME = "/var/lib/wpk-upgrade"
#: Agents per request, as the reference framework chunks ``upgrade`` (§1.2).
CHUNK = 500
FINAL = frozenset({"Updated", "Error", "Cancelled", "Timeout", "Legacy"})
#: The reference CLI counts Updated and Legacy as success (§9.5).
SUCCEEDED = frozenset({"Updated", "Legacy"})
NO_TASK = "No task"
#: ``watch`` and ``--wait`` give up after this long unless ``--wait-timeout`` says otherwise:
#: twice the manager's default task_timeout (15 min, counted from Updating).
DEFAULT_WAIT_TIMEOUT = 1800.0
ORIGIN = {"name": "cli", "module": "api"}

F = TypeVar("F", bound=Callable[..., Any])


class Unreachable(Exception):
    """The manager's socket cannot be reached or did not answer."""


class Failed(Exception):
    """The operation was refused or failed; the text is the one line shown."""


# --------------------------------------------------------------------------- client


@dataclasses.dataclass(frozen=True)
class Client:
    """Blocking client of one manager's two local sockets."""

    home: Path
    timeout: float = 30.0

    @property
    def upgrade_socket(self) -> Path:
        return self.home / "queue" / "tasks" / "upgrade"

    @property
    def task_socket(self) -> Path:
        return self.home / "queue" / "tasks" / "task"

    def request(self, which: str, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` to the ``upgrade`` or ``task`` socket; the decoded reply."""
        path = self.upgrade_socket if which == "upgrade" else self.task_socket
        payload = json.dumps(message, separators=(",", ":")).encode()
        try:
            raw = request_unix(str(path), payload, timeout=self.timeout)
        except FileNotFoundError:
            raise Unreachable(
                f"no manager socket at {path} (is the manager running? is --home right?)"
            ) from None
        except ConnectionRefusedError:
            raise Unreachable(f"the manager does not answer at {path} (not running?)") from None
        except PermissionError:
            raise Unreachable(
                f"permission denied on {path} (run as the manager's user or group)"
            ) from None
        except TimeoutError:
            raise Unreachable(f"no reply from {path} within {self.timeout:g} s") from None
        except (ConnectionError, OSError, WpkUpgradeError) as exc:
            raise Unreachable(f"{path}: {exc}") from None
        try:
            reply = json.loads(raw.decode("utf-8"))
        except ValueError:
            raise Failed(f"{path}: the reply is not JSON") from None
        if not isinstance(reply, dict) or not isinstance(reply.get("data"), list):
            raise Failed(f"{path}: unexpected reply {raw[:200]!r}")
        return reply

    def data(self, which: str, message: dict[str, Any]) -> list[dict[str, Any]]:
        """The ``data`` items of a successful reply; ``Failed`` for an error envelope."""
        reply = self.request(which, message)
        if reply.get("error"):
            detail = reply.get("detail") or _first_text(reply)
            text = f"{reply.get('message')}"
            raise Failed(f"{text} ({detail})" if detail and detail != text else text)
        return list(reply["data"])

    def task(self, command: str, parameters: dict[str, Any]) -> list[dict[str, Any]]:
        return self.data("task", {"origin": ORIGIN, "command": command, "parameters": parameters})

    def results(self, agents: Sequence[int]) -> list[dict[str, Any]]:
        """``upgrade_result`` items, in the order of ``agents``."""
        items: list[dict[str, Any]] = []
        for chunk in _chunks(agents, CHUNK):
            items.extend(self.task("upgrade_result", {"agents": list(chunk)}))
        return items

    def known_agents(self) -> list[int]:
        return [int(item["agent"]) for item in self.task("agents_list", {})]


def _first_text(reply: dict[str, Any]) -> str:
    data = reply.get("data") or []
    if data and isinstance(data[0], dict):
        return str(data[0].get("message", ""))
    return ""


def _chunks(values: Sequence[int], size: int) -> Iterable[Sequence[int]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def resolve_home(home: str | None, config_path: str | None) -> Path:
    """``--home``, else the ``home`` of ``--config``, else ``$WPK_UPGRADE_HOME``, else the
    default; ``ConfigError`` for an unusable configuration file."""
    if home and config_path:
        raise click.UsageError("give --home or --config, not both")
    if home:
        return Path(home).expanduser().absolute()
    if config_path:
        from .config import load_manager_config

        return load_manager_config(config_path).home
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().absolute()


def _fail(message: str, status: int) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    raise click.exceptions.Exit(status)


def _group_location() -> tuple[str | None, str | None]:
    """``--home`` and ``--config`` given before the command (``wpk-upgrade --home D agents``)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return None, None
    params = ctx.find_root().params
    return params.get("home"), params.get("config_path")


def with_client(func: F) -> F:
    """Add ``--home``, ``--config`` and ``--timeout``; pass ``client``; map failures to one
    line and the documented exit status. Without ``--home``/``--config`` after the command,
    those given before it (on the main group) are used."""

    @functools.wraps(func)
    def wrapper(home: str | None, config_path: str | None, timeout: float, **kwargs: Any) -> Any:
        if home is None and config_path is None:
            home, config_path = _group_location()
        try:
            client = Client(resolve_home(home, config_path), timeout)
        except ConfigError as exc:
            _fail(str(exc), EXIT_USAGE)
        try:
            return func(client=client, **kwargs)
        except Unreachable as exc:
            _fail(str(exc), EXIT_UNREACHABLE)
        except (Failed, WpkUpgradeError) as exc:
            _fail(str(exc), EXIT_FAILED)

    wrapper = click.option(
        "--timeout",
        default=30.0,
        show_default=True,
        type=Seconds(min=0.1, max=86400),
        help="Seconds to wait for each reply of the manager.",
    )(wrapper)
    wrapper = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        help="The manager's configuration file (its home is used).",
    )(wrapper)
    wrapper = click.option(
        "--home",
        type=click.Path(file_okay=False),
        help="The manager's home directory (may also come before the command) "
        f"[default: ${HOME_ENV} or {DEFAULT_HOME}].",
    )(wrapper)
    return wrapper  # type: ignore[return-value]


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)  # type: ignore[return-value]


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


# --------------------------------------------------------------------------- parsing


_ID = re.compile(r"\d+", re.ASCII)


def agent_id(text: str, manager: bool = False) -> int:
    """One agent id of the command line: ``5``, ``005`` and ``0005`` are agent 5. Ids go from
    1 to ``LAST_AGENT_ID``; ``0`` (the manager) only with ``manager`` (the upgrade commands,
    where the manager answers its own error 7). ``click.UsageError`` otherwise."""
    value = text.strip()
    if not _ID.fullmatch(value):
        raise click.UsageError(f"{text!r} is not an agent id (ids are like 5, 005, 5,6 or all)")
    digits = value.lstrip("0") or "0"
    if len(digits) > len(str(LAST_AGENT_ID)) or int(digits) > LAST_AGENT_ID:
        raise click.UsageError(f"agent {value} is out of range; agent ids are 1 to {LAST_AGENT_ID}")
    if digits == "0" and not manager:
        raise click.UsageError(
            f"{value} is the manager, not an agent; agent ids are 1 to {LAST_AGENT_ID}"
        )
    return int(digits)


def parse_agents(
    values: Sequence[str], client: Client | None = None, manager: bool = False
) -> list[int]:
    """Agent ids of the command line (``5``, ``005``, ``5,6``, ``all``) in order, without
    repeats; ``all`` asks the manager for every agent it knows. See ``agent_id``."""
    ids: list[int] = []
    for value in values:
        for part in value.split(","):
            text = part.strip()
            if text.lower() == "all":
                if client is None:
                    raise click.UsageError("'all' is not allowed here; give agent ids")
                ids.extend(client.known_agents())
                continue
            ids.append(agent_id(part, manager))
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise Failed("no agent to act on")
    return unique


#: Largest integer the task store holds (task ids, epoch seconds, limits).
MAX_INT = (1 << 63) - 1
#: Longest wait any option accepts (a year, in seconds).
MAX_SECONDS = 366 * 86400.0


class Seconds(click.FloatRange):
    """A number of seconds: a finite float within the range (NaN and infinities refused,
    which ``FloatRange`` lets through or turns into an overflow later)."""

    name = "seconds"

    def __init__(self, min: float = 0.0, max: float = MAX_SECONDS) -> None:
        super().__init__(min=min, max=max)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        return number


def parse_when(text: str, now: float | None = None) -> int:
    """Epoch seconds of ``--since``/``--until``: epoch seconds, a UTC date or date-time
    (``2025-01-31``, ``2025-01-31T10:00:00Z``, ``2025/01/31 10:00:00``), or a duration ago
    (``30m``, ``2h``, ``7d``)."""
    from .config import parse_duration

    value = text.strip()
    if re.fullmatch(r"\d{9,}", value):
        if int(value) > MAX_INT:
            raise click.BadParameter(f"{text!r}: epoch seconds beyond {MAX_INT}")
        return int(value)
    if re.fullmatch(r"\d+\s*[smhd]", value):
        ago = (time.time() if now is None else now) - parse_duration(value)
        if ago < 0:
            raise click.BadParameter(f"{text!r}: a duration reaching before 1970")
        return int(ago)
    cleaned = value.replace("/", "-").rstrip("Zz").replace("T", " ")
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return int(datetime.strptime(cleaned, fmt).replace(tzinfo=UTC).timestamp())
        except ValueError:
            continue
    raise click.BadParameter(
        f"{text!r}: expected epoch seconds, a UTC date such as 2025-01-31 or "
        "2025-01-31T10:00:00Z, or a duration ago such as 2h or 7d"
    )


def parse_time(text: str | None) -> int | None:
    """Epoch seconds of an ``upgrade_result`` time (UTC ``YYYY/MM/DD hh:mm:ss``; ``"0"``)."""
    if not text or text == "0":
        return None
    try:
        return int(datetime.strptime(text, "%Y/%m/%d %H:%M:%S").replace(tzinfo=UTC).timestamp())
    except ValueError:
        return None


# --------------------------------------------------------------------------- presentation


def human_bytes(n: int) -> str:
    """``512 B``, ``12.0 KiB``, ``3.4 MiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def progress_text(item: dict[str, Any]) -> str:
    progress = item.get("progress")
    if not isinstance(progress, dict) or not progress.get("total"):
        return "-"
    sent, total = int(progress.get("sent", 0)), int(progress["total"])
    return f"{human_bytes(sent)}/{human_bytes(total)} ({100 * sent // total}%)"


def status_of(item: dict[str, Any]) -> str:
    return str(item.get("status") or NO_TASK)


def error_of(item: dict[str, Any]) -> str:
    if item.get("error"):
        return str(item.get("message", ""))
    return str(item.get("error_msg") or "")


def elapsed_of(item: dict[str, Any], now: float | None = None) -> float | None:
    """Seconds since the task was created; up to its last update once it is final."""
    created = parse_time(item.get("create_time"))
    if created is None:
        return None
    updated = parse_time(item.get("update_time"))
    end = updated if status_of(item) in FINAL and updated else (now or time.time())
    return max(0.0, end - created)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Plain aligned columns (stable for scripts and logs)."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    for row in [list(headers), *rows]:
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        click.echo(line.rstrip())


def platform_of(item: dict[str, Any]) -> str:
    os_version = ".".join(str(p) for p in (item.get("os_major"), item.get("os_minor")) if p)
    parts = [item.get("os_platform"), os_version, item.get("os_arch")]
    return " ".join(str(p) for p in parts if p) or "-"


def agent_label(agent: Any) -> str:
    try:
        return f"{int(agent):03d}"
    except (TypeError, ValueError):
        return str(agent)


# --------------------------------------------------------------------------- watch


def final(item: dict[str, Any]) -> bool:
    return bool(item.get("error")) or status_of(item) in FINAL


def succeeded(item: dict[str, Any]) -> bool:
    return not item.get("error") and status_of(item) in SUCCEEDED


def watch_agents(
    client: Client,
    agents: Sequence[int],
    interval: float,
    timeout: float | None,
    live: bool | None,
    as_json: bool,
) -> list[dict[str, Any]]:
    """Poll ``upgrade_result`` until every agent's latest task is final (or ``timeout``),
    showing a live table on a terminal (``live`` None: when stdout is a TTY) and plain
    lines (one per change) otherwise. Returns the last items; ``Failed`` on timeout."""
    use_live = (sys.stdout.isatty() if live is None else live) and not as_json
    if use_live:
        try:
            from rich.console import Console  # noqa: F401
        except ImportError:
            use_live = False
    if use_live:
        return _watch_live(client, agents, interval, timeout, force=bool(live))
    return _watch_plain(client, agents, interval, timeout, quiet=as_json)


def _deadline_passed(start: float, timeout: float | None, items: list[dict[str, Any]]) -> None:
    """``Failed`` naming the agents not final yet once ``timeout`` (None or 0: never) passed."""
    if timeout and time.monotonic() - start >= timeout:
        waiting = [i.get("agent") for i in items if not final(i)]
        labels = ", ".join(agent_label(a) for a in waiting)
        again = ",".join(str(a) for a in waiting)
        raise Failed(
            f"timed out after {timeout:g} s; not final yet: {labels} "
            f"(their upgrades go on: wpk-upgrade watch {again})"
        )


def _watch_plain(
    client: Client, agents: Sequence[int], interval: float, timeout: float | None, quiet: bool
) -> list[dict[str, Any]]:
    start = time.monotonic()
    shown: dict[Any, tuple[Any, ...]] = {}
    while True:
        items = client.results(agents)
        for item in items:
            progress = item.get("progress") or {}
            key = (status_of(item), progress.get("sent"), error_of(item), item.get("task_id"))
            if not quiet and shown.get(item.get("agent")) != key:
                shown[item.get("agent")] = key
                parts = [
                    f"agent {agent_label(item.get('agent'))}",
                    f"{status_of(item):<9}",
                    f"{progress_text(item):<28}",
                    human_duration(elapsed_of(item)),
                ]
                if error_of(item):
                    parts.append(error_of(item))
                click.echo("  ".join(parts).rstrip(), nl=True)
                sys.stdout.flush()
        if all(final(i) for i in items):
            return items
        _deadline_passed(start, timeout, items)
        time.sleep(interval)


def percent_text(item: dict[str, Any]) -> str:
    """``18%``: the short form of ``progress_text`` for a narrow table."""
    progress = item.get("progress")
    if not isinstance(progress, dict) or not progress.get("total"):
        return "-"
    return f"{100 * int(progress.get('sent', 0)) // int(progress['total'])}%"


@dataclasses.dataclass(frozen=True)
class Layout:
    """Column widths of the live table for one terminal width (``None``: column left out)."""

    bar: int | None
    full_bytes: bool | None
    error: int


#: The live table's frame: one rule per column and one more, one space either side of a cell.
_RULES, _PADDING = 1, 2
BAR_MIN, BAR_MAX, ERROR_MIN = 10, 24, 30


def plan_layout(width: int, fixed: int, full_bytes: int, short_bytes: int, error: int) -> Layout:
    """Share ``width`` columns: Agent, Status and Elapsed (``fixed``: their text widths) are
    never cut; the Error column gets at least ``ERROR_MIN`` (it wraps beyond); then the bytes
    (``short_bytes``: the percentage only, else ``full_bytes``), then a progress bar of
    ``BAR_MIN`` columns, then the rest of the error, then a wider bar. What does not fit is
    left out: the bar first, the bytes next."""
    cost = _RULES + _PADDING  # of one more column
    spare = width - _RULES - 4 * cost - fixed
    error_width = max(5, min(error, ERROR_MIN, spare))
    spare -= error_width
    bytes_choice: bool | None = None
    if spare >= short_bytes + cost:
        bytes_choice, spare = False, spare - short_bytes - cost
        if spare >= full_bytes - short_bytes:
            bytes_choice, spare = True, spare - (full_bytes - short_bytes)
    bar: int | None = None
    if spare >= BAR_MIN + cost:
        bar, spare = BAR_MIN, spare - BAR_MIN - cost
    more = max(0, min(error - error_width, spare))
    error_width, spare = error_width + more, spare - more
    if bar is not None:
        bar += max(0, min(BAR_MAX - bar, spare))
    return Layout(bar=bar, full_bytes=bytes_choice, error=error_width)


def _render(items: list[dict[str, Any]], title: str, width: int = 200) -> Any:
    """The live table for a ``width``-column terminal (``plan_layout``)."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    def widest(header: str, cells: Iterable[str]) -> int:
        return max([len(header), *(len(c) for c in cells)])

    agents = [agent_label(i.get("agent")) for i in items]
    statuses = [status_of(i) for i in items]
    elapsed = [human_duration(elapsed_of(i)) for i in items]
    errors = [error_of(i) for i in items]
    fixed = (widest("Agent", agents), widest("Status", statuses), widest("Elapsed", elapsed))
    layout = plan_layout(
        width,
        sum(fixed),
        widest("Bytes", map(progress_text, items)),
        widest("Bytes", map(percent_text, items)),
        widest("Error", errors),
    )
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("Agent", no_wrap=True, min_width=fixed[0])
    table.add_column("Status", no_wrap=True, min_width=fixed[1])
    if layout.bar is not None:
        table.add_column("Progress", no_wrap=True, width=layout.bar)
    if layout.full_bytes is not None:
        table.add_column("Bytes", no_wrap=True)
    table.add_column("Elapsed", no_wrap=True, min_width=fixed[2])
    table.add_column("Error", max_width=layout.error, overflow="fold")
    colours = {"Updated": "green", "Legacy": "green", "Updating": "cyan", "In queue": "blue"}
    for item, label, status, took, error in zip(
        items, agents, statuses, elapsed, errors, strict=True
    ):
        cells: list[Any] = [
            label,
            Text(status, style=colours.get(status, "red" if final(item) else "")),
        ]
        if layout.bar is not None:
            progress = item.get("progress") or {}
            total = int(progress.get("total") or 0)
            cells.append(
                ProgressBar(total=total, completed=int(progress.get("sent", 0)), width=layout.bar)
                if total
                else Text("-")
            )
        if layout.full_bytes is not None:
            cells.append(progress_text(item) if layout.full_bytes else percent_text(item))
        cells += [took, error]
        table.add_row(*cells)
    return table


def _watch_live(
    client: Client, agents: Sequence[int], interval: float, timeout: float | None, force: bool
) -> list[dict[str, Any]]:
    from rich.console import Console
    from rich.live import Live

    console = Console(force_terminal=True) if force else Console()
    start = time.monotonic()
    items = client.results(agents)
    title = f"wpk-upgrade: {len(agents)} agent(s)"
    with Live(_render(items, title, console.width), console=console, refresh_per_second=8) as live:
        while not all(final(i) for i in items):
            _deadline_passed(start, timeout, items)
            time.sleep(interval)
            items = client.results(agents)
            live.update(_render(items, title, console.width))
    return items


def summarize(items: list[dict[str, Any]]) -> int:
    """One summary line on stderr; the exit status (0 when every agent succeeded)."""
    ok = sum(1 for i in items if succeeded(i))
    failed = len(items) - ok
    click.echo(f"{len(items)} agent(s): {ok} succeeded, {failed} failed", err=True)
    return EXIT_OK if failed == 0 else EXIT_FAILED


def watch_options(func: F) -> F:
    func = click.option(
        "--live/--plain",
        default=None,
        help="Live table, or plain lines [default: live table on a terminal].",
    )(func)
    func = click.option(
        "--wait-timeout",
        type=Seconds(min=0),
        default=DEFAULT_WAIT_TIMEOUT,
        metavar="S",
        help="Give up after S seconds, exit 1; the upgrades go on "
        f"[default: {DEFAULT_WAIT_TIMEOUT:g}, 30 minutes; 0: never].",
    )(func)
    func = click.option(
        "--interval",
        type=Seconds(min=0.05, max=3600),
        default=1.0,
        show_default=True,
        help="Seconds between two polls of upgrade_result.",
    )(func)
    return func


# --------------------------------------------------------------------------- commands


def _submit(
    client: Client, command: str, agents: list[int], params: dict[str, Any], as_json: bool
) -> tuple[list[dict[str, Any]], list[int]]:
    """Send ``upgrade``/``upgrade_custom`` in chunks; print each agent's outcome. Returns the
    reply items and the agents whose task was created."""
    items: list[dict[str, Any]] = []
    for chunk in _chunks(agents, CHUNK):
        message = {
            "origin": {"module": "api"},
            "command": command,
            "parameters": {"agents": list(chunk), **params},
        }
        items.extend(client.data("upgrade", message))
    created = [int(i["agent"]) for i in items if not i.get("error") and "task_id" in i]
    if not as_json:
        by_agent = {i.get("agent"): i for i in items}
        for agent in agents:
            item = by_agent.get(agent, {"error": -1, "message": "no answer for this agent"})
            if item.get("error"):
                click.echo(
                    f"agent {agent_label(agent)}: not upgraded: error {item.get('error')} "
                    f"{item.get('message')}"
                )
            else:
                click.echo(f"agent {agent_label(agent)}: task {item.get('task_id')} created")
    return items, created


def _after_submit(
    client: Client,
    agents: list[int],
    items: list[dict[str, Any]],
    created: list[int],
    wait: bool,
    interval: float,
    wait_timeout: float | None,
    live: bool | None,
    as_json: bool,
) -> None:
    all_created = len(created) == len(agents)
    if not wait or not created:
        if as_json:
            emit_json(items)
        raise click.exceptions.Exit(EXIT_OK if all_created else EXIT_FAILED)
    results = watch_agents(client, created, interval, wait_timeout, live, as_json)
    if as_json:
        emit_json({"upgrade": items, "result": results})
    status = summarize(results) if not as_json else (0 if all(map(succeeded, results)) else 1)
    raise click.exceptions.Exit(status if all_created else EXIT_FAILED)


@click.command("upgrade")
@click.argument("agents", nargs=-1, required=True)
@click.option("--version", "-v", "version", help="Target version (vX.Y.Z) [default: newest].")
@click.option("--force", "-F", is_flag=True, help="Skip the version checks (force_upgrade).")
@click.option("--repo", "-r", "repo", help="WPK repository (URL or host/path).")
@click.option("--http", "use_http", is_flag=True, help="http:// for a repository without scheme.")
@click.option("--package-type", type=click.Choice(["rpm", "deb"]), help="Package type override.")
@click.option("--wait", is_flag=True, help="Then follow the upgrades like 'watch'.")
@watch_options
@json_option
@with_client
def upgrade_cmd(
    client: Client,
    agents: tuple[str, ...],
    version: str | None,
    force: bool,
    repo: str | None,
    use_http: bool,
    package_type: str | None,
    wait: bool,
    interval: float,
    wait_timeout: float | None,
    live: bool | None,
    as_json: bool,
) -> None:
    """Upgrade AGENT... from a WPK repository (the reference 'upgrade' message)."""
    if version is not None and not versions.is_valid(version):
        raise click.BadParameter(
            f"{version!r} is not a version such as v4.9.1", param_hint="--version"
        )
    ids = parse_agents(agents, client, manager=True)
    params: dict[str, Any] = {}
    if version:
        params["version"] = versions.normalise(version)
    if repo:
        params["wpk_repo"] = repo
    if use_http:
        params["use_http"] = True
    if force:
        params["force_upgrade"] = True
    if package_type:
        params["package_type"] = package_type
    items, created = _submit(client, "upgrade", ids, params, as_json)
    _after_submit(client, ids, items, created, wait, interval, wait_timeout, live, as_json)


@click.command("upgrade-custom")
@click.argument("agents", nargs=-1, required=True)
@click.option(
    "--file",
    "-f",
    "file_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The WPK file (a path the manager can read).",
)
@click.option("--installer", "-x", help="Installer inside the WPK [default: upgrade.sh/.bat].")
@click.option("--wait", is_flag=True, help="Then follow the upgrades like 'watch'.")
@watch_options
@json_option
@with_client
def upgrade_custom_cmd(
    client: Client,
    agents: tuple[str, ...],
    file_path: str,
    installer: str | None,
    wait: bool,
    interval: float,
    wait_timeout: float | None,
    live: bool | None,
    as_json: bool,
) -> None:
    """Install a local WPK on AGENT... (the reference 'upgrade_custom' message)."""
    if installer is not None and not re.fullmatch(r"[\w,\-.+\s:]+", installer):
        raise click.BadParameter(
            f"{installer!r} is not an installer name", param_hint="--installer"
        )
    ids = parse_agents(agents, client, manager=True)
    params: dict[str, Any] = {"file_path": str(Path(file_path).expanduser().absolute())}
    if installer:
        params["installer"] = installer
    items, created = _submit(client, "upgrade_custom", ids, params, as_json)
    _after_submit(client, ids, items, created, wait, interval, wait_timeout, live, as_json)


def _result_rows(items: list[dict[str, Any]]) -> list[list[str]]:
    return [
        [
            agent_label(i.get("agent")),
            status_of(i),
            str(i.get("task_id", "-")),
            str(i.get("command", "-")),
            str(i.get("create_time", "-")),
            str(i.get("update_time", "-")),
            progress_text(i),
            error_of(i),
        ]
        for i in items
    ]


RESULT_HEADERS = ("AGENT", "STATUS", "TASK", "COMMAND", "CREATED", "UPDATED", "PROGRESS", "ERROR")


@click.command("result")
@click.argument("agents", nargs=-1, required=True)
@json_option
@with_client
def result_cmd(client: Client, agents: tuple[str, ...], as_json: bool) -> None:
    """The latest upgrade task of each AGENT (the reference 'upgrade_result')."""
    items = client.results(parse_agents(agents, client))
    if as_json:
        emit_json(items)
    else:
        print_table(RESULT_HEADERS, _result_rows(items))
    raise click.exceptions.Exit(EXIT_FAILED if any(i.get("error") for i in items) else EXIT_OK)


@click.command("watch")
@click.argument("agents", nargs=-1, required=True)
@watch_options
@json_option
@with_client
def watch_cmd(
    client: Client,
    agents: tuple[str, ...],
    interval: float,
    wait_timeout: float | None,
    live: bool | None,
    as_json: bool,
) -> None:
    """Follow the upgrade of AGENT... until each is final; exit 0 when all succeeded."""
    items = watch_agents(
        client, parse_agents(agents, client), interval, wait_timeout, live, as_json
    )
    if as_json:
        emit_json(items)
        raise click.exceptions.Exit(EXIT_OK if all(map(succeeded, items)) else EXIT_FAILED)
    raise click.exceptions.Exit(summarize(items))


@click.command("agents")
@click.argument("agents", nargs=-1)
@json_option
@with_client
def agents_cmd(client: Client, agents: tuple[str, ...], as_json: bool) -> None:
    """The agents the manager knows (all, or AGENT...): version, platform, status."""
    params: dict[str, Any] = {}
    if agents:
        params["agents"] = parse_agents(agents, client)
    items = client.task("agents_list", params)
    found = {i.get("agent") for i in items}
    unknown = [a for a in params.get("agents", []) if a not in found]
    if as_json:
        emit_json(items)
    elif not items and not agents:
        click.echo("no agents: the manager knows none yet")
    elif items:
        _print_agents(items)
    for a in unknown:
        click.echo(f"agent {agent_label(a)}: unknown agent", err=True)
    raise click.exceptions.Exit(EXIT_FAILED if unknown else EXIT_OK)


def _print_agents(items: list[dict[str, Any]]) -> None:
    rows = [
        [
            agent_label(i.get("agent")),
            str(i.get("name") or "-"),
            str(i.get("version") or "-"),
            platform_of(i),
            str(i.get("connection_status") or "-"),
            str(i.get("node") or "-"),
            str((i.get("upgrade") or {}).get("status", "-")),
        ]
        for i in items
    ]
    print_table(("AGENT", "NAME", "VERSION", "PLATFORM", "STATUS", "NODE", "LAST UPGRADE"), rows)


@click.command("list-outdated")
@click.option("--version", "-v", "version", help="Compare with this version [default: newest].")
@click.option("--repo", "-r", "repo", help="WPK repository giving the newest version.")
@click.option("--http", "use_http", is_flag=True, help="http:// for a repository without scheme.")
@click.option("--package-type", type=click.Choice(["rpm", "deb"]), help="Package type override.")
@json_option
@with_client
def list_outdated_cmd(
    client: Client,
    version: str | None,
    repo: str | None,
    use_http: bool,
    package_type: str | None,
    as_json: bool,
) -> None:
    """Agents older than --version, or than the newest version in the repository for their
    platform (else the manager's version)."""
    if version is not None and not versions.is_valid(version):
        raise click.BadParameter(
            f"{version!r} is not a version such as v4.9.1", param_hint="--version"
        )
    target: dict[str, Any] = {"use_http": use_http}
    if version:
        target["version"] = versions.normalise(version)
    if repo:
        target["wpk_repo"] = repo
    if package_type:
        target["package_type"] = package_type
    items = client.task("agents_list", {"target": target})
    outdated = [i for i in items if i.get("outdated") is True]
    unknown = [i for i in items if i.get("outdated") is None]
    if as_json:
        emit_json(outdated)
    elif not outdated:
        click.echo(f"no outdated agents ({_not_outdated_text(items, unknown)})")
    else:
        rows = [
            [
                agent_label(i.get("agent")),
                str(i.get("name") or "-"),
                str(i.get("version") or "-"),
                str(i.get("target")),
                platform_of(i),
                str(i.get("connection_status") or "-"),
            ]
            for i in outdated
        ]
        print_table(("AGENT", "NAME", "VERSION", "NEWEST", "PLATFORM", "STATUS"), rows)
    if unknown:
        labels = ", ".join(agent_label(i.get("agent")) for i in unknown)
        click.echo(
            f"note: cannot tell for agent(s) {labels} (unknown version, or no target: "
            "give --version or --repo)",
            err=True,
        )


def _not_outdated_text(items: list[dict[str, Any]], unknown: list[dict[str, Any]]) -> str:
    if not items:
        return "the manager knows no agents"
    current = len(items) - len(unknown)
    text = f"{current} agent(s) at or above the target version"
    return f"{text}, {len(unknown)} that cannot be told" if unknown else text


@click.command("tasks")
@click.option("--status", "-s", "statuses", multiple=True, help="Only this status (repeatable).")
@click.option("--agent", "-a", "agent_ids", multiple=True, help="Only this agent (repeatable).")
@click.option("--node", "-n", help="Only tasks of this manager node.")
@click.option("--since", help="Created at or after (UTC date, epoch or a duration ago: 2h).")
@click.option("--until", help="Created at or before (same forms as --since).")
@click.option(
    "--limit",
    type=click.IntRange(min=0, max=MAX_INT),
    default=100,
    show_default=True,
    help="0: no limit.",
)
@json_option
@with_client
def tasks_cmd(
    client: Client,
    statuses: tuple[str, ...],
    agent_ids: tuple[str, ...],
    node: str | None,
    since: str | None,
    until: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """Tasks of the store, newest first, with filters."""
    from .admin import AdminRequestError, parse_status

    params: dict[str, Any] = {"limit": limit}
    if statuses:
        try:
            params["statuses"] = [parse_status(s).value for s in statuses]
        except AdminRequestError as exc:
            raise click.BadParameter(str(exc), param_hint="--status") from None
    if agent_ids:
        params["agents"] = parse_agents(agent_ids)
    if node:
        params["node"] = node
    if since:
        params["since"] = parse_when(since)
    if until:
        params["until"] = parse_when(until)
    items = client.task("tasks_list", params)
    if as_json:
        emit_json(items)
        return
    if not items:
        filtered = len(params) > 1  # more than the limit
        click.echo("no tasks match these filters" if filtered else "no tasks in the store")
        return
    rows = [
        [
            str(i.get("task_id")),
            agent_label(i.get("agent")),
            str(i.get("node")),
            str(i.get("command")),
            status_of(i),
            str(i.get("create_time")),
            str(i.get("update_time")),
            error_of(i),
        ]
        for i in items
    ]
    print_table(("TASK", "AGENT", "NODE", "COMMAND", "STATUS", "CREATED", "UPDATED", "ERROR"), rows)


class TaskId(click.IntRange):
    name = "task id"


@click.command("history")
@click.argument("task_id", type=TaskId(min=1, max=MAX_INT))
@json_option
@with_client
def history_cmd(client: Client, task_id: int, as_json: bool) -> None:
    """Every status change of TASK_ID, oldest first."""
    items = client.task("task_history", {"task_id": task_id})
    if as_json:
        emit_json(items)
        return
    rows = [
        [
            str(i.get("time")),
            str(i.get("from") or "-"),
            str(i.get("to")),
            str(i.get("node") or "-"),
            str(i.get("reason") or ""),
        ]
        for i in items
    ]
    print_table(("TIME", "FROM", "TO", "NODE", "REASON"), rows)


@click.command("cancel")
@click.argument("agents", nargs=-1, required=True)
@json_option
@with_client
def cancel_cmd(client: Client, agents: tuple[str, ...], as_json: bool) -> None:
    """Cancel the queued or running task of each AGENT (before its installer runs)."""
    ids = parse_agents(agents, client)
    items: list[dict[str, Any]] = []
    for chunk in _chunks(ids, CHUNK):
        items.extend(client.task("upgrade_cancel", {"agents": list(chunk)}))
    if as_json:
        emit_json(items)
    else:
        for item in items:
            label = agent_label(item.get("agent"))
            if item.get("error") and item.get("task_id") is not None:  # installer started
                task_id, message = item["task_id"], item.get("message")
                click.echo(f"agent {label}: task {task_id} not cancelled ({message})")
            elif item.get("error"):
                click.echo(f"agent {label}: nothing to cancel ({item.get('message')})")
            else:
                click.echo(f"agent {label}: task {item.get('task_id')} cancelled")
    raise click.exceptions.Exit(EXIT_FAILED if any(i.get("error") for i in items) else EXIT_OK)


# --------------------------------------------------------------------------- config check


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def check_manager_config(path: str) -> dict[str, Any]:
    """Load a manager configuration and the options of every driver it names; the effective
    configuration (API tokens masked). ``WpkUpgradeError`` on any fault."""
    from .config import load_manager_config
    from .daemon import open_store, open_transport
    from .sources import SourceRegistry

    config = load_manager_config(path)
    open_store(config)
    open_transport(config).check("manager")
    if config.api.enabled and config.api.cert:
        from .api import tls_context

        tls_context(config)
    registry = SourceRegistry(config.sources)
    for name in config.sources:
        registry.get(name)
    effective = _plain(config)
    effective["api"]["tokens"] = ["***"] * len(config.api.tokens)
    return dict(effective)


def check_agent_config(path: str) -> dict[str, Any]:
    """Load an agent configuration and its transport options; the effective configuration."""
    from .agent.config import load_agent_config
    from .drivers import TRANSPORTS, driver_class, load_options

    config = load_agent_config(path)
    cls = driver_class(TRANSPORTS, config.manager.transport)
    cls(load_options(cls, config.manager.options, "manager.options")).check("agent")
    return dict(_plain(config))


def _kind_hint(path: str, is_agent: bool) -> str:
    """A hint when FILE looks like the other kind of configuration than the one checked."""
    from .config import read_toml

    try:
        data = read_toml(path)
    except WpkUpgradeError:
        return ""
    if not is_agent and isinstance(data.get("agent"), dict):
        return " (the file has an [agent] table: check an agent configuration with --agent)"
    if is_agent and "agent" not in data and isinstance(data.get("store"), dict):
        return " (the file has a [store] table: a manager configuration is checked without --agent)"
    return ""


@click.group("config")
def config_group() -> None:
    """Configuration files."""


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--agent", "is_agent", is_flag=True, help="FILE is an agent configuration.")
@json_option
def config_check_cmd(file: str, is_agent: bool, as_json: bool) -> None:
    """Validate a manager (or, with --agent, an agent) configuration FILE; exit 2 when it is
    invalid. --json prints the effective configuration with every default."""
    kind = "agent" if is_agent else "manager"
    try:
        effective = check_agent_config(file) if is_agent else check_manager_config(file)
    except WpkUpgradeError as exc:
        text = str(exc)
        if not text.startswith(f"{file}:"):  # driver options and files: say which file
            text = f"{file}: {text}"
        _fail(text + _kind_hint(file, is_agent), EXIT_USAGE)
    if as_json:
        emit_json(effective)
    else:
        click.echo(f"{file}: valid {kind} configuration (home {effective['home']})")


# --------------------------------------------------------------------------- attach

COMMANDS: tuple[click.Command, ...] = (
    upgrade_cmd,
    upgrade_custom_cmd,
    result_cmd,
    watch_cmd,
    agents_cmd,
    list_outdated_cmd,
    tasks_cmd,
    history_cmd,
    cancel_cmd,
    config_group,
)


def attach(group: click.Group) -> None:
    """Add the operator commands to the main ``wpk-upgrade`` group."""
    for command in COMMANDS:
        group.add_command(command)
