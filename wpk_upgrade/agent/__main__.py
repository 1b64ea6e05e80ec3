"""``python -m wpk_upgrade.agent --config FILE``: run the agent (see ``daemon.run_agent``)."""

from .daemon import main

raise SystemExit(main())
