from sqlalchemy import create_engine, text

from app import config

engine = create_engine(config.SETTINGS_URL)  # made at import; it connects on first use


def count_orders(url: str | None = None) -> int:
    target = engine if url is None else create_engine(url)
    try:
        with target.connect() as conn:
            return conn.execute(text("select count(*) from orders")).scalar_one()
    finally:
        if target is not engine:
            target.dispose()
