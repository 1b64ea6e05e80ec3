"""SQL task store plugin: tasks, their history and the agent registry in SQLite, PostgreSQL
or MySQL/MariaDB, chosen by database URL (entry points ``sqlite``, ``postgresql``, ``mysql``
in group ``wpk_upgrade.stores``).

Modules: ``store`` (``SqlTaskStore``), ``queries`` (race-safe query blocks), ``models``
(peewee models and conversion to kernel types), ``migrations`` (versioned schema),
``urls`` (URL parsing, driver checks), ``options`` (``[store.options]``).
"""

from .options import SqlStoreOptions, SqlStoreOptionsSchema
from .store import SqlTaskStore

__all__ = ["SqlStoreOptions", "SqlStoreOptionsSchema", "SqlTaskStore"]
