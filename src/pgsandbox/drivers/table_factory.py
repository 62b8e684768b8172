"""``TableFactory``: factory_boy's declarations on ``pg.insert`` (extra ``[factoryboy]``).

Import it from :mod:`pgsandbox.drivers.factoryboy`; this module is loaded only then, as it imports factory_boy
(and Faker with it, about 0.2 s), which a test that only hands out sessions should not pay.
"""

from __future__ import annotations

from typing import Any

from pgsandbox.drivers import require

require("factory", "factoryboy", "pgsandbox.drivers.factoryboy.TableFactory")  # first: names the extra

from factory.base import Factory  # noqa: E402  (factory's package does not re-export it for type checkers)

from pgsandbox.drivers.running_test import Row, database  # noqa: E402


class TableFactory(Factory[Row]):
    """A factory_boy ``Factory`` whose ``Meta.model`` is a table name. ``create()`` inserts with the running
    test's ``pg.insert``, which makes up every required column the factory does not declare (and a parent row
    for each required foreign key), and returns the row: a :class:`Row`, a dict of every column whose columns
    also read as attributes, so that ``SelfAttribute("author.id")`` works. ``build()`` inserts nothing and
    returns the declared values alone. Sequences, traits, ``SubFactory`` and ``Params`` work as usual::

        class BookRows(TableFactory):
            class Meta:
                model = "book"

            class Params:
                author = factory.SubFactory(AuthorRows)

            author_id = factory.SelfAttribute("author.id")

        book = BookRows(pages=12)  # inserted, with a new author
    """

    class Meta:
        abstract = True

    @classmethod
    def _create(cls, model_class: str, *args: Any, **kwargs: Any) -> Row:
        return Row(database().insert(model_class, **kwargs))

    @classmethod
    def _build(cls, model_class: str, *args: Any, **kwargs: Any) -> Row:
        return Row(kwargs)
