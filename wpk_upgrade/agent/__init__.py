"""The agent side: command handler, WPK install, result reporting, local socket, daemon.

Modules, one job each:

* ``config``: the agent's TOML configuration and home layout (``load_agent_config``);
* ``commands``: ``CommandHandler``, the reference command set (JSON ``upgrade`` target and the
  legacy ``com`` target, ``lock_restart`` included);
* ``installer``: runs a WPK's installer in its own session with a timeout;
* ``result``: the ``upgrade_result`` file and the ``allow_upgrades`` gate;
* ``reporter``: reports the result after a restart, with backoff, until acknowledged;
* ``local_socket``: the framed local socket ``queue/sockets/upgrade``;
* ``identity``: the ``AgentInfo`` announced at each connection;
* ``daemon``: ``AgentDaemon`` and ``run_agent``, the process entry point.

Nothing is imported here, so that importing a submodule stays cheap.
"""
