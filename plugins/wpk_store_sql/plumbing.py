"""Plumbing of the SQL task store: pooled connections, transactions, error translation.

``retryable`` says which failures replay a whole transaction: deadlocks and serialization
failures (PostgreSQL 40P01/40001/55P03, MySQL 1213/1205), a busy SQLite file, and
``queries.Raced``. ``oneline`` turns a driver error into the one-line reason users see.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import peewee as pw

from .queries import Raced
from .urls import SQLITE

log = logging.getLogger(__name__)


def transaction(db: pw.Database, dialect: str) -> Any:
    """A write transaction: ``BEGIN IMMEDIATE`` on SQLite (writers serialized), else ``BEGIN``."""
    if dialect == SQLITE:
        return db.atomic("IMMEDIATE")
    return db.atomic()


@contextmanager
def connected(db: pw.Database) -> Iterator[None]:
    """Check a pooled connection out for the block (reusing this thread's open one)."""
    opened = db.connect(reuse_if_open=True)
    try:
        yield
    finally:
        if opened and not db.is_closed():
            db.close()


def close_quietly(db: pw.Database) -> None:
    """Close every pooled connection, idle or in use."""
    try:
        db.close_all()  # type: ignore[attr-defined]
    except Exception:
        log.debug("task store: error while closing connections", exc_info=True)


_RETRY_PGCODES = {"40001", "40P01", "55P03"}  # serialization, deadlock, lock not available
_RETRY_MYSQL = {1205, 1213}  # lock wait timeout, deadlock


def retryable(exc: BaseException) -> bool:
    """True when replaying the transaction may succeed."""
    if isinstance(exc, Raced):
        return True
    orig = exc.args[0] if exc.args and isinstance(exc.args[0], BaseException) else exc
    if getattr(orig, "pgcode", None) in _RETRY_PGCODES:
        return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _RETRY_MYSQL:
        return True
    return "database is locked" in str(orig)


def oneline(exc: BaseException) -> str:
    """The first line of an error's text (driver messages often carry DETAIL lines)."""
    text = str(exc).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__
