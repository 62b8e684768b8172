"""pgsandbox: a real, private PostgreSQL for every test.

The core works without pytest::

    from pgsandbox import Settings, start_server

    with start_server(Settings(version="16")) as server:
        with server.connect() as conn:
            conn.execute("select 1")
"""

from pgsandbox.binaries import Installation, find_installations, select_installation
from pgsandbox.errors import PgSandboxError
from pgsandbox.server import ExternalServer, LocalServer, Server, start_server
from pgsandbox.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "ExternalServer",
    "Installation",
    "LocalServer",
    "PgSandboxError",
    "Server",
    "Settings",
    "__version__",
    "find_installations",
    "select_installation",
    "start_server",
]
