"""Django's own test cases, for `python manage.py test` (pytest runs tests/)."""

from django.db import IntegrityError, connection, transaction
from django.test import TestCase, TransactionTestCase

from catalog.models import Author, Book, Event, Genre


class CatalogTests(TestCase):
    def test_data_migration_and_signal(self) -> None:
        self.assertEqual(Genre.objects.count(), 4)
        book = Book.objects.create(title="Beloved", author=Author.objects.create(name="Toni Morrison"))
        self.assertEqual(list(Event.objects.filter(book=book).values_list("kind", flat=True)), ["added"])

    def test_constraint(self) -> None:
        author = Author.objects.create(name="Toni Morrison")
        with self.assertRaises(IntegrityError), transaction.atomic():
            Book.objects.create(title="Beloved", author=author, copies=-1)

    def test_view(self) -> None:
        Book.objects.create(title="Beloved", author=Author.objects.create(name="Toni Morrison"))
        with self.assertNumQueries(1):
            response = self.client.get("/books/")
        self.assertEqual([b["title"] for b in response.json()["books"]], ["Beloved"])

    def test_not_as_a_superuser(self) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
            self.assertEqual(cursor.fetchone(), (False,))


class CommitTests(TransactionTestCase):
    def test_commit(self) -> None:
        with transaction.atomic():
            Author.objects.create(name="Toni Morrison")
        self.assertTrue(Author.objects.exists())
