"""R6: concurrent clients on the upgrade socket (one active task per agent, every client
answered), slow repositories and an expensive request beside other clients, see
``r6_load.py``. The slow-repository part is the regression test of the source threads fix
(before it, plain queries waited 30 s)."""

from __future__ import annotations

import r6_load
from hardlib import Size, assert_figures


def test_r6_load() -> None:
    assert_figures(r6_load.measure(Size()))
