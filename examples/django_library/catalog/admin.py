from django.contrib import admin

from catalog.models import Author, Book, Genre


@admin.register(Book)
class BookAdmin(admin.ModelAdmin):
    list_display = ("title", "author", "genre", "copies", "on_loan")
    list_select_related = ("author", "genre")


admin.site.register(Author)
admin.site.register(Genre)
