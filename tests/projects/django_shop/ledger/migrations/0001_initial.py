from django.db import migrations, models


def opening_balance(apps, schema_editor):
    Entry = apps.get_model("ledger", "Entry")
    Entry.objects.using(schema_editor.connection.alias).create(account="opening", amount=100)


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Entry",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                ("account", models.CharField(max_length=50)),
                ("amount", models.DecimalField(decimal_places=2, max_digits=10)),
            ],
        ),
        migrations.RunPython(opening_balance, migrations.RunPython.noop),
    ]
