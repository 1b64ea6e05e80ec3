"""The agent's TOML configuration: defaults, reference rules (§9.2), our fixes, error messages,
and the identity the agent announces (version file, OS detection)."""

from __future__ import annotations

from pathlib import Path

import pytest

from wpk_upgrade.agent.config import load_agent_config
from wpk_upgrade.agent.identity import detect_os, identity_fn, parse_os_release, read_version
from wpk_upgrade.errors import ConfigError

FULL = """
home = "{home}"
[agent]
id = 5
name = "web-01"
version_file = "etc/version"
os_platform = "Ubuntu"
os_major = "22"
os_minor = "04"
os_arch = "x86_64"
[manager]
transport = "tcp"
options = {{ address = "127.0.0.1:1516" }}
[upgrade]
enabled = true
notification_wait_start = "30s"
notification_wait_max = "1h"
notification_wait_factor = 1.5
result_wait = 2
installer_timeout = "2m"
max_restart_lock = "600s"
[upgrade.ca_verification]
enabled = true
ca_store = ["etc/wpk_root.pem", "/opt/ca/dir"]
[logging]
level = "DEBUG"
file = "logs/agent.log"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def minimal(tmp_path: Path, extra: str = "") -> str:
    return f'home = "{tmp_path}"\n[agent]\nid = 5\n{extra}'


def test_full_file(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, FULL.format(home=tmp_path)))
    assert config.home == tmp_path
    assert config.agent.id == 5 and config.agent.name == "web-01"
    assert config.agent.os_platform == "ubuntu"
    assert (config.agent.os_major, config.agent.os_minor, config.agent.os_arch) == (
        "22",
        "04",
        "x86_64",
    )
    assert config.manager.transport == "tcp"
    assert config.manager.options == {"address": "127.0.0.1:1516"}
    up = config.upgrade
    assert up.enabled
    assert (up.notification_wait_start, up.notification_wait_max) == (30, 3600)
    assert up.notification_wait_factor == 1.5  # fractional: reference bug §11.16 fixed
    assert (up.result_wait, up.installer_timeout, up.max_restart_lock) == (2, 120, 600)
    assert config.ca_stores == (tmp_path / "etc" / "wpk_root.pem", Path("/opt/ca/dir"))
    assert config.log_file == tmp_path / "logs" / "agent.log"
    assert config.source_path == str(tmp_path / "agent.toml")


def test_defaults_and_layout(tmp_path: Path) -> None:
    config = load_agent_config(write(tmp_path, minimal(tmp_path)))
    up = config.upgrade
    assert up.enabled
    assert (up.notification_wait_start, up.notification_wait_max) == (30, 3600)
    assert up.notification_wait_factor == 2.0
    assert (up.result_wait, up.installer_timeout, up.max_restart_lock) == (30, 60, 600)
    assert config.ca_stores == (tmp_path / "etc" / "wpk_root.pem",)
    assert config.agent.os_platform is None  # detected at run time
    assert config.manager.transport == "tcp"
    assert config.logging.level == "INFO" and config.log_file is None
    assert config.max_message_size == 65536
    assert config.version_file == tmp_path / "etc" / "version"
    assert config.incoming_dir == tmp_path / "var" / "incoming"
    assert config.result_file == tmp_path / "var" / "upgrade" / "upgrade_result"
    assert config.pid_file == tmp_path / "var" / "run" / "agent.pid"
    assert config.state_file == tmp_path / "var" / "run" / "agent.state"
    assert config.socket_path == tmp_path / "queue" / "sockets" / "upgrade"


def test_ca_verification_disabled_means_no_stores(tmp_path: Path) -> None:
    text = minimal(tmp_path, "[upgrade.ca_verification]\nenabled = false\n")
    assert load_agent_config(write(tmp_path, text)).ca_stores is None


def test_float_seconds_for_short_waits(tmp_path: Path) -> None:
    text = minimal(tmp_path, "[upgrade]\nresult_wait = 0.2\nnotification_wait_start = 0.05\n")
    up = load_agent_config(write(tmp_path, text)).upgrade
    assert (up.result_wait, up.notification_wait_start) == (0.2, 0.05)


def test_max_restart_lock_may_be_zero(tmp_path: Path) -> None:
    text = minimal(tmp_path, "[upgrade]\nmax_restart_lock = 0\n")
    assert load_agent_config(write(tmp_path, text)).upgrade.max_restart_lock == 0


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[upgrade]\nnotification_wait_start = 0\n", "upgrade.notification_wait_start"),
        ("[upgrade]\nnotification_wait_start = '5x'\n", "upgrade.notification_wait_start"),
        ("[upgrade]\nnotification_wait_max = -3\n", "upgrade.notification_wait_max"),
        ("[upgrade]\nnotification_wait_factor = 1\n", "upgrade.notification_wait_factor"),
        ("[upgrade]\nnotification_wait_factor = 0.5\n", "upgrade.notification_wait_factor"),
        ("[upgrade]\nnotification_wait_factor = 'x'\n", "upgrade.notification_wait_factor"),
        (
            "[upgrade]\nnotification_wait_start = '2h'\nnotification_wait_max = '1h'\n",
            "upgrade.notification_wait_max",
        ),
        ("[upgrade]\ninstaller_timeout = 0\n", "upgrade.installer_timeout"),
        ("[upgrade]\ninstaller_timeout = '2h'\n", "upgrade.installer_timeout"),
        ("[upgrade]\nmax_restart_lock = 3601\n", "upgrade.max_restart_lock"),
        ("[upgrade]\nenabled = 'maybe'\n", "upgrade.enabled"),
        ("[upgrade]\nresult_wait = true\n", "upgrade.result_wait"),
        ("[upgrade.ca_verification]\nca_store = []\n", "upgrade.ca_verification.ca_store"),
        ("[upgrade]\nunknown = 1\n", "upgrade.unknown"),
        ("[logging]\nlevel = 'LOUD'\n", "logging.level"),
        ("max_message_size = 10\n", "max_message_size"),
    ],
)
def test_invalid_values_name_file_and_key(tmp_path: Path, extra: str, key: str) -> None:
    top_level = not extra.startswith("[")
    path = write(tmp_path, extra + minimal(tmp_path) if top_level else minimal(tmp_path) + extra)
    with pytest.raises(ConfigError) as err:
        load_agent_config(path)
    assert str(path) in str(err.value)
    assert f"{key}:" in str(err.value)


@pytest.mark.parametrize(
    ("agent", "message"),
    [
        ("id = 0", "agent.id:"),
        ("id = 1000000", "agent.id:"),
        ("id = '5'", "agent.id:"),
        ("id = 5.0", "agent.id:"),
        ("name = 'x'", "agent.id: Missing data"),
    ],
)
def test_agent_id_rules(tmp_path: Path, agent: str, message: str) -> None:
    path = write(tmp_path, f'home = "{tmp_path}"\n[agent]\n{agent}\n')
    with pytest.raises(ConfigError, match=message):
        load_agent_config(path)


def test_missing_sections_and_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="agent: Missing data"):
        load_agent_config(write(tmp_path, f'home = "{tmp_path}"\n'))
    with pytest.raises(ConfigError, match="home: Missing data"):
        load_agent_config(write(tmp_path, "[agent]\nid = 5\n"))
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_agent_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_agent_config(write(tmp_path, "home = \n"))


# --------------------------------------------------------------------------- identity


def test_identity_reads_version_file_each_time(tmp_path: Path) -> None:
    text = minimal(tmp_path, "name = 'web-01'\nos_platform = 'centos'\nos_major = '7'\n")
    config = load_agent_config(write(tmp_path, text))
    config.version_file.parent.mkdir(parents=True)
    config.version_file.write_text("v4.9.0\n")
    identity = identity_fn(config)
    info = identity()
    assert (info.agent_id, info.name, info.version) == (5, "web-01", "v4.9.0")
    assert (info.os_platform, info.os_major) == ("centos", "7")
    assert info.os_arch  # detected
    assert info.connection_status == "active"
    config.version_file.write_text("Wazuh v4.10.1")
    assert identity().version == "Wazuh v4.10.1"
    config.version_file.write_text("garbage")
    assert identity().version is None
    config.version_file.unlink()
    assert identity().version is None


def test_os_release_parsing(tmp_path: Path) -> None:
    text = 'NAME="Ubuntu"\nID=ubuntu\nVERSION_ID="22.04"\n# comment\nBROKEN\n'
    assert parse_os_release(text) == {"NAME": "Ubuntu", "ID": "ubuntu", "VERSION_ID": "22.04"}
    release = tmp_path / "os-release"
    release.write_text('ID="CentOS"\nVERSION_ID="7"\n')
    found = detect_os(release)
    assert (found.platform, found.major, found.minor) == ("centos", "7", None)
    release.write_text('ID=ubuntu\nVERSION_ID="22.04"\n')
    assert (detect_os(release).major, detect_os(release).minor) == ("22", "04")


def test_read_version_strips(tmp_path: Path) -> None:
    path = tmp_path / "version"
    path.write_text("  v4.2.1  \nsecond line\n")
    assert read_version(path) == "v4.2.1"
