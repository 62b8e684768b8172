"""Passwords never reach output: every DSN and message passes through :func:`redact`.

Besides the ``password=`` keyword and the ``user:password@`` part of URLs, every password pgsandbox
generates or reads is registered here and masked wherever it appears, so that a secret echoed by a
library in an unexpected place is masked too.
"""

from __future__ import annotations

import re

MASK = "***"
_secrets: set[str] = set()

_KEYWORD = re.compile(r"""(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s'&;]+)""", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)([^@\s]*)(@)", re.IGNORECASE)
# a dict's repr: the keyword arguments psycopg's connect() got, in a traceback's arguments of its frame
_DICT_ITEM = re.compile(r"""(['"]password['"]\s*:\s*)('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""", re.IGNORECASE)


class Secret(str):
    """A password as text: a ``str`` in every way but ``repr()``, which is masked, so that a frame's locals
    (``--showlocals``), a namedtuple or a dict holding it show ``'***'``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(MASK)


def register_secret(secret: str) -> None:
    """Mask ``secret`` in everything :func:`redact` sees from now on."""
    if len(secret) >= 4:
        _secrets.add(str.__str__(secret))


def redact(text: str) -> str:
    """Return ``text`` with passwords in DSNs, URLs and known secrets replaced by ``***``."""
    # an empty password (``password=''``, next to ``passfile=``) hides nothing
    text = _KEYWORD.sub(lambda m: m.group(0) if m.group(2) == "''" else m.group(1) + MASK, text)
    text = _URL_USERINFO.sub(lambda m: m.group(1) + MASK + m.group(3), text)
    text = _DICT_ITEM.sub(lambda m: m.group(0) if m.group(2) in ("''", '""') else f"{m.group(1)}'{MASK}'", text)
    for secret in _secrets:
        text = text.replace(secret, MASK)
    return text
