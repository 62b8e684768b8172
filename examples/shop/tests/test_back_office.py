"""The async back office through httpx's ``ASGITransport`` (the app's lifespan does not run).

The app's ``get_engine`` dependency is overridden with ``pg_async_engine``: each request still makes its own
``AsyncSession`` and commits or rolls back as in production, on the test's connection, where every session the
app takes gets a savepoint of its own. The test writes and reads through ``pg_async_session`` beside it and
sees the app's commits at once; all of it is rolled back after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from pgsandbox.drivers import factoryboy
from shop import back_office
from shop.models import Product
from shop.tests.factories import ProductFactory


@pytest.fixture
async def client(pg_async_engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    back_office.app.dependency_overrides[back_office.get_engine] = lambda: pg_async_engine
    try:
        transport = httpx.ASGITransport(app=back_office.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://back-office") as client:
            yield client
    finally:
        back_office.app.dependency_overrides.clear()


async def stock(session: AsyncSession) -> dict[str, int]:
    rows = await session.execute(select(Product.sku, Product.stock).order_by(Product.sku))
    return {row.sku: row.stock for row in rows}


async def test_a_delivery_adds_to_the_stock(client: httpx.AsyncClient, pg_async_session: AsyncSession) -> None:
    await factoryboy.create(ProductFactory, sku="NOVEL", stock=1)
    await factoryboy.create(ProductFactory, sku="ATLAS", stock=0)

    response = await client.post("/deliveries", json={"copies": {"NOVEL": 5, "ATLAS": 2}})
    assert response.status_code == 200, response.text
    assert [(line["sku"], line["stock"]) for line in response.json()] == [("ATLAS", 2), ("NOVEL", 6)]
    pg_async_session.expire_all()  # the request committed in a session of its own
    assert await stock(pg_async_session) == {"ATLAS": 2, "NOVEL": 6}


async def test_an_unknown_sku_keeps_nothing(client: httpx.AsyncClient, pg_async_session: AsyncSession) -> None:
    await factoryboy.create(ProductFactory, sku="NOVEL", stock=1)

    response = await client.post("/deliveries", json={"copies": {"NOVEL": 5, "NOPE": 1}})
    assert response.status_code == 404
    assert response.json() == {"detail": "unknown sku NOPE"}
    assert await stock(pg_async_session) == {"NOVEL": 1}


async def test_low_stock_lists_the_scarcest_first(client: httpx.AsyncClient, pg_async_session: AsyncSession) -> None:
    await factoryboy.create(ProductFactory, sku="A", stock=2)
    await factoryboy.create(ProductFactory, sku="B", stock=0)
    await factoryboy.create(ProductFactory, sku="C", stock=9)

    response = await client.get("/low-stock")
    assert [line["sku"] for line in response.json()] == ["B", "A"]
