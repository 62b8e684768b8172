"""Small-suite comparison (issue 16): a FastAPI-style suite against a pre-started server with a hand-written
conftest, and the same suite with pgsandbox, whole process.

Usage::

    python bench/small_suite.py [--runs N] [--cases a,b] [--timeline N] [--json PATH] [--bin DIR | --pg-version N]
        [--keep] [--user NAME]

What users with docker-compose or a CI service compare pgsandbox with: their PostgreSQL is already running
before ``time pytest``. The suite is 12 tests in two modules on a small app that builds its SQLAlchemy engine
from a URL (``create_app(url)``: log in, create and list items). Each module logs in once, in a module-scoped
``token`` fixture that needs the database (the login writes a token row). Cases:

* hand-written: the server is started once before all runs (initdb + ``pg_ctl start``, fsync off, Unix socket:
  the harness's primitives), the conftest creates the test database and its schema once per session, the app is
  built from its URL, and each test ends with ``TRUNCATE items`` (the tokens stay for the module's tests);
* pgsandbox transaction: the app's engine dependency overridden with ``pg_engine`` (the test's transaction),
  migrations ``sql:migrations``, warm cache; the token is made per test, since everything a test wrote,
  the token included, is rolled back after it;
* pgsandbox database: the app built from ``pg.url()`` per test (a clone per test), the token per test;
* the same two on the pre-started server (``PGSANDBOX_DSN``): what a user who keeps the server gets, without
  pgsandbox's own server start (the templates stay on that server between runs);
* scoped data (issue 16), the login module-scoped again as in the hand-written conftest: pgsandbox transaction
  with the ``auth`` fixture on ``pg_module`` (the app's login runs once per module on an engine over
  ``pg_module.connection``; its commit is a savepoint, and each test is rolled back to the token row); the same
  with ``pg_keep_alive`` (``PGSANDBOX_KEEP_ALIVE=10min``: every run after the warm-up attaches to the server the
  warm-up round kept, stopped at the end with ``pgsandbox clean RUN_ID``); and pgsandbox database with the login
  in the module's database (``pg_module.url()``), of which each test gets a clone.

``--timeline N`` adds N rounds (not counted in the figures) with a plugin that notes the time of pytest's hooks,
of the first import of psycopg, SQLAlchemy and pgsandbox's packages and of pgsandbox's start-up steps, and prints
their medians for each case next to the hand-written one's.

Every case is a ``python -m pytest`` run timed from spawn to exit; runs are interleaved (one of each case per
round) after a discarded warm-up round that also fills pgsandbox's cache and Python's bytecode cache (a
``PYTHONPYCACHEPREFIX`` of the benchmark's own, as an installed project runs: ``PYTHONDONTWRITEBYTECODE``, set on
some machines, would make every run compile every module). Faker's and pytest-factoryboy's plugins
are off in every case (not part of such a project); the rest of this environment's plugins load in every case.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import (
    NO_PGSANDBOX,
    NO_PYTEST_POSTGRESQL,
    TIMELINE_ENV,
    TIMELINE_PLUGIN,
    TIMELINE_PLUGIN_NAME,
    BenchError,
    Runner,
    bench_parser,
    chosen_cases,
    clean_env,
    current_runner,
    divide,
    filesystem,
    fmt,
    load_average,
    machine_facts,
    pgsandbox_env,
    pgsandbox_revision,
    positive,
    print_facts,
    print_ratios,
    print_timeline,
    raw_server_commands,
    run_bench,
    run_timed,
    shown_command,
    source_state,
    stop_kept_alive,
    stop_stragglers,
    tail,
    timeline_of,
    unprivileged_runner,
    write_json,
)

PYTEST_TIMEOUT = 300.0
TESTS = 12
UNUSED = ["-p", "no:faker", "-p", "no:pytest-factoryboy"]

SCHEMA = """\
CREATE TABLE users (id serial PRIMARY KEY, email text UNIQUE NOT NULL, password text NOT NULL);
CREATE TABLE tokens (token text PRIMARY KEY, user_id int NOT NULL REFERENCES users, created_at timestamptz
    NOT NULL DEFAULT now());
CREATE TABLE items (id serial PRIMARY KEY, owner_id int NOT NULL REFERENCES users, name text NOT NULL,
    price numeric(10, 2) NOT NULL);
CREATE INDEX items_owner_idx ON items (owner_id);
INSERT INTO users (email, password) VALUES ('ada@example.com', 'secret'), ('bob@example.com', 'hunter2');
"""

APP = """\
import secrets

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session


class Login(BaseModel):
    email: str
    password: str


class NewItem(BaseModel):
    name: str
    price: float


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_session(engine: Engine = Depends(get_engine)):
    with Session(engine) as session:
        yield session


def current_user(authorization: str = Header(""), session: Session = Depends(get_session)) -> int:
    token = authorization.removeprefix("Bearer ")
    user = session.execute(text("select user_id from tokens where token = :t"), {"t": token}).scalar()
    if user is None:
        raise HTTPException(401, "not logged in")
    return user


def create_app(database_url: str) -> FastAPI:
    app = FastAPI()
    app.state.engine = create_engine(database_url)

    @app.post("/login")
    def login(body: Login, session: Session = Depends(get_session)) -> dict[str, str]:
        user = session.execute(
            text("select id from users where email = :e and password = :p"), {"e": body.email, "p": body.password}
        ).scalar()
        if user is None:
            raise HTTPException(401, "wrong email or password")
        token = secrets.token_hex(16)
        session.execute(text("insert into tokens (token, user_id) values (:t, :u)"), {"t": token, "u": user})
        session.commit()
        return {"token": token}

    @app.post("/items", status_code=201)
    def create_item(body: NewItem, user: int = Depends(current_user), session: Session = Depends(get_session)):
        item = session.execute(
            text("insert into items (owner_id, name, price) values (:o, :n, :p) returning id"),
            {"o": user, "n": body.name, "p": body.price},
        ).scalar_one()
        session.commit()
        return {"id": item}

    @app.get("/items")
    def list_items(user: int = Depends(current_user), session: Session = Depends(get_session)):
        rows = session.execute(
            text("select id, name, price from items where owner_id = :o order by id"), {"o": user}
        ).mappings()
        return [{"id": row["id"], "name": row["name"], "price": float(row["price"])} for row in rows]

    @app.get("/items/total")
    def total(user: int = Depends(current_user), session: Session = Depends(get_session)):
        value = session.execute(text("select coalesce(sum(price), 0) from items where owner_id = :o"), {"o": user})
        return {"total": float(value.scalar_one())}

    return app
"""

# Two modules of six tests; each asks for `client` and `auth` (headers holding the token).
TESTS_ITEMS = """\
def test_create_item(client, auth):
    response = client.post("/items", json={"name": "pen", "price": 1.5}, headers=auth)
    assert response.status_code == 201


def test_list_starts_empty(client, auth):
    assert client.get("/items", headers=auth).json() == []


def test_create_two_and_list(client, auth):
    for name in ("a", "b"):
        client.post("/items", json={"name": name, "price": 2}, headers=auth)
    assert [item["name"] for item in client.get("/items", headers=auth).json()] == ["a", "b"]


def test_total(client, auth):
    client.post("/items", json={"name": "a", "price": 2.25}, headers=auth)
    client.post("/items", json={"name": "b", "price": 0.75}, headers=auth)
    assert client.get("/items/total", headers=auth).json() == {"total": 3.0}


def test_unauthorized(client):
    assert client.get("/items").status_code == 401


def test_first_id_is_one_after_truncation_or_rollback(client, auth):
    created = client.post("/items", json={"name": "c", "price": 1}, headers=auth).json()
    assert created["id"] >= 1
"""

TESTS_ACCOUNTS = """\
def test_wrong_password(client):
    assert client.post("/login", json={"email": "ada@example.com", "password": "x"}).status_code == 401


def test_token_works(client, auth):
    assert client.get("/items", headers=auth).status_code == 200


def test_items_are_private(client, auth):
    client.post("/items", json={"name": "mine", "price": 1}, headers=auth)
    bob = client.post("/login", json={"email": "bob@example.com", "password": "hunter2"}).json()["token"]
    assert client.get("/items", headers={"Authorization": f"Bearer {bob}"}).json() == []


def test_bad_token(client):
    assert client.get("/items", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_no_items_left_from_other_tests(client, auth):
    assert client.get("/items/total", headers=auth).json() == {"total": 0.0}


def test_price_is_kept(client, auth):
    client.post("/items", json={"name": "cup", "price": 4.5}, headers=auth)
    assert client.get("/items", headers=auth).json()[0]["price"] == 4.5
"""

LOGIN = """

def log_in(client):
    response = client.post("/login", json={"email": "ada@example.com", "password": "secret"})
    return {"Authorization": f"Bearer {response.json()['token']}"}
"""

# What a docker-compose or CI-service user writes: DATABASE_URL names the running server.
HAND_CONFTEST = (
    """\
import os

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from app import create_app

SCHEMA = open(os.path.join(os.path.dirname(__file__), "schema.sql")).read()
"""
    + LOGIN
    + """

@pytest.fixture(scope="session")
def database_url():
    server = create_engine(os.environ["DATABASE_URL"], isolation_level="AUTOCOMMIT")
    with server.connect() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS app_test WITH (FORCE)"))
        conn.execute(text("CREATE DATABASE app_test"))
    url = server.url.set(database="app_test")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(SCHEMA)
    yield url
    engine.dispose()
    server.dispose()


@pytest.fixture(scope="session")
def client(database_url):
    return TestClient(create_app(database_url))


@pytest.fixture(scope="module")
def auth(client):
    return log_in(client)


@pytest.fixture(scope="session")
def engine(database_url):
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture(autouse=True)
def clean(engine):
    yield
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE items RESTART IDENTITY"))
"""
)

PGSANDBOX_TRANSACTION_CONFTEST = (
    """\
import pytest
from fastapi.testclient import TestClient

from app import create_app, get_engine
"""
    + LOGIN
    + """

@pytest.fixture(scope="session")
def app():
    return create_app("postgresql+psycopg:///unused")  # the engine is overridden per test


@pytest.fixture
def client(app, pg_engine):
    app.dependency_overrides[get_engine] = lambda: pg_engine
    yield TestClient(app)
    app.dependency_overrides.clear()


@pytest.fixture
def auth(client):  # per test: the login's token row is rolled back with the test
    return log_in(client)
"""
)

PGSANDBOX_DATABASE_CONFTEST = (
    """\
import pytest
from fastapi.testclient import TestClient

from app import create_app
"""
    + LOGIN
    + """

@pytest.fixture
def client(pg):
    app = create_app(pg.url("psycopg"))
    yield TestClient(app)
    app.state.engine.dispose()


@pytest.fixture
def auth(client):  # per test: the test's database is a clone of its own
    return log_in(client)
"""
)

# Scoped data (issue 16): the login is module-scoped again. `pg_module` is the module's data: the login runs once,
# through the app, on an engine over its connection (one connection: StaticPool), and each test is rolled back to
# the token row; the tests' own requests go through `pg_engine` as above. The login is the module's first write:
# SQLAlchemy rolls back after its first connect, which on `pg_module.connection` would undo earlier scoped writes.
PGSANDBOX_TRANSACTION_MODULE_CONFTEST = (
    """\
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.pool import StaticPool

from app import create_app, get_engine
"""
    + LOGIN
    + """

@pytest.fixture(scope="session")
def app():
    return create_app("postgresql+psycopg:///unused")  # the engine is overridden


@pytest.fixture
def client(app, pg_engine):
    app.dependency_overrides[get_engine] = lambda: pg_engine
    yield TestClient(app)
    app.dependency_overrides.clear()


@pytest.fixture(scope="module")
def auth(app, pg_module):  # once per module: the token row is the module's data, each test rolled back to it
    connection = pg_module.connection
    engine = create_engine(
        "postgresql+psycopg://", creator=lambda: connection, poolclass=StaticPool, pool_reset_on_return=None
    )
    app.dependency_overrides[get_engine] = lambda: engine
    try:
        return log_in(TestClient(app))
    finally:
        app.dependency_overrides.clear()
"""
)

PGSANDBOX_DATABASE_MODULE_CONFTEST = (
    """\
import pytest
from fastapi.testclient import TestClient

from app import create_app
"""
    + LOGIN
    + """

@pytest.fixture
def client(pg):
    app = create_app(pg.url("psycopg"))
    yield TestClient(app)
    app.state.engine.dispose()


@pytest.fixture(scope="module")
def auth(pg_module):  # once per module, in the module's database: each test's clone has the token
    app = create_app(pg_module.url("psycopg"))
    try:
        return log_in(TestClient(app))
    finally:
        app.state.engine.dispose()  # no connection may stay: the module's database is cloned for each test
"""
)

# Appended to every conftest: when the conftest was imported (pytest and its plugins loaded), when collection
# ended, and each test's phases, for where the time goes.
RECORDER = """

import json as _json
import os as _os
import time as _time

_BENCH = {"conftest": _time.time(), "phases": []}


def pytest_collection_finish(session):
    _BENCH["collected"] = _time.time()


def pytest_runtest_logreport(report):
    _BENCH["phases"].append((report.when, report.start, report.stop))


def pytest_sessionfinish(session, exitstatus):
    with open(_os.environ["BENCH_DURATIONS_FILE"], "w") as out:
        _json.dump(_BENCH, out)
"""

# The columns of the breakdown: seconds from the process's spawn to its exit, in order.
STAGES = {
    "plugins": "spawn to the conftest's import: the interpreter, pytest and every plugin",
    "collection": "collecting: the test modules and what they import (the app, FastAPI, SQLAlchemy)",
    "to 1st test": "collection's end to the first test's setup: pgsandbox starts its session here",
    "1st setup": "the first test's setup: the hand-written conftest's database and schema, pgsandbox's first test",
    "tests": "every other phase of every test",
    "after": "the last test's end to the process's exit: pgsandbox stops its session",
}


CASES = {
    "hand-written": "pre-started server, hand-written conftest (TRUNCATE per test, login per module)",
    "pgsandbox-transaction": "pgsandbox transaction (pg_engine override, login per test)",
    "pgsandbox-database": "pgsandbox database (app from pg.url(), login per test)",
    "pgsandbox-transaction-dsn": "pgsandbox transaction on the pre-started server (--pg-dsn)",
    "pgsandbox-database-dsn": "pgsandbox database on the pre-started server (--pg-dsn)",
    "pgsandbox-transaction-module": "pgsandbox transaction, login per module (pg_module)",
    "pgsandbox-transaction-module-keepalive": "pgsandbox transaction, login per module, pg_keep_alive",
    "pgsandbox-database-module": "pgsandbox database, login per module (pg_module)",
}
KEEP_ALIVE = "10min"


@dataclass
class Case:
    key: str
    label: str
    suite: Path
    runner: Runner
    args: list[str]
    env: dict[str, str]
    seconds: list[float] = field(default_factory=list)
    stages: dict[str, list[float]] = field(default_factory=lambda: {stage: [] for stage in STAGES})
    error: str | None = None
    command: str = ""
    timelines: list[dict[str, float]] = field(default_factory=list)
    pycache: Path | None = None  # Python's bytecode cache, shared by every case (filled by the warm-up round)

    def run(self, record: bool, timeline: bool = False) -> None:
        if self.error is not None:
            return
        env = {**clean_env(), **self.runner.env, **self.env}
        if self.pycache is not None:  # as an installed project runs: PYTHONDONTWRITEBYTECODE would time the compiler
            env["PYTHONPYCACHEPREFIX"] = str(self.pycache)
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        durations = self.suite / "durations.json"
        env["BENCH_DURATIONS_FILE"] = str(durations)
        durations.unlink(missing_ok=True)
        events = self.suite / "timeline.json"
        env[TIMELINE_ENV] = str(events)
        events.unlink(missing_ok=True)
        plugins = ["-p", TIMELINE_PLUGIN_NAME] if timeline else []
        command = [self.runner.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *UNUSED, *self.args, *plugins]
        if not timeline:
            self.command = (
                f"cd {shlex.quote(str(self.suite))} && {shown_command(command, env, ('PGSANDBOX_', 'DATABASE_'))}"
            )
        try:
            out = run_timed(command, self.suite, env, PYTEST_TIMEOUT, self.runner)
            if out.returncode != 0 or f"{TESTS} passed" not in out.output:
                raise BenchError(f"pytest exited {out.returncode}:\n{tail(out.output, 40)}")
        except BenchError as error:
            self.error = str(error)
            print(f"  {self.label}: FAILED\n{error}", file=sys.stderr)
            return
        if timeline:
            self.timelines.append(timeline_of(json.loads(events.read_text()), out.started, out.seconds))
        elif record:
            self.seconds.append(out.seconds)
            recorded = json.loads(durations.read_text())
            phases = recorded["phases"]
            first_start, first_stop, last_stop = phases[0][1], phases[0][2], phases[-1][2]
            times = {
                "plugins": recorded["conftest"] - out.started,
                "collection": recorded["collected"] - recorded["conftest"],
                "to 1st test": first_start - recorded["collected"],
                "1st setup": first_stop - first_start,
                "tests": last_stop - first_stop,
                "after": out.started + out.seconds - last_stop,
            }
            for stage, value in times.items():
                self.stages[stage].append(value)

    def median(self, stage: str | None = None) -> float | None:
        values = self.seconds if stage is None else self.stages[stage]
        return statistics.median(values) if values else None


def write_suite(runner: Runner, suite: Path, conftest: str, ini: str, migrations: bool) -> None:
    files = {
        suite / "pyproject.toml": "[tool.pytest.ini_options]\n" + ini,
        suite / "app.py": APP,
        suite / "conftest.py": conftest + RECORDER,
        suite / f"{TIMELINE_PLUGIN_NAME}.py": TIMELINE_PLUGIN,  # loaded by --timeline's runs only
        suite / "test_items.py": TESTS_ITEMS,
        suite / "test_accounts.py": TESTS_ACCOUNTS,
        suite / ("migrations/1_schema.sql" if migrations else "schema.sql"): SCHEMA,
    }
    runner.write(files)


@dataclass
class PreStarted:
    """The server a docker-compose or CI-service user has running before the tests: started once, outside the
    timed runs."""

    runner: Runner
    stop: list[str]
    socket: Path

    @classmethod
    def start(cls, runner: Runner, bindir: Path, base: Path) -> PreStarted:
        base = runner.own(base)
        socket = runner.own(base / "sock")
        initdb, start, stop = raw_server_commands(bindir, base / "data", socket, base / "server.log", fsync=False)
        env = {**clean_env(), **runner.env}
        for command in (initdb, start):
            out = subprocess.run(command, env=env, capture_output=True, text=True, **runner.popen_kwargs())
            if out.returncode != 0:
                raise BenchError(f"{shlex.join(command)} exited {out.returncode}:\n{out.stdout}{out.stderr}")
        return cls(runner, stop, socket)

    def url(self) -> str:
        return f"postgresql+psycopg://postgres@/postgres?host={self.socket}"

    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket}"

    def close(self) -> None:
        env = {**clean_env(), **self.runner.env}
        subprocess.run(self.stop, env=env, capture_output=True, **self.runner.popen_kwargs())


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = bench_parser(__doc__)
    parser.add_argument("--runs", type=int, default=7, help="measured rounds (default 7)")
    parser.add_argument("--cases", help=f"comma-separated subset of: {', '.join(CASES)}")
    parser.add_argument(
        "--timeline",
        type=int,
        default=0,
        metavar="N",
        help="N more rounds with a plugin that notes the time of pytest's hooks, imports and pgsandbox's start-up "
        "steps, and print their medians for each case next to the hand-written one's (where the time goes)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directories (printed at the end)")
    parser.add_argument("--user", default="postgres", help="as root: the unprivileged user that runs the server")
    args = parser.parse_args(argv)
    positive(parser, args, "runs")
    if args.timeline < 0:
        parser.error("--timeline N needs N >= 0")
    args.cases = chosen_cases(parser, args.cases, list(CASES))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench("bench/small_suite.py", "pgsandbox-small-suite-", parse_args(argv), argv, bench_main)


def bench_main(args: argparse.Namespace, bindir: Path, work: Path, data: Path, command: str) -> int:
    runner = current_runner()  # every pytest run; only the pre-started server needs a user other than root
    server_runner = runner
    if os.geteuid() == 0:  # PostgreSQL refuses root: the raw pg_ctl runner of the harness
        _, unprivileged, note = unprivileged_runner(args.user, work / "home")
        if unprivileged is None:
            print(note, file=sys.stderr)
            return 2
        server_runner = unprivileged
    revision = source_state()
    facts = {
        **machine_facts(bindir, runner, f"{pgsandbox_revision()}, {revision}"),
        "load average at start": load_average(),
        "pre-started server": f"{data / 'server'} on {filesystem(data)}, fsync off, Unix socket, run as "
        f"{server_runner.label}",
        "pgsandbox cache": f"{work / 'cache'} on {filesystem(work)}",
    }
    server = PreStarted.start(server_runner, bindir, data / "server")
    try:
        return measure(args, bindir, work, data, command, runner, server, facts)
    finally:
        server.close()


def measure(
    args: argparse.Namespace,
    bindir: Path,
    work: Path,
    data: Path,
    command: str,
    runner: Runner,
    server: PreStarted,
    facts: dict[str, str],
) -> int:
    suites = work / "suites"
    pgs_ini = 'pg_migrations = ["sql:migrations"]\n'
    write_suite(runner, suites / "hand-written", HAND_CONFTEST, "", migrations=False)
    write_suite(runner, suites / "pgsandbox-transaction", PGSANDBOX_TRANSACTION_CONFTEST, pgs_ini, migrations=True)
    write_suite(
        runner,
        suites / "pgsandbox-database",
        PGSANDBOX_DATABASE_CONFTEST,
        pgs_ini + 'pg_isolation = "database"\n',
        migrations=True,
    )
    write_suite(
        runner,
        suites / "pgsandbox-transaction-module",
        PGSANDBOX_TRANSACTION_MODULE_CONFTEST,
        pgs_ini,
        migrations=True,
    )
    write_suite(
        runner,
        suites / "pgsandbox-database-module",
        PGSANDBOX_DATABASE_MODULE_CONFTEST,
        pgs_ini + 'pg_isolation = "database"\n',
        migrations=True,
    )
    warm = pgsandbox_env(bindir, runtime=data, cache=work / "cache")
    on_server = {"PGSANDBOX_DSN": server.dsn(), "PGSANDBOX_CACHE": str(work / "cache")}
    # the kept-alive server's own runtime directory: stopped by `pgsandbox clean RUN_ID` at the end
    kept_dir = runner.own(data / "kept")
    pycache = runner.own(work / "pycache")
    facts["bytecode"] = f"cached in {pycache} (PYTHONPYCACHEPREFIX, filled by the warm-up round)"
    kept = {**pgsandbox_env(bindir, runtime=kept_dir, cache=work / "cache"), "PGSANDBOX_KEEP_ALIVE": KEEP_ALIVE}
    envs = {
        "hand-written": {"DATABASE_URL": server.url()},
        "pgsandbox-transaction-dsn": on_server,
        "pgsandbox-database-dsn": on_server,
        "pgsandbox-transaction-module-keepalive": kept,
    }
    suite_of = {
        "pgsandbox-transaction-dsn": "pgsandbox-transaction",
        "pgsandbox-database-dsn": "pgsandbox-database",
        "pgsandbox-transaction-module-keepalive": "pgsandbox-transaction-module",
    }
    cases = [
        Case(
            key,
            CASES[key],
            suites / suite_of.get(key, key),
            runner,
            [*NO_PGSANDBOX, *NO_PYTEST_POSTGRESQL] if key == "hand-written" else NO_PYTEST_POSTGRESQL,
            envs.get(key, warm),
            pycache=pycache,
        )
        for key in args.cases
    ]
    try:
        run_rounds(args, command, cases)
    finally:
        stop_kept(runner, kept_dir, facts)
    facts["load average at end"] = load_average()
    return report(args, cases, facts, command)


def run_rounds(args: argparse.Namespace, command: str, cases: list[Case]) -> None:
    print(f"command: {command}")
    print(f"{len(cases)} cases, 1 warm-up round + {args.runs} measured rounds, interleaved ...", flush=True)
    for round_number in range(args.runs + 1):
        for case in cases:
            case.run(record=round_number > 0)
        print(f"  round {round_number}/{args.runs} done" + (" (warm-up)" if round_number == 0 else ""), flush=True)
    for round_number in range(args.timeline):
        for case in cases:
            case.run(record=False, timeline=True)
        print(f"  timeline round {round_number + 1}/{args.timeline} done", flush=True)


def stop_kept(runner: Runner, kept: Path, facts: dict[str, str]) -> None:
    """Stop the kept-alive server(s) with ``pgsandbox clean RUN_ID``; one means every run after the warm-up
    attached to the server the warm-up round kept."""
    try:
        stopped = stop_kept_alive(runner, kept)
    except BenchError as error:
        stopped = [f"pgsandbox clean FAILED: {error}"]
    left = stop_stragglers([kept])
    attached = {0: "", 1: " (every run after the warm-up attached to it)"}.get(
        len(stopped), " (NOT one: runs started servers)"
    )
    facts["kept-alive servers"] = f"{len(stopped)} stopped by pgsandbox clean at the end{attached}" + (
        f"; still running after it, stopped: {'; '.join(left)}" if left else ""
    )


def report(args: argparse.Namespace, cases: list[Case], facts: dict[str, str], command: str) -> int:
    print()
    print(f"Small suite ({TESTS} tests, 2 modules, a login per module where it can be): whole process")
    print(f"command: {command}")
    print_facts(facts, 24)
    print()
    width = max(len(case.label) for case in cases) + 2
    print(
        f"{'case (' + str(args.runs) + ' runs after 1 warm-up)':<{width}}{'median (s)':>11}{'min':>7}{'max':>7}"
        + "".join(f"{stage:>13}" for stage in STAGES)
    )
    for case in cases:
        if case.seconds:
            print(
                f"{case.label:<{width}}{fmt(case.median(), 2):>11}{fmt(min(case.seconds), 2):>7}"
                f"{fmt(max(case.seconds), 2):>7}" + "".join(f"{fmt(case.median(stage), 2):>13}" for stage in STAGES)
            )
        else:
            print(f"{case.label:<{width}}  FAILED")
    print("(whole process: median, min, max over the runs; then each stage's median, in seconds:")
    for stage, meaning in STAGES.items():
        print(f"   {stage}: {meaning}")
    print(")")
    by_key = {case.key: case.median() for case in cases}
    base = by_key.get("hand-written")
    ratios = {f"{key} / hand-written": divide(by_key[key], base) for key in by_key if key != "hand-written"}
    print()
    print("(below 1.00x: pgsandbox is faster)")
    print_ratios(ratios, max(len(name) for name in ratios) + 2 if ratios else 0)
    hand = next((case.timelines for case in cases if case.key == "hand-written"), [])
    timelines = {
        case.key: print_timeline(case.label, {"this case": case.timelines, "hand-written": hand})
        for case in cases
        if case.timelines and case.key != "hand-written"
    }
    print()
    for case in cases:
        print(f"  reproduce {case.key}: {case.command}")
        if case.error:
            print(f"  FAILED {case.key}:\n{case.error}")
    write_json(
        args.json,
        {
            "command": command,
            "runs": args.runs,
            "tests": TESTS,
            "facts": facts,
            "cases": {
                case.key: {
                    "label": case.label,
                    "seconds": case.seconds,
                    "stages": case.stages,
                    "error": case.error,
                }
                for case in cases
            },
            "medians": by_key,
            "ratios": ratios,
            "timelines": timelines,
        },
    )
    return 1 if any(case.error for case in cases) else 0


if __name__ == "__main__":
    sys.exit(main())
