"""R1 at CI size: every socket fuzzed with generated and hand-written hostile input (see
``r1_fuzz.py``; ``python tests/hardening/report.py --full`` runs 10,000 inputs per socket)."""

from __future__ import annotations

import r1_fuzz
from hardlib import Size, assert_figures


def test_r1_manager_sockets() -> None:
    assert_figures(r1_fuzz.fuzz_manager(Size()))


def test_r1_agent_local_socket() -> None:
    assert_figures(r1_fuzz.fuzz_agent_socket(Size()))


def test_r1_transport_hello_and_event_frames() -> None:
    assert_figures(r1_fuzz.fuzz_transport_manager(Size()))


def test_r1_transport_request_frames() -> None:
    assert_figures(r1_fuzz.fuzz_transport_agent(Size()))
