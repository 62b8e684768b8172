"""The order service, in the default ``transaction`` isolation: every test runs inside one transaction that
is rolled back afterwards. ``place_order`` calls ``session.commit()`` as in production; on ``pg_session`` that
commit releases a savepoint instead, so the test still sees (and then loses) the order."""

from __future__ import annotations

from decimal import Decimal

import pytest
import sqlalchemy.exc
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from pgsandbox import Database
from shop import service
from shop.models import Customer, Order, OrderStatus, Product
from shop.tests.factories import CustomerFactory, ProductFactory

pytestmark = pytest.mark.usefixtures("pg_session")  # the factories write through it


def test_an_order_takes_the_books_from_stock(pg_session: Session, pg: Database) -> None:
    reader: Customer = CustomerFactory.create()
    novel: Product = ProductFactory.create(stock=3, price=Decimal("20.00"))
    atlas: Product = ProductFactory.create(stock=1, price=Decimal("45.00"))

    order = service.place_order(pg_session, reader.id, {novel.id: 2, atlas.id: 1})

    assert order.status is OrderStatus.PENDING  # the column's server default
    assert order.created_at is not None  # now(), set by the server
    assert order.total == Decimal("85.00")
    assert (novel.stock, atlas.stock) == (1, 0)
    # pg shares pg_session's connection: it sees what the service committed (to a savepoint).
    assert pg.fetch("SELECT sku, stock FROM products ORDER BY id") == [
        {"sku": novel.sku, "stock": 1},
        {"sku": atlas.sku, "stock": 0},
    ]


def test_out_of_stock_changes_nothing(pg_session: Session) -> None:
    reader: Customer = CustomerFactory.create()
    novel: Product = ProductFactory.create(stock=5)
    atlas: Product = ProductFactory.create(stock=1)
    pg_session.commit()  # the factories' rows survive the service's rollback

    with pytest.raises(service.OutOfStock) as raised:
        service.place_order(pg_session, reader.id, {novel.id: 1, atlas.id: 2})

    assert (raised.value.sku, raised.value.requested, raised.value.available) == (atlas.sku, 2, 1)
    # The service rolled back: novel's stock went back to 5 and no order exists; the session is usable.
    assert pg_session.scalars(select(Product.stock).order_by(Product.id)).all() == [5, 1]
    assert pg_session.scalar(select(func.count()).select_from(Order)) == 0


def test_cancelling_puts_the_books_back(pg_session: Session) -> None:
    reader: Customer = CustomerFactory.create()
    novel: Product = ProductFactory.create(stock=2)
    order = service.place_order(pg_session, reader.id, {novel.id: 2})
    assert novel.stock == 0

    service.cancel_order(pg_session, order.id)

    assert (order.status, novel.stock) == (OrderStatus.CANCELLED, 2)
    assert order.cancelled_at is not None and order.cancelled_at >= order.created_at
    with pytest.raises(service.InvalidOrder, match="can no longer be cancelled"):
        service.cancel_order(pg_session, order.id)


def test_the_database_refuses_a_negative_stock(pg_session: Session) -> None:
    novel: Product = ProductFactory.create(stock=2)
    pg_session.commit()

    with pytest.raises(sqlalchemy.exc.IntegrityError, match="ck_products_stock_not_negative"):
        service.restock(pg_session, novel.id, -3)  # writing off more copies than there are

    assert novel.stock == 2  # rolled back to the last commit, and reloaded


@pytest.mark.parametrize("run", ["first", "second"])
def test_every_test_starts_from_the_migrations(pg_session: Session, pg: Database, run: str) -> None:
    """Both runs create the same SKU (a unique column) and commit: the second passes only because the
    first one's commit was rolled back at its end."""
    assert pg.fetchval("SELECT count(*) FROM products") == 0
    pg_session.add(Product(sku="978-0-00-000000-0", title="Only once", price=Decimal("1.00")))
    pg_session.commit()
    assert pg.fetchval("SELECT stock FROM products WHERE sku = '978-0-00-000000-0'") == 0  # server default


def test_cancelling_a_paid_order_from_rows_made_up_by_pg_insert(pg_session: Session, pg: Database) -> None:
    """``pg.insert`` reads the schema: a line of a paid order, with only what this test is about given; the
    order, its customer and the product (every NOT NULL column, unique ones distinct) are made up."""
    line = pg.insert("order_lines", quantity=2)
    pg.execute("UPDATE orders SET status = 'paid' WHERE id = %s", [line["order_id"]])
    stock = pg.fetchval("SELECT stock FROM products WHERE id = %s", [line["product_id"]])

    order = service.cancel_order(pg_session, line["order_id"])

    assert order.status is OrderStatus.CANCELLED
    assert pg.fetchval("SELECT stock FROM products WHERE id = %s", [line["product_id"]]) == stock + 2
