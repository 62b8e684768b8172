"""Orders: each function is one unit of work that commits on success and rolls back on failure."""

from __future__ import annotations

from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shop.models import Customer, Order, OrderLine, OrderStatus, Product


class ShopError(Exception):
    """A request the shop refuses; nothing was changed."""


class NotFound(ShopError):
    def __init__(self, kind: str, ids: set[int] | int) -> None:
        self.kind = kind
        self.ids = {ids} if isinstance(ids, int) else ids
        super().__init__(f"unknown {kind} {', '.join(map(str, sorted(self.ids)))}")


class OutOfStock(ShopError):
    def __init__(self, product: Product, requested: int) -> None:
        self.product_id = product.id
        self.sku = product.sku
        self.requested = requested
        self.available = product.stock
        super().__init__(f"{product.sku}: {requested} requested, {product.stock} in stock")


class InvalidOrder(ShopError):
    pass


def place_order(session: Session, customer_id: int, items: Mapping[int, int]) -> Order:
    """Order ``items`` (product id -> quantity) for a customer: take them from stock and commit.

    The products' rows are locked (``SELECT ... FOR UPDATE``, in id order so that two orders never wait on
    each other) until the commit, so concurrent orders cannot both take the last copy. Raises
    :class:`OutOfStock`, :class:`NotFound` or :class:`InvalidOrder` after rolling back.
    """
    try:
        if not items or any(quantity <= 0 for quantity in items.values()):
            raise InvalidOrder("an order needs at least one item, each with a positive quantity")
        if session.get(Customer, customer_id) is None:
            raise NotFound("customer", customer_id)
        products = session.scalars(
            select(Product).where(Product.id.in_(items)).order_by(Product.id).with_for_update()
        ).all()
        missing = set(items) - {product.id for product in products}
        if missing:
            raise NotFound("product", missing)
        order = Order(customer_id=customer_id, status=OrderStatus.PENDING)
        for product in products:
            quantity = items[product.id]
            if product.stock < quantity:
                raise OutOfStock(product, quantity)
            product.stock -= quantity
            order.lines.append(OrderLine(product=product, quantity=quantity, unit_price=product.price))
        session.add(order)
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return order


def cancel_order(session: Session, order_id: int) -> Order:
    """Cancel a pending or paid order and put its items back in stock; commit."""
    try:
        order = session.get(Order, order_id, with_for_update=True)
        if order is None:
            raise NotFound("order", order_id)
        if order.status not in (OrderStatus.PENDING, OrderStatus.PAID):
            raise InvalidOrder(f"order {order_id} is {order.status.value}: it can no longer be cancelled")
        for line in order.lines:
            line.product.stock += line.quantity
        order.status = OrderStatus.CANCELLED
        order.cancelled_at = func.now()  # evaluated by the UPDATE: the server's clock
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return order


def restock(session: Session, product_id: int, quantity: int) -> Product:
    """Add ``quantity`` copies of a product to the stock (negative to write off); commit."""
    try:
        product = session.get(Product, product_id, with_for_update=True)
        if product is None:
            raise NotFound("product", product_id)
        product.stock += quantity  # the CHECK constraint refuses a negative stock
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return product
