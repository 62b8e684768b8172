"""pytest-factoryboy fixtures (registered in ``conftest.py``) on top of the factories: related rows are made
by their ``SubFactory``s, and attributes can be set per test with ``parametrize``."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from pgsandbox import Database
from shop import service
from shop.models import Customer, OrderLine, Product
from shop.tests.factories import ProductFactory

pytestmark = pytest.mark.usefixtures("pg_session")


def test_an_order_line_brings_its_order_customer_and_product(order_line: OrderLine, pg: Database) -> None:
    assert order_line.order.customer.email.endswith("@example.com")
    assert order_line.unit_price == order_line.product.price
    assert (
        pg.fetchval(
            "SELECT count(*) FROM order_lines JOIN orders o ON o.id = order_id JOIN customers c ON c.id = customer_id"
        )
        == 1
    )


@pytest.mark.parametrize("product__stock", [0])
def test_a_sold_out_book_cannot_be_ordered(pg_session: Session, customer: Customer, product: Product) -> None:
    with pytest.raises(service.OutOfStock):
        service.place_order(pg_session, customer.id, {product.id: 1})


def test_the_factory_fixture_makes_batches(
    pg_session: Session, customer: Customer, product_factory: type[ProductFactory]
) -> None:
    books: list[Product] = product_factory.create_batch(3, stock=1)
    order = service.place_order(pg_session, customer.id, {book.id: 1 for book in books})
    assert len(order.lines) == 3
    assert [book.stock for book in books] == [0, 0, 0]
