"""What marks pgsandbox's own SQL and connections, so that a test's statements leave them out.

A leaf: the statement log, the roles, the server and the isolation modes all read these, and it imports
nothing of theirs.
"""

from __future__ import annotations

INTERNAL = "/* pgsandbox */ "  # starts what pgsandbox itself runs on a test's connection
QUIET_OPTIONS = "-c log_min_duration_statement=-1"  # pgsandbox's admin connections: not logged
OURS_PREFIX = "pgsandbox"  # starts the application_name of every connection pgsandbox opens on a test's database
RECORDED = "pgsandbox_recorded"  # on a failed pg_queries block's AssertionError: what it ran (its message lists it)
