"""The app's database access: a wait for the port, then psycopg with the parts of the URL."""

from __future__ import annotations

import socket
import time

import psycopg

from urlapp.settings import Settings


def wait_for_database(settings: Settings, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((settings.db_host, settings.db_port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def connect(settings: Settings) -> psycopg.Connection:
    return psycopg.connect(
        host=settings.db_host,
        port=settings.db_port,
        user=settings.db_user,
        password=settings.db_password,
        dbname=settings.db_name,
    )


def add_note(settings: Settings, body: str) -> int:
    with connect(settings) as conn:
        return conn.execute("insert into notes (body) values (%s) returning id", [body]).fetchone()[0]
