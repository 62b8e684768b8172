from app import config, db
from sqlalchemy import text


def test_counts_orders_through_the_settings_engine(app_conn):
    assert app_conn.execute(text("select count(*) from orders")).scalar_one() == 0


def test_counts_orders_where_the_environment_points(pg):
    assert db.count_orders(config.database_url()) == 0
