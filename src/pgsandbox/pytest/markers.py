"""The ``pg`` marker: per-test options, each checked by the parser of the option of the same name."""

from __future__ import annotations

from typing import Any

import pytest

MARKER_OPTIONS = (
    "isolation",
    "keep_failed",
    "async_driver",
    "guard",
    "session_class",
    "async_session_class",
    "reset_sequences",
    "fence",
    "fence_allow",
)
# the marker's own, with no option of the same name: the app's role the whole test runs as (pg.as_role), and
# its settings (``role`` is not the pg_role option, which says whom pgsandbox connects as)
MARKER_ONLY = ("role", "role_settings")


def marker_options(node: pytest.Item | pytest.Collector) -> dict[str, Any]:
    marker = node.get_closest_marker("pg")
    if marker is None:
        return {}
    if marker.args:
        pytest.fail(
            f"pgsandbox: @pytest.mark.pg got {', '.join(map(repr, marker.args))} without a name; it takes keyword "
            f"options only, such as @pytest.mark.pg(isolation='database'): {', '.join(MARKER_OPTIONS)}.",
            pytrace=False,
        )
    unknown = sorted(set(marker.kwargs) - set(MARKER_OPTIONS) - set(MARKER_ONLY))
    if unknown:
        pytest.fail(
            f"pgsandbox: @pytest.mark.pg got unknown option(s) {', '.join(unknown)}; "
            f"it takes {', '.join(MARKER_OPTIONS + MARKER_ONLY)}.",
            pytrace=False,
        )
    # None: not set here (a parametrized marker may leave an option to the command line)
    return {name: marker_value(name, value) for name, value in marker.kwargs.items() if value is not None}


def marker_value(name: str, value: Any) -> Any:
    """A marker keyword's value, checked by the parser of the option of the same name (a typo fails the test
    that has it, instead of being taken as true or ignored until a fixture reads it)."""
    from pgsandbox.settings import BY_NAME

    if name in MARKER_ONLY:
        return role_value(name, value)
    option = BY_NAME[name]
    if isinstance(value, bool) and option.kind == "flag":
        return value
    if isinstance(value, type) and name in ("session_class", "async_session_class"):
        return value  # the class itself; the fixture checks what it is
    if option.kind == "list" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(marker_value_item(name, option, item) for item in value)
    if option.kind == "list" and isinstance(value, str):
        return (marker_value_item(name, option, value),)
    return marker_value_item(name, option, value)


def marker_value_item(name: str, option: Any, value: Any) -> Any:
    where = f"@pytest.mark.pg({name}={value!r})"
    takes = f"What to do: {name} takes: {option.help}."
    if not isinstance(value, str):
        expected = "True or False" if option.kind == "flag" else "a string"
        pytest.fail(f"pgsandbox: {where}: expected {expected}.\n  {takes}", pytrace=False)
    try:
        return option.parse(value.strip())
    except ValueError as error:
        reason = str(error)
    # outside the except block: the message alone, without "During handling of the above exception"
    if reason.startswith("expected one of "):
        pytest.fail(f"pgsandbox: {where} is not one of {reason[16:]}.\n  {takes}", pytrace=False)
    pytest.fail(f"pgsandbox: {where}: {reason}.\n  {takes}", pytrace=False)


def fence_options(item: pytest.Item) -> tuple[str | None, tuple[str, ...]]:
    """The marker's ``fence`` and ``fence_allow`` (checked; the other options are the fixtures' to check)."""
    marker = item.get_closest_marker("pg")
    if marker is None:
        return None, ()
    mode = marker.kwargs.get("fence")
    allow = marker.kwargs.get("fence_allow")
    return (
        None if mode is None else marker_value("fence", mode),
        () if allow is None else marker_value("fence_allow", allow),
    )


def role_value(name: str, value: Any) -> Any:
    """``role``: a role's name; ``role_settings``: a dict of setting names to values (checked again, with the
    role, when the test's database opens)."""
    if name == "role" and not (isinstance(value, str) and value.strip()):
        pytest.fail(
            f"pgsandbox: @pytest.mark.pg(role={value!r}): expected the name of a role the migrations created.\n"
            "  What to do: name it, such as @pytest.mark.pg(role='app_rw').",
            pytrace=False,
        )
    if name == "role_settings" and not (isinstance(value, dict) and all(isinstance(key, str) for key in value)):
        pytest.fail(
            f"pgsandbox: @pytest.mark.pg(role_settings={value!r}): expected a dict of setting names to values.\n"
            "  What to do: such as role_settings={'app.tenant_id': 'a', 'request.jwt.claims': {'sub': '1'}}.",
            pytrace=False,
        )
    return value
