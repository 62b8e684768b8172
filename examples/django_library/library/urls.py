from catalog import views
from django.contrib import admin
from django.urls import path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("books/", views.book_list, name="book-list"),
    path("books/<int:book_id>/borrow/", views.borrow, name="borrow"),
]
