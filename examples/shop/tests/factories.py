# mypy: allow-untyped-calls
# (factory_boy's declarations have no annotations)
"""factory_boy factories for the bookshop's models, writing through the test's ``pg_session``.

``pgsandbox.drivers.factoryboy.session`` hands each factory the running test's ``pg_session`` (so the test, or one of
its fixtures, must use ``pg_session``). With ``sqlalchemy_session_persistence = "flush"`` the rows are sent
to the database at once, inside the test's transaction: the code under test sees them, and they are rolled
back with everything else. In async tests the same factories run inside ``pg_async_session``:
``await pgsandbox.drivers.factoryboy.create(ProductFactory, stock=0)``.
"""

from __future__ import annotations

from decimal import Decimal

from factory.alchemy import SQLAlchemyModelFactory
from factory.declarations import SelfAttribute, Sequence, SubFactory
from factory.faker import Faker

from pgsandbox.drivers.factoryboy import session
from shop.models import Customer, Order, OrderLine, OrderStatus, Product


class ShopFactory(SQLAlchemyModelFactory):
    """The session settings, inherited by every factory below."""

    class Meta:
        abstract = True
        sqlalchemy_session_factory = session  # the running test's pg_session
        sqlalchemy_session_persistence = "flush"


class CustomerFactory(ShopFactory):
    class Meta:
        model = Customer

    name = Faker("name")
    email = Sequence(lambda n: f"reader{n}@example.com")


class ProductFactory(ShopFactory):
    class Meta:
        model = Product

    sku = Sequence(lambda n: f"978-{n:09d}")
    title = Faker("sentence", nb_words=4)
    price = Decimal("12.50")
    stock = 10


class OrderFactory(ShopFactory):
    class Meta:
        model = Order

    customer = SubFactory(CustomerFactory)
    status = OrderStatus.PENDING


class OrderLineFactory(ShopFactory):
    class Meta:
        model = OrderLine

    order = SubFactory(OrderFactory)
    product = SubFactory(ProductFactory)
    quantity = 1
    unit_price = SelfAttribute("product.price")
