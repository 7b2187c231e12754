"""PostgreSQL backend that starts the checkout's embedded server on first use.

Used only with DATABASE_URL=embedded. The fast path is Django's own connect; only
a failed connect asks the embedded server to start (or to create the database)
and tries once more. So whichever process needs the server first brings it up,
also after it was stopped, and the others simply connect.
"""

from typing import Any

from django.db.backends.postgresql import base

from console import embedded_db


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        try:
            return super().get_new_connection(conn_params)
        except base.Database.OperationalError:
            embedded_db.for_checkout().ensure_running(database=conn_params.get("dbname"))
            return super().get_new_connection(conn_params)
