from django.db.models.signals import post_save
from django.dispatch import receiver

from catalog.models import Book, Event


@receiver(post_save, sender=Book)
def record_new_book(sender: type[Book], instance: Book, created: bool, **kwargs: object) -> None:
    if created:
        Event.objects.create(book=instance, kind="added")
