"""A python: migration that builds its own connection from the app's settings instead of the one it is given."""

import os

import psycopg


def migrate(conn):
    with psycopg.connect(os.environ["DATABASE_URL"]) as own:
        own.execute("create table orders (id serial primary key)")
