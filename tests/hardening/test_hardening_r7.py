"""R7: three manager processes on one PostgreSQL under load: no task dispatched twice, one task
when an agent is requested on all nodes at once (see ``r7_nodes.py``)."""

from __future__ import annotations

import pytest
import r7_nodes
from hardlib import Size, assert_figures


def test_r7_three_nodes_one_postgresql() -> None:
    figures = r7_nodes.measure(Size())
    if figures[0].tried == 0:
        pytest.skip(figures[0].notes[0])
    assert_figures(figures)
