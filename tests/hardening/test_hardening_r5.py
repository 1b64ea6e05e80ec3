"""R5: foreign commands (identity claims over mutual TLS, D6, path traversal in
``upgrade_custom``, socket modes against a real unprivileged user), see ``r5_foreign.py``."""

from __future__ import annotations

import r5_foreign
from hardlib import Size, assert_figures


def test_r5_foreign_commands_are_refused_and_logged() -> None:
    assert_figures(r5_foreign.measure(Size()))
