"""Reports for the back office, asynchronous: raw asyncpg for the sales figures, async SQLAlchemy for stock."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

import asyncpg
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shop.models import Product


@dataclass(frozen=True)
class ProductSales:
    sku: str
    title: str
    copies: int
    revenue: Decimal


SALES_REPORT = """
    SELECT p.sku, p.title, sum(l.quantity) AS copies, sum(l.quantity * l.unit_price) AS revenue
    FROM order_lines l
    JOIN orders o ON o.id = l.order_id
    JOIN products p ON p.id = l.product_id
    WHERE o.status <> 'cancelled'
    GROUP BY p.id
    ORDER BY revenue DESC, p.sku
"""


async def sales_report(conn: asyncpg.Connection) -> list[ProductSales]:
    """Copies sold and revenue per product, best sellers first; cancelled orders do not count."""
    rows = await conn.fetch(SALES_REPORT)
    return [ProductSales(row["sku"], row["title"], int(row["copies"]), row["revenue"]) for row in rows]


async def receive_delivery(conn: asyncpg.Connection, delivery: dict[str, int]) -> int:
    """Add a supplier's delivery (sku -> copies) to the stock, all or nothing; returns the copies received.

    An unknown SKU raises ``LookupError`` and nothing of the delivery is kept.
    """
    async with conn.transaction():
        for sku, copies in delivery.items():
            found = await conn.fetchval(
                "UPDATE products SET stock = stock + $1 WHERE sku = $2 RETURNING id", copies, sku
            )
            if found is None:
                raise LookupError(f"unknown sku {sku}")
    return sum(delivery.values())


async def low_stock(session: AsyncSession, threshold: int = 3) -> list[Product]:
    """Products with fewer than ``threshold`` copies left, the scarcest first."""
    result = await session.scalars(
        select(Product).where(Product.stock < threshold).order_by(Product.stock, Product.sku)
    )
    return list(result)
