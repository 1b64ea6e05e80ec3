"""wpk-upgrade: remote upgrade of endpoint agents with signed WPK packages.

The kernel package. It defines the contracts (hook specs, driver interfaces, the error
catalogue, the wire framing, the models) and the manager and agent engines built on them.
Concrete WPK sources, task stores, transports and validation rules live in plugin packages
that register through entry points; the kernel imports none of them.
"""

__version__ = "0.1.0"
