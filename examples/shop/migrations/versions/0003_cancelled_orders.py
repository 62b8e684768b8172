"""cancelled orders: a new order_status value and orders.cancelled_at

Revision ID: 0003
Revises: 0002
Create Date: 2025-02-03 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # A new enum value cannot be used in the transaction that added it (the CHECK below uses it): commit it first.
    with op.get_context().autocommit_block():
        op.execute("ALTER TYPE order_status ADD VALUE IF NOT EXISTS 'cancelled'")
    op.add_column("orders", sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint(
        op.f("ck_orders_cancelled_at_iff_cancelled"),
        "orders",
        "(status = 'cancelled') = (cancelled_at IS NOT NULL)",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_orders_cancelled_at_iff_cancelled"), "orders", type_="check")
    op.drop_column("orders", "cancelled_at")
    # PostgreSQL cannot drop an enum value: rebuild the type without it (cancelled orders become pending).
    op.execute("UPDATE orders SET status = 'pending' WHERE status = 'cancelled'")
    op.execute("ALTER TABLE orders ALTER COLUMN status DROP DEFAULT")
    op.execute("ALTER TYPE order_status RENAME TO order_status_old")
    op.execute("CREATE TYPE order_status AS ENUM ('pending', 'paid', 'shipped')")
    op.execute("ALTER TABLE orders ALTER COLUMN status TYPE order_status USING status::text::order_status")
    op.execute("ALTER TABLE orders ALTER COLUMN status SET DEFAULT 'pending'")
    op.execute("DROP TYPE order_status_old")
