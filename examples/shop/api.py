"""The shop's HTTP API (FastAPI).

The database is named by the ``DATABASE_URL`` environment variable (a SQLAlchemy URL). The engine is created
when the app starts (its lifespan), not at import: importing this module connects to nothing, and an app
started with another ``DATABASE_URL`` uses that database. Run it with
``DATABASE_URL=postgresql+psycopg:///shop uvicorn shop.api:app``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import datetime
from decimal import Decimal
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from shop import service
from shop.models import Order, OrderStatus, Product

DEFAULT_DATABASE_URL = "postgresql+psycopg:///shop"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    engine = create_engine(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL), pool_pre_ping=True)
    app.state.sessions = sessionmaker(engine)
    try:
        yield
    finally:
        engine.dispose()


app = FastAPI(title="Bookshop", lifespan=lifespan)


def get_session(request: Request) -> Iterator[Session]:
    """One session per request, from the engine the app started with."""
    sessions: sessionmaker[Session] = request.app.state.sessions
    with sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


class ProductOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    sku: str
    title: str
    price: Decimal
    stock: int


class OrderItem(BaseModel):
    product_id: int
    quantity: int = Field(gt=0)


class OrderIn(BaseModel):
    customer_id: int
    items: list[OrderItem] = Field(min_length=1)


class OrderLineOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    product_id: int
    quantity: int
    unit_price: Decimal


class OrderOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    customer_id: int
    status: OrderStatus
    created_at: datetime
    lines: list[OrderLineOut]
    total: Decimal


@app.get("/products/{product_id}")
def get_product(product_id: int, session: SessionDep) -> ProductOut:
    product = session.get(Product, product_id)
    if product is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown product {product_id}")
    return ProductOut.model_validate(product)


@app.post("/orders", status_code=status.HTTP_201_CREATED)
def create_order(body: OrderIn, session: SessionDep) -> OrderOut:
    items: dict[int, int] = {}
    for item in body.items:
        items[item.product_id] = items.get(item.product_id, 0) + item.quantity
    try:
        order = service.place_order(session, body.customer_id, items)
    except service.NotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from error
    except service.OutOfStock as error:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            {"error": "out_of_stock", "sku": error.sku, "requested": error.requested, "available": error.available},
        ) from error
    return OrderOut.model_validate(order)


@app.get("/orders/{order_id}")
def get_order(order_id: int, session: SessionDep) -> OrderOut:
    order = session.get(Order, order_id)
    if order is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown order {order_id}")
    return OrderOut.model_validate(order)


@app.get("/customers/{customer_id}/orders")
def list_orders(customer_id: int, session: SessionDep) -> list[OrderOut]:
    """A customer's orders with their lines: two queries however many orders (``selectinload``), not one more
    per order."""
    orders = session.scalars(
        select(Order).where(Order.customer_id == customer_id).options(selectinload(Order.lines)).order_by(Order.id)
    )
    return [OrderOut.model_validate(order) for order in orders]


@app.post("/orders/{order_id}/cancel")
def cancel_order(order_id: int, session: SessionDep) -> OrderOut:
    try:
        order = service.cancel_order(session, order_id)
    except service.NotFound as error:
        raise HTTPException(status.HTTP_404_NOT_FOUND, str(error)) from error
    except service.InvalidOrder as error:
        raise HTTPException(status.HTTP_409_CONFLICT, str(error)) from error
    return OrderOut.model_validate(order)
