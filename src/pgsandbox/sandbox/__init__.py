"""The sandbox: a server, its templates, and a database for each test. Usable without pytest::

from pgsandbox import Sandbox, Settings

with Sandbox.start(Settings(migrations=("sql:migrations",))) as sandbox:
    with sandbox.database(isolation="transaction") as db:
        db.execute("insert into users (name) values ('ada')")
    # rolled back here
"""

from pgsandbox.sandbox.core import Sandbox
from pgsandbox.sandbox.database import ConnectionInfo, Database, SessionLogin
from pgsandbox.sandbox.gone import ServerGone

__all__ = ["ConnectionInfo", "Database", "Sandbox", "ServerGone", "SessionLogin"]
