from django.db import transaction
from django.db.models import F
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from catalog.models import Book, Event


def book_list(request: HttpRequest) -> JsonResponse:
    books = Book.objects.select_related("author", "genre").order_by("title")
    if request.GET.get("q"):
        books = books.filter(title__icontains=request.GET["q"])
    return JsonResponse(
        {
            "books": [
                {
                    "title": b.title,
                    "author": b.author.name,
                    "genre": b.genre.name if b.genre else None,
                    "available": b.copies - b.on_loan,
                }
                for b in books
            ]
        }
    )


@require_POST
def borrow(request: HttpRequest, book_id: int) -> JsonResponse:
    with transaction.atomic():
        updated = Book.objects.filter(pk=book_id, on_loan__lt=F("copies")).update(on_loan=F("on_loan") + 1)
        if not updated:
            return JsonResponse({"error": "no copy available"}, status=409)
        Event.objects.create(book_id=book_id, kind="borrowed")
    return JsonResponse({"ok": True})
