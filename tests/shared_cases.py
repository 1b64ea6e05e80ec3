"""Access to the black-box cases in ``../shared/cases/wazuh-behaviour.json``."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """``$WPK_SHARED_DIR`` or the ``shared`` folder beside the repository."""
    return Path(os.environ.get("WPK_SHARED_DIR", REPO.parent / "shared"))


@cache
def all_cases() -> dict[str, dict[str, Any]]:
    path = shared_dir() / "cases" / "wazuh-behaviour.json"
    if not path.exists():
        return {}
    return {c["id"]: c for c in json.loads(path.read_text())}


def case(case_id: str) -> dict[str, Any]:
    """One case by id; the test is skipped (with the reason) when the file is absent."""
    cases = all_cases()
    if not cases:
        pytest.skip(f"black-box cases not found under {shared_dir()} (set WPK_SHARED_DIR)")
    return cases[case_id]


def ids_of(category_letter: str) -> list[str]:
    return sorted(
        cid for cid, c in all_cases().items() if c["category"].startswith(category_letter)
    )
