"""Local-file WPK sources: ``file://`` repository mirrors and ``upgrade_custom`` files.

``FileRepositorySource`` (entry point ``file``) reads a directory tree laid out exactly as the
reference repository (``<dir>versions`` + WPK files), e.g. ``file:///srv/wpk/4.x/wpk/``.
Errors: an unreadable ``versions`` file is 14, an unreadable WPK 16.

``CustomFileSource`` (entry point ``custom``) checks the ``file_path`` of an ``upgrade_custom``
request (reference §1.3 and the API's ``wpk_path`` format):

* absolute, ending in ``.wpk`` (with a non-empty name before it), no ``..`` component, no NUL;
* inside one of ``allowed_dirs`` once symlinks are resolved (a link pointing out of them is
  refused). An empty ``allowed_dirs`` (the default) allows any absolute path; the manager
  passes directories under its home;
* a regular, readable file, else "The WPK file does not exist".

Every refusal is ``UpgradeError`` 16 with the reason in ``detail``. SHA1 and SHA-256 are
computed locally, streamed. The installer name of a request is checked by
``validate_installer`` (``ValueError`` with a message; the kernel maps it to its code).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import IO, Any
from urllib.parse import urlsplit
from urllib.request import url2pathname

from marshmallow import Schema, ValidationError, fields, post_load, validates

from wpk_upgrade.errors import UpgradeCode, UpgradeError
from wpk_upgrade.interfaces import ProgressFn, WpkCandidate, WpkQuery, WpkSource
from wpk_upgrade.models import WpkRef
from wpk_upgrade.repository import RepositorySource

BLOCK_SIZE = 1024 * 1024
_INSTALLER = re.compile(r"^[\w,\-.+ ]{1,255}$")
_MISSING = UpgradeCode.WPK_FILE_DOES_NOT_EXIST


def path_from_file_url(url: str) -> Path:
    """The local path of a ``file://`` URL (host empty or ``localhost``); ``ValueError`` else."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        raise ValueError(f"not a file:// URL: {url!r}")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL names a remote host {parts.netloc!r}")
    path = url2pathname(parts.path)
    if "\x00" in path:
        raise ValueError("NUL character in file:// URL")
    return Path(path)


def _copy_from(path: Path, out: IO[bytes], offset: int, progress: ProgressFn) -> None:
    """Copy ``path`` from ``offset`` into ``out``; ``UpgradeError`` 16 when it cannot be read."""
    try:
        with open(path, "rb") as src:
            src.seek(offset)
            while block := src.read(BLOCK_SIZE):
                out.write(block)
                progress(len(block))
    except OSError as exc:
        raise UpgradeError(_MISSING, f"{path}: {exc.strerror or exc}") from exc


class FileRepositorySource(RepositorySource):
    """A reference-layout WPK repository on a local or mounted file system (``file://``)."""

    name = "file"
    config_schema = None

    def read_text(self, url: str, limit: int) -> str:
        """The file's text (``UpgradeError`` 14 when missing, unreadable or over ``limit``)."""
        try:
            path = path_from_file_url(url)
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
        except ValueError as exc:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, str(exc)) from exc
        except OSError as exc:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, f"{url}: {exc.strerror or exc}") from exc
        if len(data) > limit:
            raise UpgradeError(UpgradeCode.URL_NOT_FOUND, f"{url}: larger than {limit} bytes")
        return data.decode("utf-8", errors="replace")

    def fetch(
        self, candidate: WpkCandidate, out: IO[bytes], offset: int, progress: ProgressFn
    ) -> None:
        """Copy the WPK from ``offset`` on."""
        try:
            path = path_from_file_url(candidate.url)
        except ValueError as exc:
            raise UpgradeError(_MISSING, str(exc)) from exc
        _copy_from(path, out, offset, progress)


@dataclass(frozen=True)
class CustomSourceConfig:
    """Options of ``CustomFileSource``: directories a custom WPK may live in (empty: any)."""

    allowed_dirs: tuple[str, ...] = ()


class CustomSourceConfigSchema(Schema):
    """marshmallow schema of ``[sources.custom]`` options."""

    allowed_dirs = fields.List(fields.String(), load_default=list)

    @validates("allowed_dirs")
    def _absolute(self, value: list[str], **_: Any) -> None:
        for d in value:
            if not os.path.isabs(d):
                raise ValidationError(f"{d!r} is not an absolute directory")

    @post_load
    def make(self, data: dict[str, Any], **_: Any) -> CustomSourceConfig:
        return CustomSourceConfig(allowed_dirs=tuple(data["allowed_dirs"]))


class CustomFileSource(WpkSource):
    """The local WPK file of an ``upgrade_custom`` request (see the module docstring)."""

    name = "custom"
    config_schema = CustomSourceConfigSchema

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = CustomSourceConfig()
        elif isinstance(config, dict):
            config = CustomSourceConfigSchema().load(config)
        super().__init__(config)
        self.cfg: CustomSourceConfig = config

    # ------------------------------------------------------------------ path rules
    def check_path(self, file_path: str) -> Path:
        """The resolved path of an acceptable ``file_path`` (no I/O beyond symlink resolution).

        Raises ``UpgradeError`` 16 with the broken rule in ``detail``.
        """
        if not file_path or "\x00" in file_path:
            raise UpgradeError(_MISSING, "empty file_path or NUL character")
        if not os.path.isabs(file_path):
            raise UpgradeError(_MISSING, f"{file_path!r} is not an absolute path")
        if ".." in PurePath(file_path).parts:
            raise UpgradeError(_MISSING, f"{file_path!r} contains a '..' component")
        name = PurePath(file_path).name
        if not name.endswith(".wpk") or len(name) <= len(".wpk"):
            raise UpgradeError(_MISSING, f"{file_path!r} is not a .wpk file")
        try:
            resolved = Path(file_path).resolve(strict=False)
        except (OSError, RuntimeError) as exc:
            raise UpgradeError(_MISSING, f"{file_path!r}: {exc}") from exc
        if self.cfg.allowed_dirs:
            for allowed in self.cfg.allowed_dirs:
                try:
                    root = Path(allowed).resolve(strict=False)
                except (OSError, RuntimeError):
                    continue
                if resolved.is_relative_to(root):
                    break
            else:
                raise UpgradeError(
                    _MISSING,
                    f"{file_path!r} resolves to {str(resolved)!r}, outside the allowed "
                    f"directories ({', '.join(self.cfg.allowed_dirs)})",
                )
        return resolved

    def resolve_path(self, file_path: str) -> WpkCandidate:
        """Check ``file_path``, hash the file (SHA1 and SHA-256, streamed), describe it.

        The candidate's ``url`` is the resolved file's ``file://`` URI and its ``file_name``
        the base name of ``file_path`` (the name the agent receives, as in the reference).
        """
        resolved = self.check_path(file_path)
        sha1, sha256, size = _hash_regular_file(resolved, file_path)
        return WpkCandidate(
            url=resolved.as_uri(),
            file_name=PurePath(file_path).name,
            sha1=sha1,
            sha256=sha256,
            size=size,
        )

    def obtain_local(self, file_path: str) -> WpkRef:
        """A ``WpkRef`` to the custom file in place (no copy into the cache).

        ``installer`` keeps the model's default; the caller fills it in.
        """
        cand = self.resolve_path(file_path)
        assert cand.sha1 is not None and cand.size is not None
        return WpkRef(
            path=str(path_from_file_url(cand.url)),
            file_name=cand.file_name,
            sha1=cand.sha1,
            sha256=cand.sha256,
            size=cand.size,
        )

    @staticmethod
    def validate_installer(name: str) -> str:
        """``name`` when it is a plain member name of the WPK, else ``ValueError``."""
        if (
            not isinstance(name, str)
            or not _INSTALLER.match(name)
            or name in (".", "..")
            or ".." in name
            or name.startswith("-")
        ):
            raise ValueError(f"invalid installer name {name!r}: expected a plain file name")
        return name

    # ------------------------------------------------------------------ WpkSource
    def resolve(self, query: WpkQuery) -> WpkCandidate:
        """Not meaningful for custom files (use ``resolve_path``): always ``UpgradeError`` 16."""
        raise UpgradeError(
            _MISSING, "the custom source resolves file paths (resolve_path), not versions"
        )

    def fetch(
        self, candidate: WpkCandidate, out: IO[bytes], offset: int, progress: ProgressFn
    ) -> None:
        """Copy the custom file from ``offset`` on (``candidate`` from ``resolve_path``)."""
        try:
            path = path_from_file_url(candidate.url)
        except ValueError as exc:
            raise UpgradeError(_MISSING, str(exc)) from exc
        _copy_from(path, out, offset, progress)


def _hash_regular_file(path: Path, shown: str) -> tuple[str, str, int]:
    """(sha1, sha256, size) of a regular file, opened without blocking on FIFOs."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise UpgradeError(_MISSING, f"{shown}: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UpgradeError(_MISSING, f"{shown}: not a regular file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        sha1, sha256, size = hashlib.sha1(), hashlib.sha256(), 0
        with os.fdopen(fd, "rb", closefd=False) as fh:
            while block := fh.read(BLOCK_SIZE):
                sha1.update(block)
                sha256.update(block)
                size += len(block)
    except OSError as exc:
        raise UpgradeError(_MISSING, f"{shown}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return sha1.hexdigest(), sha256.hexdigest(), size
