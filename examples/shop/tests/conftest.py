"""pytest-factoryboy: each registered factory becomes fixtures, such as ``product`` (a row) and
``product_factory`` (the class); ``@pytest.mark.parametrize("product__stock", [0])`` overrides an attribute.
The rows are written through ``pg_session``: test modules that use them request it (``pytestmark``)."""

from pytest_factoryboy import register

from shop.tests.factories import CustomerFactory, OrderFactory, OrderLineFactory, ProductFactory

register(CustomerFactory)
register(ProductFactory)
register(OrderFactory)
register(OrderLineFactory)
