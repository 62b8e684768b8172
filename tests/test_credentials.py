"""pg_credentials_command (issue 18): an existing server's admin password from a secret manager or a cloud IAM
token, which rotates or expires. Stand-in scripts play Vault and ``aws rds generate-db-auth-token``: one issues
a new password per call while the test rotates the role's password on the server (as the manager does), and a
run whose token expires mid-run re-runs the command at its next admin connect. The secrets never show."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgsandbox import ExternalServer, LocalServer, Sandbox, Settings
from pgsandbox.common.redact import Secret
from pgsandbox.errors import ConfigError, ConnectError
from pgsandbox.server import credentials_command
from pgsandbox.server.credentials import CredentialsCommand, mask_secrets, parse_output

# -- the fast tier: what the command printed, what a message shows ------------------------------------------------


def read(output: str) -> tuple[str | None, str]:
    found = parse_output(Secret(output), "the command `x`")
    return found.user, str(found.password)


def test_what_a_command_may_print() -> None:
    assert read("s3cret-token\n") == (None, "s3cret-token")
    assert read('{"user": "ci", "password": "pw-1"}') == ("ci", "pw-1")
    assert read('{"username": "v-ci-x", "token": "pw-2"}') == ("v-ci-x", "pw-2")  # Vault's keys, an IAM token's
    assert read('{"lease_id": "database/creds/ci/abc", "data": {"username": "v-ci", "password": "pw-3"}}') == (
        "v-ci",
        "pw-3",
    )  # vault read -format=json as it is
    assert read('{"password": "{starts-with-a-brace}"}') == (None, "{starts-with-a-brace}")
    assert repr(parse_output(Secret("pw-Hidden-4"), "x")) == "Credentials(user=None, password='***')"


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("", "printed nothing on stdout"),
        ("Warning: token expires soon\nhunter2-Secret", "printed 2 lines on stdout; pgsandbox expects the password"),
        ('{"user": "ci", "password": hunter2-Secret', "printed text that starts with { but is not valid JSON"),
        ('{"user": "ci", "passwd": "hunter2-Secret"}', "printed JSON without a password: pgsandbox looks for "),
        ('{"data": {"secret": "hunter2-Secret"}}', "printed JSON without a password: pgsandbox looks for "),
    ],
)
def test_what_a_command_may_not_print(output: str, expected: str) -> None:
    with pytest.raises(ConnectError) as error:
        parse_output(Secret(output), "the credentials command `get-pw`")
    message = str(error.value)
    assert message.startswith(f"the credentials command `get-pw` {expected}")
    assert "What to do:" in message and '{"user": ..., "password": ...}' in message
    assert "hunter2" not in message and "hunter2" not in repr(error.value.args)
    if "JSON without" in message:  # the keys it found, never their values
        assert "found only the keys passwd, user" in message or "found only the keys secret" in message


def test_secrets_in_a_command_line_or_its_stderr_are_masked() -> None:
    assert (
        mask_secrets("VAULT_TOKEN=hvs.AbC get-pw --token s3cr3t --password=hunter2 --port 5432 /opt/bin/helper")
        == "VAULT_TOKEN=*** get-pw --token *** --password=*** --port 5432 /opt/bin/helper"
    )
    recipe = "vault read -format=json database/creds/ci | jq '{user: .data.username, password: .data.password}'"
    assert mask_secrets(recipe) == recipe
    rds = "aws rds generate-db-auth-token --hostname db.abc.eu-west-1.rds.amazonaws.com --port 5432 --username ci"
    assert mask_secrets(rds) == rds
    assert mask_secrets('error: {"client_token": "abc"}') == 'error: {"client_token": ***}'
    assert mask_secrets("X-Amz-Signature=0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6071 ok") == "*** ok"
    assert mask_secrets("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4 ok") == "*** ok"
    assert (
        repr(CredentialsCommand("VAULT_TOKEN=hvs.AbC vault read x"))
        == "CredentialsCommand('VAULT_TOKEN=*** vault read x')"
    )


def test_the_option_and_its_precedence_over_a_password_in_the_dsn() -> None:
    assert credentials_command(Settings()) is None
    settings = Settings.from_sources(
        env={"PGSANDBOX_CREDENTIALS_COMMAND": "get-pw", "PGSANDBOX_CREDENTIALS_TIMEOUT": "5"}
    )
    assert credentials_command(settings) == CredentialsCommand("get-pw", "PGSANDBOX_CREDENTIALS_COMMAND", 5.0)
    with pytest.raises(ConfigError) as error:  # before any connect: two sources for one password is a mistake
        ExternalServer.attach("postgresql://ci:hunter2-Secret@db/app", "--pg-dsn", credentials=CredentialsCommand("x"))
    message = str(error.value)
    assert "--pg-dsn holds a password and pg_credentials_command gives one too" in message
    assert "take the password out of --pg-dsn" in message and "hunter2" not in message


# -- the command, run ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_failing_slow_or_silent_command_says_so_without_its_secrets() -> None:
    failing = CredentialsCommand(
        "VAULT_TOKEN=hvs.Leaked-Token sh -c 'printf %s%s stdout- Secret-1; echo starting >&2; "
        'echo "permission denied: token=stderr-Secret-2" >&2; exit 3\'',
        "--pg-credentials-command",
    )
    with pytest.raises(ConnectError) as error:
        failing.run()
    message = str(error.value)
    assert "the credentials command `VAULT_TOKEN=*** sh -c" in message and "(--pg-credentials-command)" in message
    assert "failed with exit code 3; its stderr:\n    starting\n    permission denied: token=***" in message
    assert "run the command in a terminal" in message
    for secret in ("Leaked-Token", "stdout-Secret-1", "stderr-Secret-2"):
        assert secret not in message and secret not in repr(error.value.args)

    started = time.monotonic()
    with pytest.raises(ConnectError) as error:
        CredentialsCommand("sleep 30 | cat", timeout=0.3).run()  # the pipeline's children go too
    assert time.monotonic() - started < 10
    assert "`sleep 30 | cat` (pg_credentials_command) did not finish within 0.3 s" in str(error.value)
    assert "pg_credentials_timeout" in str(error.value)

    with pytest.raises(ConnectError, match=r"`true` \(pg_credentials_command\) printed nothing on stdout"):
        CredentialsCommand("true").run()
    with pytest.raises(ConnectError, match=r"exit code 127; its stderr:\n.*not found"):
        CredentialsCommand("no-such-secret-tool read").run()

    # an IAM token is made for one host, port and user: the command gets the DSN's in the libpq variables
    found = CredentialsCommand('echo "$PGHOST-$PGPORT-$PGUSER-$PGDATABASE"').run(
        {"host": "db.example", "port": "6543", "user": "ci", "dbname": "app"}
    )
    assert (found.user, found.password) == (None, "db.example-6543-ci-app")


# -- on a real server ---------------------------------------------------------------------------------------------


class Issuer:
    """A stand-in secret manager: each call of :attr:`command` issues the next password, ``PREFIX-N`` (Vault's
    database engine after a rotation, ``aws rds generate-db-auth-token``), as JSON with Vault's keys."""

    def __init__(self, directory: Path, user: str) -> None:
        self.directory = directory
        self.prefix = f"Issued-{secrets.token_hex(6)}"
        (directory / "calls").write_text("0")
        (directory / "user").write_text(user)
        script = directory / "issue.sh"
        script.write_text(
            "#!/bin/sh\n"
            'dir=$(dirname "$0")\n'
            # the manager refuses (an expired Vault token, a missing IAM permission), saying more than it should
            'if [ -e "$dir/refuse" ]; then echo "403 permission denied, token=$(cat "$dir/refuse")" >&2; exit 4; fi\n'
            'n=$(($(cat "$dir/calls") + 1))\n'
            'echo $n > "$dir/calls"\n'
            f'printf \'{{"username": "%s", "token": "{self.prefix}-%s"}}\\n\' "$(cat "$dir/user")" "$n"\n'
        )
        script.chmod(0o700)
        self.command = str(script)

    @property
    def calls(self) -> int:
        return int((self.directory / "calls").read_text())

    def password(self, call: int) -> str:
        return f"{self.prefix}-{call}"


def rotate(server: LocalServer, user: str, password: str) -> None:
    """What the secret manager does on the server: the role's password changes; open connections stay."""
    server.admin.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(user), sql.Literal(password)))


@pytest.fixture
def issued_role(shared: LocalServer, tmp_path: Path) -> Iterator[tuple[str, Issuer]]:
    """A role of the shared server whose password the issuer's first call gives: (its URL, without a password,
    and the issuer)."""
    user = f"ci_{secrets.token_hex(4)}"
    issuer = Issuer(tmp_path, user)
    shared.admin.execute(
        sql.SQL("CREATE ROLE {} LOGIN CREATEDB CREATEROLE PASSWORD {}").format(
            sql.Identifier(user), sql.Literal(issuer.password(1))
        )
    )
    assert shared.tcp is not None
    yield f"postgresql://{user}@127.0.0.1:{shared.tcp[1]}/postgres", issuer
    for (name,) in shared.admin.execute(
        "SELECT datname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba WHERE rolname = %s", [user]
    ).fetchall():
        shared.admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
    shared.admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))


@pytest.fixture
def no_other_password(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Neither PGPASSWORD nor a ~/.pgpass: the command is the only source of the password."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-such-pgpass"))


@pytest.mark.slow
def test_a_password_rotated_on_the_server_is_fetched_again(
    shared: LocalServer, issued_role: tuple[str, Issuer], no_other_password: None
) -> None:
    url, issuer = issued_role
    user = url.split("//")[1].split("@")[0]
    command = CredentialsCommand(issuer.command, timeout=10)
    server = ExternalServer.attach(url, credentials=command)
    try:
        assert issuer.calls == 1 and server.user == user
        assert server.reveal_password() == issuer.password(1)
        assert issuer.prefix not in server.dsn + server.admin_dsn + repr(server) + repr(server.credentials)
        with server.connect() as conn:  # nothing expired: the command does not run
            assert conn.execute("select current_user").fetchone() == (user,)
        assert issuer.calls == 1
        held = server.admin

        rotate(shared, user, issuer.password(2))
        with server.connect() as conn:
            conn.execute("select 1")
        assert issuer.calls == 2 and server.reveal_password() == issuer.password(2)
        assert server.admin is held and held.execute("select 1").fetchone() == (1,)  # open connections stay

        # connects refused at once, in several threads (a clone pool), run the command once
        rotate(shared, user, issuer.password(3))
        opened: list[psycopg.Connection[Any]] = []
        threads = [threading.Thread(target=lambda: opened.append(server.connect())) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(opened) == 4 and issuer.calls == 3
        for conn in opened:
            conn.close()

        # an xdist worker attaches with the controller's passfile and runs the command only when it is refused
        handoff = {"dsn": server.dsn, "admin_dsn": server.admin_dsn, "local": False, "run_dir": None, "templates": []}
        settings = Settings(credentials_command=command.command)
        Sandbox.attach(handoff, settings).stop()
        assert issuer.calls == 3
        rotate(shared, user, issuer.password(4))
        worker = Sandbox.attach(handoff, settings)
        assert issuer.calls == 4 and worker.server.reveal_password() == issuer.password(4)
        worker.stop()

        # the command gives a password the server refuses, also when run again
        rotate(shared, user, "Neither-Issued-Password")
        with pytest.raises(ConnectError) as error:
            server.connect()
        message = str(error.value)
        assert f"refused the password that the credentials command `{issuer.command}`" in message
        assert f"gave for '{user}', also after running it again" in message and "run it in a terminal" in message
        # a Vault lease that ended gives a new user: the run's databases belong to the old one
        (issuer.directory / "user").write_text("v-ci-other")
        with pytest.raises(ConnectError, match="now gives the user 'v-ci-other', but this run connected as"):
            server.connect()
        assert issuer.prefix not in message and "Neither-Issued" not in message
    finally:
        rotate(shared, user, issuer.password(issuer.calls + 1))
        (issuer.directory / "user").write_text(user)
        server.stop()


FULL_RUN = """
import os
from pathlib import Path

import psycopg
from psycopg import sql


def issued():
    return int(Path(os.environ["ISSUER_DIR"], "calls").read_text())


def test_1_works(pg, pg_server):
    assert pg.fetchval("select 1") == 1 and issued() == 1
    assert os.environ.get("PGPASSWORD") is None


def test_2_the_token_expires(pg_server):
    # the secret manager moves on: the password the run connected with is no longer valid
    with psycopg.connect(os.environ["SUPERUSER_URL"], autocommit=True) as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(pg_server.user), sql.Literal(os.environ["NEXT_PASSWORD"])
            )
        )


def test_3_the_next_admin_connect_fetches_a_new_one(pg, pg_server):
    with pg_server.connect() as conn:
        assert conn.execute("select current_user").fetchone() == (pg_server.user,)
    assert issued() == 2
    dsn, url, env, password = pg.dsn, pg.database_url, pg.env, pg_server.reveal_password()
    raise RuntimeError(f"the app failed with {dsn} and {url}")


def test_4_goes_on(pg, pg_server):
    with pg_server.connect():
        pass
    assert pg.fetchval("select 1") == 1 and issued() == 2


def test_5_the_manager_refuses_mid_run(pg_server):
    Path(os.environ["ISSUER_DIR"], "refuse").write_text(os.environ["REFUSAL_SECRET"])
    with psycopg.connect(os.environ["SUPERUSER_URL"], autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD 'Expired-Again'").format(sql.Identifier(pg_server.user)))
    pg_server.connect()
"""


@pytest.mark.slow
def test_a_run_whose_token_expires_and_a_command_that_fails(
    shared: LocalServer,
    shared_dsn: str,
    issued_role: tuple[str, Issuer],
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    no_other_password: None,
) -> None:
    url, issuer = issued_role
    monkeypatch.setenv("ISSUER_DIR", str(issuer.directory))
    monkeypatch.setenv("SUPERUSER_URL", shared_dsn)
    monkeypatch.setenv("NEXT_PASSWORD", issuer.password(2))
    monkeypatch.setenv("REFUSAL_SECRET", "".join(["On-", "Stderr-", "Mid-Run"]))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "Env-Secret-Of-The-Command")  # the command's environment
    pytester.makepyfile(FULL_RUN)
    options = ("-v", "--tb=long", "--showlocals", "-p", "no:randomly", "-p", "no:cacheprovider", f"--pg-dsn={url}")
    result = pytester.runpytest(*options, f"--pg-credentials-command={issuer.command}")
    result.assert_outcomes(passed=3, failed=2)
    output = result.stdout.str() + result.stderr.str()
    assert "RuntimeError: the app failed with" in output and issuer.calls == 2
    assert issuer.prefix not in output  # neither password, in the DSNs, the locals or the report
    assert "(--pg-credentials-command) failed with exit code 4; its stderr:" in output
    assert "403 permission denied, token=***" in output
    assert "Stderr-Mid-Run" not in output and "Env-Secret-Of-The-Command" not in output
    (issuer.directory / "refuse").unlink()

    failing = (
        "sh -c 'printf %s%s Issued- On-Stdout; echo \"vault: permission denied, token=Leaked-On-Stderr\" >&2; exit 2'"
    )
    result = pytester.runpytest(*options, f"--pg-credentials-command={failing}")
    result.assert_outcomes(errors=1)  # the first test says it; the run stops there
    output = result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*the credentials command `sh -c*(--pg-credentials-command) failed with exit code 2*"])
    assert "vault: permission denied, token=***" in output
    assert "Issued-On-Stdout" not in output and "Leaked-On-Stderr" not in output
