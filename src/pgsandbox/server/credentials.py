"""pg_credentials_command: the admin's password (or user and password) for an existing server, from a command.

Secret managers and cloud IAM give credentials that rotate or expire (a Vault lease, a 15-minute RDS or Cloud SQL
token). The command runs when pgsandbox attaches to the server and again, once, when one of its admin connects
is refused (the token expired, the password was rotated). What it prints goes to the run's passfile only
(passfile.py): never into a DSN, a message, an exception's arguments or a frame local that shows it (the frames
that hold it hold a :class:`Secret`, whose ``repr()`` is masked).

The command runs in a shell (``/bin/sh -c``), as git runs a credential helper that starts with ``!``: the recipes
pipe (``vault read ... | jq``), read the environment (``$PGHOST``) and set it (``VAULT_TOKEN=$(...)``), which a
``shlex`` split would not allow; the command is the user's own configuration, like the rest of the options.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import Any

from pgsandbox.common.redact import MASK, Secret, redact, register_secret
from pgsandbox.errors import ConnectError
from pgsandbox.server.passfile import Passfile

DEFAULT_TIMEOUT = 30.0
USER_KEYS = ("user", "username")  # pgsandbox's own, and Vault's database engine's
PASSWORD_KEYS = ("password", "token")  # pgsandbox's own and Vault's, and what IAM token helpers call it
STDERR_LINES = 10
STDERR_CHARACTERS = 1000

# a server's refusal of the password (or of a missing one), as libpq words it
REFUSED = re.compile(
    r"password authentication failed|no password supplied|authentication failed|"
    r"password is required|SCRAM authentication",
    re.IGNORECASE,
)
# what looks like a secret in a command line or a tool's stderr: NAME=VALUE and --NAME VALUE where the name says
# password, token, secret or key, "NAME": "VALUE" in JSON, and any long run of token characters (AWS SigV4
# signatures, JWTs, Vault tokens) that is not a file path
_SECRET_WORD = r"(?:password|passwd|pwd|token|secret|key|auth|credential)"
_ASSIGNED = re.compile(rf"""(\b[\w.-]*{_SECRET_WORD}[\w.-]*\s*=\s*)('[^']*'|"[^"]*"|[^\s'";|&]+)""", re.IGNORECASE)
_FLAG = re.compile(rf"""(\s--?[\w-]*{_SECRET_WORD}[\w-]*\s+)('[^']*'|"[^"]*"|[^\s'";|&-][^\s'";|&]*)""", re.IGNORECASE)
_JSON = re.compile(rf"""("[\w.-]*{_SECRET_WORD}[\w.-]*"\s*:\s*)("(?:[^"\\]|\\.)*")""", re.IGNORECASE)
_LONG_TOKEN = re.compile(r"[A-Za-z0-9+/=_%&.~-]{32,}")


def mask_secrets(text: str) -> str:
    """``text`` (a command line, a tool's stderr) with passwords, tokens and keys replaced by ``***``."""
    text = redact(text)
    for pattern in (_ASSIGNED, _FLAG, _JSON):
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    return _LONG_TOKEN.sub(lambda m: m.group(0) if _is_path(m.group(0)) else MASK, text)


def _is_path(text: str) -> bool:
    """A file path (``/usr/local/bin/vault``) or a host name (``db.abc.eu-west-1.rds.amazonaws.com``) is not a
    token: a path has a ``/``, short parts and no ``=``, ``%`` or ``+``; a host name, lower-case dotted labels."""
    if re.fullmatch(r"[a-z0-9-]+(\.[a-z0-9-]+)+", text):
        return True
    return "/" in text and not any(c in text for c in "=%+") and all(len(part) < 32 for part in text.split("/"))


def refused(error: BaseException) -> bool:
    """The server refused the password (or asked for one it did not get)."""
    return bool(REFUSED.search(str(error)))


@dataclass(frozen=True, repr=False)
class Credentials:
    """What a credentials command gave: the password, and the user when it named one (Vault's dynamic users)."""

    password: Secret
    user: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password={MASK!r})"


@dataclass(frozen=True, repr=False)
class CredentialsCommand:
    """``pg_credentials_command``: ``command`` runs in a shell; ``source`` is where it was set, for messages."""

    command: str
    source: str = "pg_credentials_command"
    timeout: float = DEFAULT_TIMEOUT

    def __repr__(self) -> str:  # the command may hold a token (VAULT_TOKEN=...): a frame's locals show this
        return f"CredentialsCommand({self.shown!r})"

    @property
    def shown(self) -> str:
        """The command for messages, with anything that looks like a secret masked."""
        return mask_secrets(self.command)

    def run(self, params: dict[str, Any] | None = None) -> Credentials:
        """Run the command and read its output. ``params``: the DSN's parameters, given to the command as
        ``PGHOST``, ``PGPORT``, ``PGUSER`` and ``PGDATABASE`` when the DSN names them (an IAM token is made for
        one host, port and user)."""
        # this frame, which a traceback of the errors below shows with --showlocals, holds no environment, no
        # unmasked stderr and no output but as a Secret
        returncode, output, stderr = self._execute(params)
        if returncode != 0:
            raise ConnectError(
                f"the credentials command `{self.shown}` ({self.source}) failed with exit code {returncode}{stderr}",
                "run the command in a terminal to see what it needs (a login to the secret manager, a role, a "
                f"region), then run the tests again; or fix {self.source}.",
            )
        credentials = parse_output(output, f"the credentials command `{self.shown}` ({self.source})")
        register_secret(credentials.password)  # masked wherever it might show up, from now on
        return credentials

    def _execute(self, params: dict[str, Any] | None) -> tuple[int, Secret, str]:
        """(exit code, stdout, what a message says of stderr: masked and trimmed)."""
        try:
            process = subprocess.Popen(
                self.command,
                shell=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=_environment(params),
                start_new_session=True,  # a timeout kills the whole pipeline, not the shell alone
            )
        except OSError as error:
            raise ConnectError(
                f"pgsandbox could not run the credentials command `{self.shown}` ({self.source}): {error}.",
                "check the command; it runs in /bin/sh, as in a terminal.",
            ) from None
        try:
            out, err = process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # it may have ended on its own meanwhile
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise ConnectError(
                f"the credentials command `{self.shown}` ({self.source}) did not finish within "
                f"{self.timeout:g} s; pgsandbox stopped it.",
                "run it in a terminal: it may be waiting for a login (vault login, aws sso login, gcloud auth "
                "login) or a prompt; or give it longer with pg_credentials_timeout.",
            ) from None
        return process.returncode, Secret(out.decode(errors="replace")), _stderr(err)


def _environment(params: dict[str, Any] | None) -> dict[str, str]:
    """pgsandbox's environment, with the libpq variables of the DSN's host, port, user and database."""
    env = dict(os.environ)
    for key, variable in (("host", "PGHOST"), ("port", "PGPORT"), ("user", "PGUSER"), ("dbname", "PGDATABASE")):
        if params and params.get(key):
            env[variable] = str(params[key])
    return env


def _stderr(err: bytes) -> str:
    """``: <stderr>`` (masked, its last lines, trimmed), or ``, and printed nothing on stderr.``."""
    lines = [line.rstrip() for line in err.decode(errors="replace").strip().splitlines() if line.strip()]
    if not lines:
        return " and printed nothing on stderr."
    text = "\n".join(lines[-STDERR_LINES:])
    if len(text) > STDERR_CHARACTERS:
        text = "..." + text[-STDERR_CHARACTERS:]
    skipped = f"    ({len(lines) - STDERR_LINES} earlier lines left out)\n" if len(lines) > STDERR_LINES else ""
    shown = "\n".join("    " + line for line in mask_secrets(text).splitlines())
    return f"; its stderr:\n{skipped}{shown}"


def parse_output(output: Secret, what: str) -> Credentials:
    """The credentials in a command's output: one line, the password (or token); or a JSON object with
    ``password`` or ``token``, and ``user`` or ``username``, at its top or under ``data`` (``vault read
    -format=json``). ``what`` names the command in messages. Raises ConnectError, whose message never holds
    the output."""
    problem, user, password = _read(Secret(output.strip()))
    if problem is not None:
        raise ConnectError(f"{what} {problem[0]}", problem[1]) from None
    assert password is not None
    return Credentials(password, user)


def _read(output: Secret) -> tuple[tuple[str, str] | None, str | None, Secret | None]:
    """(problem, user, password): returns rather than raises, so that no traceback shows a frame holding the
    parsed output."""
    keys = f'{{"user": ..., "password": ...}} (also "{USER_KEYS[1]}" and "{PASSWORD_KEYS[1]}")'
    if not output:
        return (
            (
                "printed nothing on stdout (the password or token was expected there).",
                f"make the command print the password, or JSON {keys}, on stdout.",
            ),
            None,
            None,
        )
    if not output.startswith("{"):
        if "\n" in output:
            return (
                (
                    f"printed {len(output.splitlines())} lines on stdout; pgsandbox expects the password (or token) "
                    "alone on one line.",
                    f"print only the password on stdout (messages go to stderr), or print JSON {keys}.",
                ),
                None,
                None,
            )
        return None, None, output
    try:
        document = json.loads(output)
    except json.JSONDecodeError as error:
        return (
            (
                f"printed text that starts with {{ but is not valid JSON ({error.msg}, line {error.lineno} column "
                f"{error.colno}).",
                f"make it print JSON {keys}; a password that starts with {{ must be printed as JSON "
                '{"password": "..."}.',
            ),
            None,
            None,
        )
    found = document.get("data") if isinstance(document, dict) and "data" in document else document
    if isinstance(found, dict):
        password = next((found[key] for key in PASSWORD_KEYS if isinstance(found.get(key), str)), None)
        user = next((found[key] for key in USER_KEYS if isinstance(found.get(key), str)), None)
        names = sorted(str(key) for key in found)
    else:
        password, user, names = None, None, []
    del document, found
    if not password:
        return (
            (
                f"printed JSON without a password: pgsandbox looks for {' or '.join(PASSWORD_KEYS)} (at the top or "
                f"under data), and found only the keys {', '.join(names) or '(none)'}.",
                f"make the command print JSON {keys}, for example through jq.",
            ),
            None,
            None,
        )
    return None, user or None, Secret(password)


class RenewableCredentials:
    """A server's admin credentials from a command, renewed once when a connect is refused: the command runs
    again and the new password replaces the old one in the passfile. Safe across threads (a clone pool's
    connects): connects refused at once renew once."""

    def __init__(self, command: CredentialsCommand, passfile: Passfile, user: str, port: str, params: dict[str, Any]):
        self.command = command
        self.passfile = passfile
        self.user = user
        self.port = port
        self.params = params
        self.generation = 0  # how many times the command gave new credentials
        self._lock = threading.Lock()

    def renew(self, seen: int) -> None:
        """Run the command again, unless another thread renewed since it read ``seen`` (:attr:`generation`)."""
        with self._lock:
            if self.generation != seen:
                return
            credentials = self.command.run(self.params)
            if credentials.user and credentials.user != self.user:
                raise ConnectError(
                    f"the credentials command `{self.command.shown}` ({self.command.source}) now gives the user "
                    f"{credentials.user!r}, but this run connected as {self.user!r}: the run's databases and roles "
                    "belong to that role, so pgsandbox cannot change it in the middle of the run.",
                    "make the credentials outlive the run (a Vault lease longer than the run, or a Vault static role, "
                    "whose password rotates but whose user stays), then run the tests again.",
                )
            self.passfile.add(self.user, credentials.password, port=self.port)
            self.generation += 1

    def refused(self, error: BaseException, target: str) -> ConnectError:
        """The error for a connect refused with the password the command has just given."""
        return ConnectError(
            f"the PostgreSQL server at {target} refused the password that the credentials command "
            f"`{self.command.shown}` ({self.command.source}) gave for {self.user!r}, also after running it again: "
            f"{redact(str(error).strip())}",
            f"check that the command gives the current password (or token) of the role {self.user!r} on this "
            "server: run it in a terminal and connect with psql.",
        )
