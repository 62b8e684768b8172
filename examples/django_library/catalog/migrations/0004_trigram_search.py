"""Title search: pg_trgm (CREATE EXTENSION: pgsandbox runs migrations as the admin) and a trigram index."""

import django.contrib.postgres.indexes
from django.contrib.postgres.operations import TrigramExtension
from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("catalog", "0003_seed_genres")]
    operations = [
        TrigramExtension(),
        migrations.AddIndex(
            model_name="book",
            index=django.contrib.postgres.indexes.GinIndex(
                fields=["title"], name="book_title_trigram", opclasses=["gin_trgm_ops"]
            ),
        ),
    ]
