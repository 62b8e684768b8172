"""Data factories that read the schema: ``pg.insert(table, **values)`` and friends (rows.py), the values they
make up (values.py), the catalog they read (catalog.py), and declared factories (factory.py)."""

from __future__ import annotations

from pgsandbox.data.factory import Factory, lazy, sequence, sub

__all__ = ["Factory", "lazy", "sequence", "sub"]
