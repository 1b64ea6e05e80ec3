"""The ``wpk-upgrade`` command line: daemons, the raw socket client, WPK tools, the demo.

A thin shell over library objects. Every ``WpkUpgradeError`` is printed as one line on stderr
with a non-zero exit status; never a traceback. Exit statuses: 0 success, 1 the operation
failed, 2 bad usage or configuration, 3 the daemon cannot be reached.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from . import __version__
from .errors import WpkUpgradeError
from .framing import request_unix

EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


PROG = "wpk-upgrade"


class UsageLine(click.UsageError):
    """A usage error shown as one line: ``error: <message> (see <command> --help)``."""

    def __init__(self, error: click.UsageError) -> None:
        super().__init__(error.format_message(), error.ctx)

    def show(self, file: Any = None) -> None:
        message = self.format_message().strip().rstrip(".")
        if message[:1].isupper() and message[1:2].islower():
            message = message[0].lower() + message[1:]  # click's "No such option", "Missing ..."
        message = " ".join(message.split())
        hint = f" (see {self.ctx.command_path} --help)" if self.ctx is not None else ""
        click.echo(f"error: {message}{hint}", err=True)


class Cli(click.Group):
    """The root group. Every usage error of every command (click's own, or a
    ``click.UsageError`` raised by a command) is shown by ``UsageLine``: one line on stderr,
    exit status 2. ``--help`` and the help a group prints when called alone are untouched."""

    @staticmethod
    def _one_line(error: click.UsageError) -> click.UsageError:
        if isinstance(error, UsageLine | click.exceptions.NoArgsIsHelpError):
            return error
        return UsageLine(error)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise self._one_line(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise self._one_line(exc) from None


@click.group(cls=Cli)
@click.version_option(__version__, prog_name=PROG)
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    metavar="DIR",
    help="The manager's home directory, for the operator commands.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    metavar="FILE",
    help="The manager's configuration file: its home for the operator commands; "
    "the file 'manager' runs.",
)
def cli(home: str | None, config_path: str | None) -> None:
    """Remote upgrade of endpoint agents with signed WPK packages.

    --home and --config may come before the command or after it (the command's own win).
    The operator commands (upgrade ... history) find the manager by --home, else the home of
    --config, else $WPK_UPGRADE_HOME, else /var/lib/wpk-upgrade.
    """


@cli.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Manager configuration file (TOML); required, here or before the command.",
)
@click.option("--log-level", default=None, help="Overrides [logging] level (default INFO).")
@click.pass_context
def manager(ctx: click.Context, config_path: str | None, log_level: str | None) -> None:
    """Run the manager daemon (upgrade and task sockets, agent transport)."""
    from .daemon import run_manager

    config_path = config_path or ctx.find_root().params.get("config_path")
    if not config_path:
        raise click.UsageError("missing option '--config' (the manager's configuration file)")
    sys.exit(run_manager(config_path, log_level))


@cli.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Agent configuration file (TOML).",
)
def agent(config_path: str) -> None:
    """Run the agent daemon."""
    from .agent.daemon import run_agent

    sys.exit(run_agent(config_path))


@cli.command()
@click.argument("socket_path", type=click.Path())
@click.argument("message")
@click.option("--timeout", default=30.0, show_default=True, help="Seconds to wait for the reply.")
@click.option("--raw", is_flag=True, help="Send MESSAGE as-is, even if it is not JSON.")
def send(socket_path: str, message: str, timeout: float, raw: bool) -> None:
    """Send one framed MESSAGE to SOCKET_PATH and print the reply.

    MESSAGE is normally JSON; it is sent as given (use --raw to skip the JSON check).
    """
    if not raw:
        try:
            json.loads(message)
        except ValueError as exc:
            click.echo(f"error: MESSAGE is not JSON ({exc}); use --raw to send it anyway", err=True)
            sys.exit(EXIT_USAGE)
    try:
        reply = request_unix(socket_path, message.encode(), timeout=timeout)
    except FileNotFoundError:
        click.echo(f"error: no socket at {socket_path} (is the daemon running?)", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except (ConnectionError, TimeoutError, OSError) as exc:
        click.echo(f"error: {socket_path}: {exc}", err=True)
        sys.exit(EXIT_UNREACHABLE)
    except WpkUpgradeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    text = reply.decode("utf-8", errors="replace")
    try:
        click.echo(json.dumps(json.loads(text), indent=2))
    except ValueError:
        click.echo(text)


@cli.command()
@click.option("--agents", default=3, show_default=True, help="How many agent processes.")
@click.option("--keep", is_flag=True, help="Keep the temporary directory for inspection.")
def demo(agents: int, keep: bool) -> None:
    """The main job end to end on the embedded default, in a temporary directory."""
    from .demo import run_demo

    sys.exit(run_demo(agents=agents, keep=keep))


@cli.command()
def plugins() -> None:
    """List every hook plugin and driver with where it came from."""
    from .drivers import SOURCES, STORES, TRANSPORTS, available
    from .plugin_manager import HOOK_GROUP, make_plugin_manager

    for group in (SOURCES, STORES, TRANSPORTS):
        click.echo(f"{group}:")
        for name, where in sorted(available(group).items()):
            click.echo(f"  {name:<16} {where}")
    click.echo(f"{HOOK_GROUP}:")
    pm = make_plugin_manager()
    dists: dict[str, Any] = {p: d for p, d in pm.list_plugin_distinfo()}
    for name, plugin in sorted(pm.list_name_plugin()):
        dist = dists.get(plugin)
        origin = f"{dist.project_name} {dist.version}" if dist is not None else "registered"
        click.echo(f"  {name:<20} {origin}")


def _attach_optional() -> None:
    try:
        from .cli_wpk import wpk_group
    except ImportError:  # pragma: no cover - the wpk tools ship with the kernel
        return
    cli.add_command(wpk_group, "wpk")
    from .cli_ca import ca_group

    cli.add_command(ca_group, "ca")
    from .cli_ops import attach

    attach(cli)


_attach_optional()


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name=PROG, standalone_mode=True)
    except WpkUpgradeError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILED)


if __name__ == "__main__":
    main()
