from django.db import migrations


def add_house(apps, schema_editor):
    apps.get_model("shop", "Customer").objects.using(schema_editor.connection.alias).create(name="house")


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [migrations.RunPython(add_house, migrations.RunPython.noop)]
