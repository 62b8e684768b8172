"""How each test gets its database: a rolled-back transaction on the session database, or a clone."""
