"""Test helpers shipped with the kernel: contract suites every driver passes, harnesses."""
