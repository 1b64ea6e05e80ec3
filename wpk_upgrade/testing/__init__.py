"""Test helpers shipped with the kernel: contract suites every driver passes
(``source_contract``, ``store_contract``), harnesses (``harness``: a real manager node and
scripted agents), database servers (``databases``) and loopback web servers (``loopback``)."""
