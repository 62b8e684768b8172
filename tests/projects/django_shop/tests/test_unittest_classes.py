"""Django's own test classes, collected by pytest."""

from django.test import TestCase, TransactionTestCase
from shop.models import Customer


class CustomerTests(TestCase):
    def test_house_is_there(self):
        self.assertTrue(Customer.objects.filter(name="house").exists())

    def test_fails_showing_its_sql(self):
        Customer.objects.create(name="unittest-made")
        self.assertEqual(Customer.objects.filter(name="nobody").count(), 1)


class CommitTests(TransactionTestCase):
    def test_commits(self):
        Customer.objects.create(name="committed")
        self.assertTrue(Customer.objects.filter(name="committed").exists())
