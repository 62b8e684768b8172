"""The async reports, on pytest-asyncio (``asyncio_mode = auto`` in pytest.ini).

In ``transaction`` isolation the async fixtures have a connection and transaction of their own (``pg_asyncpg``'s;
``pg_async_session`` runs on that same connection), separate from ``pg_session``'s: each test writes its data
through the async client it reads with."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncSession

from pgsandbox.drivers import factoryboy
from shop import reports
from shop.tests.factories import ProductFactory


async def test_the_sales_report(pg_asyncpg: asyncpg.Connection) -> None:
    await pg_asyncpg.execute(
        """
        INSERT INTO customers (id, email, name) OVERRIDING SYSTEM VALUE VALUES (1, 'ada@example.com', 'Ada');
        INSERT INTO products (id, sku, title, price, stock) OVERRIDING SYSTEM VALUE VALUES
            (1, 'NOVEL', 'A novel', 20.00, 10),
            (2, 'ATLAS', 'An atlas', 45.00, 10);
        INSERT INTO orders (id, customer_id, status, cancelled_at) OVERRIDING SYSTEM VALUE VALUES
            (1, 1, 'paid', NULL),
            (2, 1, 'pending', NULL),
            (3, 1, 'cancelled', now());
        INSERT INTO order_lines (order_id, product_id, quantity, unit_price) VALUES
            (1, 1, 2, 20.00), (1, 2, 1, 45.00), (2, 1, 1, 18.00), (3, 2, 5, 45.00);
        """
    )
    assert await reports.sales_report(pg_asyncpg) == [
        reports.ProductSales("NOVEL", "A novel", 3, Decimal("58.00")),
        reports.ProductSales("ATLAS", "An atlas", 1, Decimal("45.00")),
    ]


async def test_a_delivery_is_all_or_nothing(pg_asyncpg: asyncpg.Connection) -> None:
    await pg_asyncpg.execute("INSERT INTO products (sku, title, price, stock) VALUES ('NOVEL', 'A novel', 20, 1)")

    # receive_delivery's `async with conn.transaction()` is a savepoint inside the test's transaction.
    with pytest.raises(LookupError, match="unknown sku NOPE"):
        await reports.receive_delivery(pg_asyncpg, {"NOVEL": 5, "NOPE": 1})
    assert await pg_asyncpg.fetchval("SELECT stock FROM products") == 1

    assert await reports.receive_delivery(pg_asyncpg, {"NOVEL": 5}) == 5
    assert await pg_asyncpg.fetchval("SELECT stock FROM products") == 6


async def test_low_stock(pg_async_session: AsyncSession) -> None:
    await factoryboy.create(ProductFactory, sku="A", stock=0)
    await factoryboy.create(ProductFactory, sku="B", stock=2)
    await factoryboy.create(ProductFactory, sku="C", stock=2)
    await factoryboy.create(ProductFactory, sku="D", stock=3)

    assert [p.sku for p in await reports.low_stock(pg_async_session, threshold=3)] == ["A", "B", "C"]
