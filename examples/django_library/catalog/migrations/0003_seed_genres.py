"""A data migration: the genres every library starts with."""

from django.db import migrations

GENRES = ["Fiction", "History", "Poetry", "Science"]


def add_genres(apps, schema_editor):
    Genre = apps.get_model("catalog", "Genre")
    Genre.objects.using(schema_editor.connection.alias).bulk_create(Genre(name=name) for name in GENRES)


def remove_genres(apps, schema_editor):
    apps.get_model("catalog", "Genre").objects.filter(name__in=GENRES).delete()


class Migration(migrations.Migration):
    dependencies = [("catalog", "0002_genres_constraints_events")]
    operations = [migrations.RunPython(add_genres, remove_genres)]
