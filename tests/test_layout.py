"""Repository layout (reference §5.1-5.3, §4.4): base URL, package type, arch, path, file name.

The D cases (C054-C061) are reproduced end to end through ``RepositorySource.resolve`` with a
small in-memory repository that records the URLs it is asked for, so ``versions_url`` is
checked exactly as the reference's unit tests do.
"""

from __future__ import annotations

import logging
from typing import IO

import pytest
from shared_cases import case

from wpk_upgrade.errors import UpgradeCode, UpgradeError
from wpk_upgrade.interfaces import ProgressFn, WpkCandidate, WpkQuery
from wpk_upgrade.layout import (
    MAX_BASE_URL,
    base_url,
    default_installer,
    inferred_package_type,
    locate,
    package_type,
    translate_arch,
)
from wpk_upgrade.repository import RepositorySource


class MemoryRepository(RepositorySource):
    """A repository held in a dict (URL -> bytes) that records every read."""

    name = "memory"

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__()
        self.files = files
        self.reads: list[str] = []

    def read_text(self, url: str, limit: int) -> str:
        self.reads.append(url)
        if url not in self.files:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, f"{url}: not found")
        return self.files[url][:limit].decode()

    def fetch(
        self, candidate: WpkCandidate, out: IO[bytes], offset: int, progress: ProgressFn
    ) -> None:
        out.write(self.files[candidate.url][offset:])


VERSIONS_C054 = b"v3.13.1 4a313b1312c23a213f2e3209fe0909dd\nv4.0.0 231ef123a32d312b4123c21313ee6780"


def agent_query(
    platform: str,
    major: str | None,
    minor: str | None,
    arch: str | None,
    target: str,
    *,
    requested: str | None = None,
    force: bool = False,
    use_http: bool = False,
    wpk_repo: str | None = None,
) -> WpkQuery:
    """What the kernel builds for one agent: base URL (§5.1) and package type (§5.3)."""
    return WpkQuery(
        base_url=base_url(wpk_repo, None, target, use_http),
        version=target,
        os_platform=platform,
        os_major=major,
        os_minor=minor,
        os_arch=arch,
        package_type=package_type(platform, requested, force),
    )


# --------------------------------------------------------------------------- D cases


def test_c054_windows_default_4x_repository() -> None:
    expected = case("C054")["expected"]
    q = agent_query("windows", "10", "0", "x64", "v4.0.0")
    src = MemoryRepository({"https://packages.wazuh.com/4.x/wpk/windows/versions": VERSIONS_C054})
    cand = src.resolve(q)
    assert src.reads == [expected["versions_url"]]
    assert src.reads == ["https://packages.wazuh.com/4.x/wpk/windows/versions"]
    assert cand.url == expected["wpk_repository"] + expected["wpk_file"]
    assert cand.file_name == "wazuh_agent_v4.0.0_windows.wpk"
    assert cand.sha1 == expected["wpk_sha1"] == "231ef123a32d312b4123c21313ee6780"


def test_c055_use_http_and_3x_repository() -> None:
    expected = case("C055")["expected"]
    q = agent_query("windows", "10", "0", "x64", "v3.13.1", use_http=True)
    src = MemoryRepository({"http://packages.wazuh.com/wpk/windows/versions": VERSIONS_C054})
    cand = src.resolve(q)
    assert src.reads == [expected["versions_url"]]
    assert cand.file_name == expected["wpk_file"] == "wazuh_agent_v3.13.1_windows.wpk"
    assert cand.sha1 == expected["wpk_sha1"] == "4a313b1312c23a213f2e3209fe0909dd"


def test_c055_repository_with_scheme_used_verbatim() -> None:
    assert base_url("http://mirror.local/wpk", None, "v4.2.0", False) == "http://mirror.local/wpk/"
    assert base_url("https://mirror.local/wpk/", None, "v4.2.0", True) == (
        "https://mirror.local/wpk/"
    )
    assert base_url("mirror.local/wpk", None, "v4.2.0", True) == "http://mirror.local/wpk/"
    assert base_url("mirror.local/wpk", None, "v4.2.0", False) == "https://mirror.local/wpk/"


@pytest.mark.parametrize(
    ("key", "platform", "major", "minor", "arch", "versions_url", "wpk_file"),
    [
        (
            "ubuntu",
            "ubuntu",
            "16",
            "04",
            "x64",
            "https://packages.wazuh.com/wpk/ubuntu/16.04/x64/versions",
            "wazuh_agent_v3.3.0_ubuntu_16.04_x64.wpk",
        ),
        (
            "rhel",
            "rhel",
            "6",
            "10",
            "x86",
            "https://packages.wazuh.com/wpk/rhel/6/x86/versions",
            "wazuh_agent_v3.3.0_rhel_6_x86.wpk",
        ),
    ],
)
def test_c057_linux_below_3_4(
    key: str,
    platform: str,
    major: str,
    minor: str,
    arch: str,
    versions_url: str,
    wpk_file: str,
) -> None:
    expected = case("C057")["expected"][key]
    assert (versions_url, wpk_file) == (expected["versions_url"], expected["wpk_file"])
    dir_url, file_name = locate(agent_query(platform, major, minor, arch, "v3.3.0"))
    assert dir_url + "versions" == versions_url
    assert file_name == wpk_file


@pytest.mark.parametrize(
    ("variant", "platform", "major", "minor", "arch"),
    [
        ("a", "centos", "8", "4", "x86_64"),
        ("b", "centos", "8", "4", "aarch64"),
        ("c", "ubuntu", "18", "04", "x86_64"),
        ("d", "ubuntu", "18", "04", "aarch64"),
    ],
)
def test_c058_linux_package_typed(
    variant: str, platform: str, major: str, minor: str, arch: str
) -> None:
    versions_url, wpk_file = case("C058")["expected"][variant]
    dir_url, file_name = locate(agent_query(platform, major, minor, arch, "v4.9.0"))
    assert dir_url + "versions" == versions_url
    assert file_name == wpk_file


def test_c058_expected_values() -> None:
    q = agent_query
    assert locate(q("centos", "8", "4", "x86_64", "v4.9.0")) == (
        "https://packages.wazuh.com/4.x/wpk/linux/rpm/x86_64/",
        "wazuh_agent_v4.9.0_linux_x86_64.rpm.wpk",
    )
    assert locate(q("centos", "8", "4", "aarch64", "v4.9.0")) == (
        "https://packages.wazuh.com/4.x/wpk/linux/rpm/aarch64/",
        "wazuh_agent_v4.9.0_linux_aarch64.rpm.wpk",
    )
    assert locate(q("ubuntu", "18", "04", "x86_64", "v4.9.0")) == (
        "https://packages.wazuh.com/4.x/wpk/linux/deb/amd64/",
        "wazuh_agent_v4.9.0_linux_amd64.deb.wpk",
    )
    assert locate(q("ubuntu", "18", "04", "aarch64", "v4.9.0")) == (
        "https://packages.wazuh.com/4.x/wpk/linux/deb/arm64/",
        "wazuh_agent_v4.9.0_linux_arm64.deb.wpk",
    )


def test_c060_package_type_override_without_force(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="wpk_upgrade.layout"):
        q = agent_query("centos", "8", "4", "x86_64", "v4.9.0", requested="deb")
    assert q.package_type == "rpm"
    assert locate(q) == (
        "https://packages.wazuh.com/4.x/wpk/linux/rpm/x86_64/",
        "wazuh_agent_v4.9.0_linux_x86_64.rpm.wpk",
    )
    assert (
        "Agent '0' with platform 'centos' won't be upgraded using package 'deb' without the "
        "force option. Ignoring..."
    ) in caplog.text


def test_c060_package_type_override_with_force() -> None:
    centos = agent_query("centos", "8", "4", "x86_64", "v4.9.0", requested="deb", force=True)
    assert locate(centos) == (
        "https://packages.wazuh.com/4.x/wpk/linux/deb/amd64/",
        "wazuh_agent_v4.9.0_linux_amd64.deb.wpk",
    )
    ubuntu = agent_query("ubuntu", "18", "04", "x86_64", "v4.9.0", requested="rpm", force=True)
    assert locate(ubuntu) == (
        "https://packages.wazuh.com/4.x/wpk/linux/rpm/x86_64/",
        "wazuh_agent_v4.9.0_linux_x86_64.rpm.wpk",
    )
    ubuntu_no_force = agent_query("ubuntu", "18", "04", "x86_64", "v4.9.0", requested="rpm")
    assert locate(ubuntu_no_force)[0].endswith("/linux/deb/amd64/")


def test_c061_unknown_platform_without_package_type(caplog: pytest.LogCaptureFixture) -> None:
    expected = case("C061")["expected"]["no_package_type"]
    with caplog.at_level(logging.WARNING, logger="wpk_upgrade.layout"):
        q = agent_query("unsupported", "8", None, "x86_64", "v4.9.0")
    assert q.package_type is None
    assert (
        "Agent '0' with unsupported platform 'unsupported' won't be upgraded without a default "
        "package."
    ) in caplog.text
    with pytest.raises(UpgradeError) as info:
        locate(q)
    assert info.value.code == expected["code"] == UpgradeCode.SYSTEM_NOT_SUPPORTED
    assert info.value.text == expected["message"]
    src = MemoryRepository({})
    with pytest.raises(UpgradeError) as info:
        src.resolve(q)
    assert info.value.code == UpgradeCode.SYSTEM_NOT_SUPPORTED
    assert src.reads == []


@pytest.mark.parametrize("pkg", ["rpm", "deb"])
def test_c061_unknown_platform_with_package_type(pkg: str) -> None:
    expected = case("C061")["expected"][pkg]
    q = agent_query("unsupported", "8", None, "i386", "v4.9.0", requested=pkg)
    dir_url, file_name = locate(q)
    assert f"{dir_url} + {file_name}" == expected
    assert dir_url == f"https://packages.wazuh.com/4.x/wpk/linux/{pkg}/i386/"
    assert file_name == f"wazuh_agent_v4.9.0_linux_i386.{pkg}.wpk"


# --------------------------------------------------------------------------- §5.2 table


def test_reference_unit_test_examples() -> None:
    assert locate(agent_query("windows", "10", "0", "x86_64", "v4.2.0"))[0] + "versions" == (
        "https://packages.wazuh.com/4.x/wpk/windows/versions"
    )
    dir_url, name = locate(agent_query("darwin", "14", "1", "x86_64", "v4.9.0"))
    assert dir_url + "versions" == "https://packages.wazuh.com/4.x/wpk/macos/pkg/intel64/versions"
    assert name == "wazuh_agent_v4.9.0_macos_intel64.pkg.wpk"
    dir_url, name = locate(agent_query("ubuntu", "16", "04", "x64", "v3.3.0"))
    assert dir_url == "https://packages.wazuh.com/wpk/ubuntu/16.04/x64/"
    assert name == "wazuh_agent_v3.3.0_ubuntu_16.04_x64.wpk"


@pytest.mark.parametrize(
    ("platform", "arch", "target", "directory", "file_name"),
    [
        ("windows", "i386", "v4.14.1", "windows/", "wazuh_agent_v4.14.1_windows.wpk"),
        ("darwin", "aarch64", "v4.14.2", "macos/pkg/arm64/",
         "wazuh_agent_v4.14.2_macos_arm64.pkg.wpk"),
        ("darwin", "x86_64", "v4.8.2", "macos/x86_64/pkg/", "wazuh_agent_v4.8.2_macos_x86_64.wpk"),
        ("debian", "x86_64", "v4.8.2", "linux/x86_64/", "wazuh_agent_v4.8.2_linux_x86_64.wpk"),
        ("centos", "x86_64", "v3.4.0", "linux/x86_64/", "wazuh_agent_v3.4.0_linux_x86_64.wpk"),
        ("centos", "x86_64", "v3.3.9", "centos/7/x86_64/",
         "wazuh_agent_v3.3.9_centos_7_x86_64.wpk"),
        ("ubuntu", "i386", "v3.2.0", "ubuntu/22.04/i386/",
         "wazuh_agent_v3.2.0_ubuntu_22.04_i386.wpk"),
        ("opensuse-tumbleweed", "x86_64", "v4.10.0", "linux/rpm/x86_64/",
         "wazuh_agent_v4.10.0_linux_x86_64.rpm.wpk"),
    ],
)  # fmt: skip
def test_layout_table(
    platform: str, arch: str, target: str, directory: str, file_name: str
) -> None:
    major, minor = ("22", "04") if platform == "ubuntu" else ("7", "9")
    q = agent_query(platform, major, minor, arch, target, wpk_repo="https://m.example/r")
    assert locate(q) == ("https://m.example/r/" + directory, file_name)


def test_target_version_used_as_given() -> None:
    q = agent_query("windows", None, None, None, "4.2.0", wpk_repo="https://m/")
    assert locate(q) == ("https://m/windows/", "wazuh_agent_4.2.0_windows.wpk")


def test_missing_agent_data_is_9() -> None:
    for q in (
        agent_query("centos", "7", "9", None, "v4.2.0"),
        agent_query("ubuntu", "16", None, "x64", "v3.3.0"),
        agent_query("rhel", None, None, "x86", "v3.3.0"),
        agent_query("centos", "7", "9", "../x", "v4.2.0"),
    ):
        with pytest.raises(UpgradeError) as info:
            locate(q)
        assert info.value.code == UpgradeCode.SYSTEM_NOT_SUPPORTED


@pytest.mark.parametrize("target", ["v.4.1", "latest", "", "v4.2.0/../x"])
def test_unusable_target_is_15(target: str) -> None:
    q = WpkQuery("https://m/", target, "windows", None, None, "x86_64", "msi")
    with pytest.raises(UpgradeError) as info:
        locate(q)
    assert info.value.code == UpgradeCode.WPK_VERSION_DOES_NOT_EXIST


# --------------------------------------------------------------------------- base URL (§5.1)


def test_base_url_defaults() -> None:
    assert base_url(None, None, "v4.2.0", False) == "https://packages.wazuh.com/4.x/wpk/"
    assert base_url(None, None, "v3.13.1", False) == "https://packages.wazuh.com/wpk/"
    assert base_url(None, None, "4.9.0", True) == "http://packages.wazuh.com/4.x/wpk/"
    assert base_url(None, None, "v5.0.0", False) == "https://packages.wazuh.com/5.x/wpk/"
    assert base_url(None, None, "v10.1.2", False) == "https://packages.wazuh.com/10.x/wpk/"
    assert base_url("", "", "v4.2.0", False) == "https://packages.wazuh.com/4.x/wpk/"


def test_base_url_precedence() -> None:
    assert base_url("req.example/a", "conf.example/b", "v4.2.0", False) == (
        "https://req.example/a/"
    )
    assert base_url(None, "conf.example/b/", "v4.2.0", False) == "https://conf.example/b/"
    # a configured repository applies to every target, even one whose major cannot be parsed
    assert base_url(None, "conf.example/b", "garbage", False) == "https://conf.example/b/"


@pytest.mark.parametrize("target", ["v.4.1", "latest", "", "4.1"])
def test_base_url_unparseable_major_is_15(target: str) -> None:
    with pytest.raises(UpgradeError) as info:
        base_url(None, None, target, False)
    assert info.value.code == UpgradeCode.WPK_VERSION_DOES_NOT_EXIST


def test_base_url_scheme_is_a_prefix_not_a_substring() -> None:
    # reference §11 item 7: the reference would use this verbatim (no scheme at all)
    assert base_url("mirror.example/http://x", None, "v4.2.0", False) == (
        "https://mirror.example/http://x/"
    )
    assert base_url("HTTPS://Mirror.Example/wpk", None, "v4.2.0", True) == (
        "HTTPS://Mirror.Example/wpk/"
    )
    assert base_url("file:///srv/wpk", None, "v4.2.0", False) == "file:///srv/wpk/"
    assert base_url("s3://bucket/wpk/", None, "v4.2.0", True) == "s3://bucket/wpk/"


def test_base_url_length_cap() -> None:
    ok = "https://m.example/" + "a" * (MAX_BASE_URL - len("https://m.example/") - 1)
    assert base_url(ok, None, "v4.2.0", False) == ok + "/"
    with pytest.raises(UpgradeError) as info:
        base_url(ok + "bb", None, "v4.2.0", False)
    assert info.value.code == UpgradeCode.URL_NOT_FOUND
    assert str(MAX_BASE_URL) in info.value.detail


# --------------------------------------------------------------------------- package type, arch


@pytest.mark.parametrize("platform", ["debian", "ubuntu"])
def test_deb_platforms(platform: str) -> None:
    assert inferred_package_type(platform) == "deb"


@pytest.mark.parametrize(
    "platform",
    [
        "amzn",
        "centos",
        "fedora",
        "ol",
        "opensuse",
        "opensuse-leap",
        "opensuse-tumbleweed",
        "rhel",
        "sles",
        "suse",
        "rocky",
        "almalinux",
    ],
)
def test_rpm_platforms(platform: str) -> None:
    assert inferred_package_type(platform) == "rpm"


def test_other_platform_types() -> None:
    assert inferred_package_type("windows") == "msi"
    assert inferred_package_type("darwin") == "pkg"
    for platform in ("alpine", "arch", "gentoo", "", None):
        assert inferred_package_type(platform) is None


def test_package_type_rules() -> None:
    assert package_type("centos", None, False) == "rpm"
    assert package_type("centos", "rpm", False) == "rpm"
    assert package_type("centos", "deb", False) == "rpm"
    assert package_type("centos", "deb", True) == "deb"
    assert package_type("windows", "deb", False) == "msi"
    assert package_type("alpine", "deb", False) == "deb"
    assert package_type("alpine", "rpm", True) == "rpm"
    assert package_type("alpine", None, True) is None


@pytest.mark.parametrize(
    ("arch", "pkg", "expected"),
    [
        ("x86_64", "deb", "amd64"),
        ("aarch64", "deb", "arm64"),
        ("x86_64", "pkg", "intel64"),
        ("aarch64", "pkg", "arm64"),
        ("x86_64", "rpm", "x86_64"),
        ("aarch64", "rpm", "aarch64"),
        ("i386", "deb", "i386"),
        ("i386", "rpm", "i386"),
        ("armv7l", "deb", "armv7l"),
        ("x86_64", None, "x86_64"),
        ("x86_64", "msi", "x86_64"),
    ],
)
def test_translate_arch(arch: str, pkg: str | None, expected: str) -> None:
    assert translate_arch(arch, pkg) == expected


def test_default_installer() -> None:
    assert default_installer("windows") == "upgrade.bat"
    assert default_installer("ubuntu") == "upgrade.sh"
    assert default_installer("darwin") == "upgrade.sh"
    assert default_installer(None) == "upgrade.sh"
