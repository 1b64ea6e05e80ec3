"""R4: every tampered WPK of the matrix, pushed through a real manager to a real agent process,
is refused before its installer runs and changes nothing outside ``var/incoming`` (see
``r4_packages.py``)."""

from __future__ import annotations

import r4_packages
from hardlib import Size, assert_figures


def test_r4_tampered_packages_never_run() -> None:
    assert_figures(r4_packages.measure(Size()))
