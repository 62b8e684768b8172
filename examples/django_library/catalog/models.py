from django.contrib.postgres.indexes import GinIndex
from django.db import models
from django.db.models import F, Q


class Genre(models.Model):
    name = models.CharField(max_length=50, unique=True)

    def __str__(self) -> str:
        return self.name


class Author(models.Model):
    name = models.CharField(max_length=100, unique=True)

    def __str__(self) -> str:
        return self.name


class Book(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, on_delete=models.PROTECT, related_name="books")
    genre = models.ForeignKey(Genre, on_delete=models.SET_NULL, null=True, blank=True)
    copies = models.IntegerField(default=1)
    on_loan = models.IntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["title", "author"], name="book_title_author_unique"),
            models.CheckConstraint(condition=Q(copies__gte=0), name="book_copies_not_negative"),
            models.CheckConstraint(condition=Q(on_loan__lte=F("copies")), name="book_on_loan_within_copies"),
        ]
        # title searches (icontains) use it: pg_trgm, created by migration 0004
        indexes = [GinIndex(name="book_title_trigram", fields=["title"], opclasses=["gin_trgm_ops"])]

    def __str__(self) -> str:
        return self.title


class Event(models.Model):
    """The audit trail the signals write."""

    book = models.ForeignKey(Book, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=20)
    at = models.DateTimeField(auto_now_add=True)
