"""The built-in ``tcp`` agent transport: agents keep one TCP connection to their manager.

Registered as entry point ``tcp`` of group ``wpk_upgrade.transports``. Both sides live here:
``TcpTransport.serve`` (manager) and ``TcpTransport.run_agent`` (agent). The wire is described
in ``wire.py``.
"""

from .transport import TcpOptions, TcpTransport

__all__ = ["TcpOptions", "TcpTransport"]
