"""The library's tests, as pytest-django users write them: no conftest, nothing of pgsandbox's."""

import json
import urllib.request

import pytest
from catalog.models import Author, Book, Event, Genre
from django.db import IntegrityError, connection, transaction


@pytest.fixture
def book(db):
    return Book.objects.create(title="Dune", author=Author.objects.create(name="Frank Herbert"), copies=2)


def test_data_migration_seeded_genres(db):
    assert sorted(Genre.objects.values_list("name", flat=True)) == ["Fiction", "History", "Poetry", "Science"]


def test_signal_records_a_new_book(book):
    assert list(Event.objects.filter(book=book).values_list("kind", flat=True)) == ["added"]


@pytest.mark.django_db
def test_constraints_hold(book):
    with pytest.raises(IntegrityError), transaction.atomic():
        Book.objects.create(title="Dune", author=book.author)
    with pytest.raises(IntegrityError), transaction.atomic():
        Book.objects.filter(pk=book.pk).update(on_loan=3)
    assert Book.objects.get(pk=book.pk).on_loan == 0


@pytest.mark.django_db
def test_each_test_starts_from_the_migrated_template():
    assert not Book.objects.exists()
    assert Genre.objects.count() == 4


def test_view_lists_books(client, book, django_assert_num_queries):
    with django_assert_num_queries(1):
        response = client.get("/books/")
    assert response.json()["books"] == [{"title": "Dune", "author": "Frank Herbert", "genre": None, "available": 2}]


def test_view_searches_titles(client, book):
    Book.objects.create(title="Children of Dune", author=book.author)
    titles = [b["title"] for b in client.get("/books/", {"q": "child"}).json()["books"]]
    assert titles == ["Children of Dune"]


def test_borrowing_until_no_copy_is_left(client, book):
    assert client.post(f"/books/{book.pk}/borrow/").status_code == 200
    assert client.post(f"/books/{book.pk}/borrow/").status_code == 200
    assert client.post(f"/books/{book.pk}/borrow/").json() == {"error": "no copy available"}
    assert Event.objects.filter(book=book, kind="borrowed").count() == 2


def test_admin_page(admin_client, book):
    response = admin_client.get("/admin/catalog/book/")
    assert response.status_code == 200
    assert b"Dune" in response.content


@pytest.mark.django_db(transaction=True)
def test_transaction_commits_for_real():
    with transaction.atomic():
        Author.objects.create(name="Ursula K. Le Guin")
    assert not connection.in_atomic_block
    assert Author.objects.filter(name="Ursula K. Le Guin").exists()


@pytest.mark.django_db(transaction=True)
def test_transactional_tests_start_from_the_template_too():
    # the data migration's rows are there: a flush would have removed them
    assert Genre.objects.count() == 4
    assert not Author.objects.exists()


def test_live_server_serves_the_tests_rows(live_server):
    Book.objects.create(title="Kindred", author=Author.objects.create(name="Octavia Butler"))
    with urllib.request.urlopen(live_server.url + "/books/") as response:
        assert [book["title"] for book in json.load(response)["books"]] == ["Kindred"]


@pytest.mark.django_db(databases=["default", "replica"])
def test_replica_alias_is_on_the_sandbox_too():
    Author.objects.create(name="Mary Shelley")
    assert Author.objects.using("replica").count() == 0  # its own connection: it does not see the uncommitted row
    assert Genre.objects.using("replica").count() == 4
