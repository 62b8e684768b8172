from django.db import models


class Entry(models.Model):
    account = models.CharField(max_length=50)
    amount = models.DecimalField(max_digits=10, decimal_places=2)
