"""pytest-django tests, in the order they run (-p no:randomly); some fail on purpose (the outer test counts)."""

from decimal import Decimal

import pytest
from django.db import transaction
from ledger.models import Entry
from shop.models import Customer, Order


@pytest.mark.django_db
def test_pg_insert_is_in_djangos_transaction(pg):
    made = pg.insert("shop_order", total=Decimal("9.50"))  # its customer made up too
    assert Order.objects.get(pk=made["id"]).customer_id == made["customer_id"]
    Customer.objects.create(name="orm")
    assert pg.fetchval("SELECT count(*) FROM shop_customer WHERE name = 'orm'") == 1
    pg.execute("UPDATE shop_customer SET name = 'renamed' WHERE name = 'orm'")
    assert Customer.objects.filter(name="renamed").exists()


@pytest.mark.django_db
def test_and_it_is_rolled_back():
    assert not Order.objects.exists()
    assert list(Customer.objects.values_list("name", flat=True)) == ["house"]


@pytest.mark.django_db(transaction=True)
def test_pg_insert_inside_an_atomic_block_of_a_transactional_test(pg):
    with transaction.atomic():
        customer = Customer.objects.create(name="atomic")
        pg.insert("shop_order", customer_id=customer.pk, total=1)  # on another connection: it would wait forever
    assert Order.objects.filter(customer=customer).count() == 1


def test_pg_asked_for_before_transactional_db(pg, transactional_db):
    with transaction.atomic():
        Customer.objects.create(name="committed")
    assert pg.isolation == "database"  # Django's fixture opened the test's database, a clone
    assert pg.fetchval("SELECT count(*) FROM shop_customer WHERE name = 'committed'") == 1


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_serialized_rollback_sees_the_data_migrations_rows():
    assert Customer.objects.filter(name="house").exists()
    Customer.objects.all().delete()


@pytest.mark.django_db(transaction=True)
def test_the_next_transactional_test_starts_from_the_template():
    assert Customer.objects.filter(name="house").exists()


@pytest.mark.django_db(databases=["default", "ledger"])
def test_the_routed_app_is_migrated_for_its_alias():
    assert Entry.objects.get().account == "opening"  # the ledger's data migration ran
    Entry.objects.create(account="sale", amount=5)
    assert Entry.objects.using("ledger").count() == 2


@pytest.fixture(scope="module")
def customers_when_the_module_starts(django_db_blocker):
    with django_db_blocker.unblock():
        return list(Customer.objects.values_list("name", flat=True))


@pytest.mark.django_db
def test_django_db_blocker_lets_a_module_fixture_read_the_template(customers_when_the_module_starts):
    assert customers_when_the_module_starts == ["house"]


@pytest.mark.django_db(reset_sequences=True)
def test_reset_sequences_starts_the_ids_again():
    house = Customer.objects.get(name="house")
    assert Order.objects.create(customer=house, total=1).pk == 1


@pytest.mark.django_db
def test_tables_from_the_models_with_nomigrations(request):
    if not request.config.getoption("nomigrations"):
        pytest.skip("run with --nomigrations")
    assert not Customer.objects.exists()  # the tables, made from the models; no data migration ran
    assert Customer.objects.create(name="made").pk


@pytest.mark.pg(keep_failed=True)
@pytest.mark.django_db
def test_fails_and_keeps_its_database(pg):
    Customer.objects.create(name="kept in transaction isolation")
    pg.insert("shop_customer", name="kept by pg.insert")
    raise AssertionError("on purpose")


@pytest.mark.pg(keep_failed=True)
@pytest.mark.django_db(transaction=True)
def test_transactional_fails_and_keeps_its_database():
    Customer.objects.create(name="kept in database isolation")
    raise AssertionError("on purpose")
