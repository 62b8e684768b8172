"""The back office's HTTP API, asynchronous: FastAPI on async SQLAlchemy.

Its engine is made in the lifespan from ``DATABASE_URL`` (an async SQLAlchemy URL, such as
``postgresql+asyncpg:///shop``), and every request gets an ``AsyncSession`` of its own from that engine
(``get_session``): a request commits its work, or leaves it to be rolled back when its session closes.
Run it with ``DATABASE_URL=postgresql+asyncpg:///shop uvicorn shop.back_office:app``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from shop import reports
from shop.models import Product

DEFAULT_DATABASE_URL = "postgresql+asyncpg:///shop"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.engine = create_async_engine(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    try:
        yield
    finally:
        await app.state.engine.dispose()


app = FastAPI(title="Bookshop back office", lifespan=lifespan)


def get_engine(request: Request) -> AsyncEngine:
    """The engine the app started with."""
    engine: AsyncEngine = request.app.state.engine
    return engine


async def get_session(engine: Annotated[AsyncEngine, Depends(get_engine)]) -> AsyncIterator[AsyncSession]:
    """One session per request, from the app's engine."""
    async with AsyncSession(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


class StockOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sku: str
    title: str
    stock: int


class Delivery(BaseModel):
    copies: dict[str, Annotated[int, Field(gt=0)]] = Field(min_length=1)


@app.get("/low-stock")
async def low_stock(session: SessionDep, threshold: int = 3) -> list[StockOut]:
    return [StockOut.model_validate(product) for product in await reports.low_stock(session, threshold)]


@app.post("/deliveries")
async def receive_delivery(delivery: Delivery, session: SessionDep) -> list[StockOut]:
    """Add a supplier's delivery to the stock, all or nothing: an unknown SKU is a 404 and nothing is kept."""
    products = {
        product.sku: product
        for product in await session.scalars(
            select(Product).where(Product.sku.in_(delivery.copies)).order_by(Product.sku).with_for_update()
        )
    }
    unknown = sorted(set(delivery.copies) - set(products))
    if unknown:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"unknown sku {', '.join(unknown)}")
    for sku, copies in delivery.copies.items():
        products[sku].stock += copies
    await session.commit()
    return [StockOut.model_validate(product) for product in products.values()]
