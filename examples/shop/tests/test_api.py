"""The HTTP API through FastAPI's ``TestClient``.

Most tests override the app's ``get_session`` dependency with ``pg_session``: the endpoints run inside the
test's transaction (their commits become savepoints) and the test sees their writes at once. The last two run
the app as in production, on its own engine from ``DATABASE_URL``: that needs ``database`` isolation, a
database of the test's own where commits are real.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from pgsandbox import Database
from pgsandbox.sandbox.queries import Queries
from shop import api
from shop.models import Customer, Product
from shop.tests.factories import CustomerFactory, OrderFactory, OrderLineFactory, ProductFactory


@pytest.fixture
def client(pg_session: Session) -> Iterator[TestClient]:
    """The app with every request on the test's session. Not entered (``with``): its lifespan, which
    builds the production engine, does not run."""
    api.app.dependency_overrides[api.get_session] = lambda: pg_session
    try:
        yield TestClient(api.app)
    finally:
        api.app.dependency_overrides.clear()


def test_get_a_product(client: TestClient, product: Product) -> None:
    response = client.get(f"/products/{product.id}")
    assert response.status_code == 200
    assert response.json() == {
        "id": product.id,
        "sku": product.sku,
        "title": product.title,
        "price": "12.50",
        "stock": 10,
    }
    assert client.get("/products/0").status_code == 404


def test_listing_orders_takes_two_queries_however_many_orders(
    client: TestClient, pg_session: Session, pg_queries: Queries, customer: Customer
) -> None:
    """No N+1: ``pg_queries`` counts the statements the request ran (read from the server's log)."""
    for _ in range(5):
        OrderLineFactory.create_batch(2, order=OrderFactory.create(customer=customer))
    url = f"/customers/{customer.id}/orders"
    pg_session.expire_all()  # nothing cached in the session: the request loads everything it shows
    with pg_queries(2) as ran:
        response = client.get(url)
    assert response.status_code == 200
    assert [len(order["lines"]) for order in response.json()] == [2] * 5
    assert "order_lines" in ran.sql[1]


def test_post_an_order(client: TestClient, pg_session: Session, customer: Customer, product: Product) -> None:
    response = client.post(
        "/orders",
        json={"customer_id": customer.id, "items": [{"product_id": product.id, "quantity": 3}]},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert (body["status"], body["total"]) == ("pending", "37.50")
    pg_session.refresh(product)
    assert product.stock == 7
    assert client.get(f"/orders/{body['id']}").json() == body


@pytest.mark.parametrize("product__stock", [2])
def test_an_order_beyond_the_stock_is_a_conflict(client: TestClient, customer: Customer, product: Product) -> None:
    response = client.post(
        "/orders",
        json={"customer_id": customer.id, "items": [{"product_id": product.id, "quantity": 3}]},
    )
    assert response.status_code == 409
    assert response.json()["detail"] == {"error": "out_of_stock", "sku": product.sku, "requested": 3, "available": 2}


@pytest.fixture
def app_client(pg: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    """The app as deployed: ``DATABASE_URL`` names the test's database, and the lifespan builds (and at the
    end disposes) the app's own engine and connection pool."""
    monkeypatch.setenv("DATABASE_URL", pg.url())
    with TestClient(api.app) as client:
        yield client


@pytest.mark.pg(isolation="database")
def test_the_app_on_its_own_engine(app_client: TestClient, pg_session: Session, pg: Database) -> None:
    reader: Customer = CustomerFactory.create()
    novel: Product = ProductFactory.create(stock=4)
    pg_session.commit()  # a real commit: the app's connections see the rows

    response = app_client.post(
        "/orders", json={"customer_id": reader.id, "items": [{"product_id": novel.id, "quantity": 1}]}
    )
    assert response.status_code == 201, response.text
    assert app_client.post(f"/orders/{response.json()['id']}/cancel").json()["status"] == "cancelled"
    assert pg.fetchval("SELECT stock FROM products") == 4


@pytest.mark.pg(isolation="database")
def test_two_buyers_for_the_last_copy(app_client: TestClient, pg_session: Session, pg: Database) -> None:
    """Concurrent requests on separate connections: the row lock in ``place_order`` lets exactly one win."""
    readers: list[Customer] = CustomerFactory.create_batch(2)
    last: Product = ProductFactory.create(stock=1, price=Decimal("99.00"))
    pg_session.commit()

    def buy(reader: Customer) -> int:
        body = {"customer_id": reader.id, "items": [{"product_id": last.id, "quantity": 1}]}
        return app_client.post("/orders", json=body).status_code

    with ThreadPoolExecutor(2) as pool:
        statuses = sorted(pool.map(buy, readers))

    assert statuses == [201, 409]
    assert pg.fetch("SELECT stock FROM products") == [{"stock": 0}]
    assert pg.fetchval("SELECT count(*) FROM orders") == 1
