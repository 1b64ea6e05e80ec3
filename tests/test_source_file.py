"""Local-file sources: the ``file://`` repository (contract suite) and ``CustomFileSource``."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest
from marshmallow import ValidationError
from wpk_source_file import (
    CustomFileSource,
    CustomSourceConfigSchema,
    FileRepositorySource,
    path_from_file_url,
)

from wpk_upgrade.cache import WpkCache
from wpk_upgrade.drivers import SOURCES, driver_class
from wpk_upgrade.errors import UpgradeCode, UpgradeError
from wpk_upgrade.testing.source_contract import (
    DirectoryStore,
    WpkSourceContract,
    query_for,
    wpk_bytes,
)
from wpk_upgrade.versions_file import MAX_VERSIONS_SIZE

# --------------------------------------------------------------------------- file:// repository


class TestFileRepositoryContract(WpkSourceContract):
    @pytest.fixture
    def repo(self, tmp_path: Path) -> DirectoryStore:
        root = tmp_path / "mirror dir"  # a space, percent-encoded in the URL
        root.mkdir()
        return DirectoryStore(root, root.as_uri() + "/")

    @pytest.fixture
    def source(self) -> FileRepositorySource:
        return FileRepositorySource()

    @pytest.fixture
    def unreachable_base_url(self, tmp_path: Path) -> str:
        return (tmp_path / "nowhere").as_uri() + "/"


def test_entry_points_name_the_file_sources() -> None:
    assert driver_class(SOURCES, "file") is FileRepositorySource
    assert driver_class(SOURCES, "custom") is CustomFileSource


def test_versions_over_limit_is_14(tmp_path: Path) -> None:
    (tmp_path / "windows").mkdir()
    (tmp_path / "windows" / "versions").write_bytes(b"#" * (MAX_VERSIONS_SIZE + 1))
    src = FileRepositorySource()
    with pytest.raises(UpgradeError) as info:
        src.resolve(query_for(tmp_path.as_uri() + "/", "v4.2.0", "windows"))
    assert info.value.code == UpgradeCode.URL_NOT_FOUND
    assert f"larger than {MAX_VERSIONS_SIZE} bytes" in info.value.detail


def test_path_from_file_url() -> None:
    assert path_from_file_url("file:///srv/wpk%20x/a.wpk") == Path("/srv/wpk x/a.wpk")
    assert path_from_file_url("file://localhost/srv/a") == Path("/srv/a")
    with pytest.raises(ValueError):
        path_from_file_url("file://otherhost/srv/a")
    with pytest.raises(ValueError):
        path_from_file_url("https://host/a")


# --------------------------------------------------------------------------- upgrade_custom


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    d = tmp_path / "allowed"
    d.mkdir()
    return d


@pytest.fixture
def custom(allowed: Path) -> CustomFileSource:
    return CustomFileSource(CustomSourceConfigSchema().load({"allowed_dirs": [str(allowed)]}))


def _refused(src: CustomFileSource, path: str) -> UpgradeError:
    with pytest.raises(UpgradeError) as info:
        src.resolve_path(path)
    assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST
    assert info.value.text == "The WPK file does not exist"
    return info.value


def test_custom_accepts_a_wpk_inside_allowed_dirs(custom: CustomFileSource, allowed: Path) -> None:
    data = wpk_bytes(70_000)
    (allowed / "agent.wpk").write_bytes(data)
    cand = custom.resolve_path(str(allowed / "agent.wpk"))
    assert cand.file_name == "agent.wpk"
    assert cand.sha1 == hashlib.sha1(data).hexdigest()
    assert cand.sha256 == hashlib.sha256(data).hexdigest()
    assert cand.size == len(data)
    ref = custom.obtain_local(str(allowed / "agent.wpk"))
    assert Path(ref.path) == (allowed / "agent.wpk").resolve()
    assert (ref.sha1, ref.size) == (cand.sha1, len(data))


def test_custom_fetch_and_cache(custom: CustomFileSource, allowed: Path, tmp_path: Path) -> None:
    data = wpk_bytes(90_000, b"custom")
    (allowed / "x.wpk").write_bytes(data)
    cand = custom.resolve_path(str(allowed / "x.wpk"))
    out = io.BytesIO()
    out.write(data[:1000])
    custom.fetch(cand, out, 1000, lambda _n: None)
    assert out.getvalue() == data
    ref = WpkCache(tmp_path / "cache").obtain(custom, cand)
    assert Path(ref.path).read_bytes() == data


def test_custom_relative_path_refused(custom: CustomFileSource) -> None:
    assert "not an absolute path" in _refused(custom, "invalid/path/to.wpk").detail


def test_custom_dotdot_refused(custom: CustomFileSource, allowed: Path) -> None:
    (allowed / "a.wpk").write_bytes(b"x")
    err = _refused(custom, str(allowed / "sub" / ".." / "a.wpk"))
    assert "'..'" in err.detail


def test_custom_extension_refused(custom: CustomFileSource, allowed: Path) -> None:
    (allowed / "a.tar").write_bytes(b"x")
    (allowed / ".wpk").write_bytes(b"x")
    assert "not a .wpk file" in _refused(custom, str(allowed / "a.tar")).detail
    assert "not a .wpk file" in _refused(custom, str(allowed / ".wpk")).detail
    assert "not a .wpk file" in _refused(custom, str(allowed / "a.WPK")).detail


def test_custom_outside_allowed_refused(custom: CustomFileSource, tmp_path: Path) -> None:
    (tmp_path / "elsewhere.wpk").write_bytes(b"x")
    assert (
        "outside the allowed directories"
        in _refused(custom, str(tmp_path / "elsewhere.wpk")).detail
    )


def test_custom_allowed_prefix_is_not_enough(custom: CustomFileSource, tmp_path: Path) -> None:
    sibling = tmp_path / "allowed-evil"
    sibling.mkdir()
    (sibling / "a.wpk").write_bytes(b"x")
    assert "outside" in _refused(custom, str(sibling / "a.wpk")).detail


def test_custom_symlink_escaping_refused(
    custom: CustomFileSource, allowed: Path, tmp_path: Path
) -> None:
    (tmp_path / "secret.wpk").write_bytes(b"x")
    (allowed / "link.wpk").symlink_to(tmp_path / "secret.wpk")
    (allowed / "dirlink").symlink_to(tmp_path, target_is_directory=True)
    assert "outside" in _refused(custom, str(allowed / "link.wpk")).detail
    assert "outside" in _refused(custom, str(allowed / "dirlink" / "secret.wpk")).detail


def test_custom_symlink_inside_allowed_accepted(custom: CustomFileSource, allowed: Path) -> None:
    (allowed / "real.wpk").write_bytes(b"payload")
    (allowed / "alias.wpk").symlink_to(allowed / "real.wpk")
    cand = custom.resolve_path(str(allowed / "alias.wpk"))
    assert cand.file_name == "alias.wpk"
    assert cand.sha1 == hashlib.sha1(b"payload").hexdigest()


def test_custom_missing_file(custom: CustomFileSource, allowed: Path) -> None:
    err = _refused(custom, str(allowed / "absent.wpk"))
    assert "No such file" in err.detail
    assert str(err).startswith("The WPK file does not exist")


def test_custom_directory_and_fifo_refused(custom: CustomFileSource, allowed: Path) -> None:
    (allowed / "dir.wpk").mkdir()
    assert _refused(custom, str(allowed / "dir.wpk")).detail
    if hasattr(os, "mkfifo"):
        os.mkfifo(allowed / "pipe.wpk")
        assert "not a regular file" in _refused(custom, str(allowed / "pipe.wpk")).detail


def test_custom_unreadable_file(custom: CustomFileSource, allowed: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    target = allowed / "locked.wpk"
    target.write_bytes(b"x")
    target.chmod(0)
    assert "Permission denied" in _refused(custom, str(target)).detail


def test_custom_without_allowed_dirs_takes_any_absolute_path(tmp_path: Path) -> None:
    (tmp_path / "any.wpk").write_bytes(b"abc")
    src = CustomFileSource()
    assert src.resolve_path(str(tmp_path / "any.wpk")).size == 3
    _refused(src, "relative.wpk")


def test_custom_resolve_is_not_meaningful(custom: CustomFileSource) -> None:
    with pytest.raises(UpgradeError) as info:
        custom.resolve(query_for("file:///x/", "v4.2.0"))
    assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST


def test_custom_fetch_vanished_file(custom: CustomFileSource, allowed: Path) -> None:
    (allowed / "v.wpk").write_bytes(b"abc")
    cand = custom.resolve_path(str(allowed / "v.wpk"))
    (allowed / "v.wpk").unlink()
    with pytest.raises(UpgradeError) as info:
        custom.fetch(cand, io.BytesIO(), 0, lambda _n: None)
    assert info.value.code == UpgradeCode.WPK_FILE_DOES_NOT_EXIST


def test_custom_config_schema() -> None:
    cfg = CustomSourceConfigSchema().load({})
    assert cfg.allowed_dirs == ()
    with pytest.raises(ValidationError):
        CustomSourceConfigSchema().load({"allowed_dirs": ["relative/dir"]})
    assert CustomFileSource({"allowed_dirs": ["/var/ossec"]}).cfg.allowed_dirs == ("/var/ossec",)


@pytest.mark.parametrize(
    "name", ["upgrade.sh", "upgrade.bat", "pkg_installer.sh", "my installer,v2+x.sh", "a_b-c"]
)
def test_installer_names_accepted(name: str) -> None:
    assert CustomFileSource.validate_installer(name) == name


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../upgrade.sh", "bin/upgrade.sh", "a\\b", "-rf", "x;rm", "a\nb"]
)
def test_installer_names_refused(name: str) -> None:
    with pytest.raises(ValueError, match="invalid installer name"):
        CustomFileSource.validate_installer(name)
