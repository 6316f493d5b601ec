"""A real PostgreSQL server for tests: Debian's binaries, a private cluster, no Docker.

:class:`PostgresServer` runs ``initdb`` into a fresh temporary directory and starts the
``postgres`` binary itself (not ``pg_ctl``, which daemonizes: the postmaster stays this
process's child, so it can be SIGKILLed for fault tests and is stopped if pytest dies).
It listens on 127.0.0.1 on a free port, with its Unix socket inside its directory, trust
authentication for the role ``mics`` (any password is accepted), and fsync and
full_page_writes off for speed; committed data still survives ``kill()`` (see
``SERVER_SETTINGS``). Its log goes to ``postgres.log`` in that directory. The process
handling (work directory, stop, restart, cleanup) is
:class:`tests.support.process.ServiceProcess`'s; ``kill()`` is PostgreSQL's own.

PostgreSQL refuses to run as root. Under root the directory is given to the ``postgres``
OS user (created by Debian's package) and ``initdb``/``postgres`` run as that user.

Make the fixtures visible once, in ``tests/conftest.py``::

    from tests.support.postgres import postgres_db, postgres_server  # noqa: F401

then ask for them::

    from tests.support.postgres import PostgresDatabase, PostgresServer

    async def test_something(postgres_db: PostgresDatabase) -> None:
        conn = await asyncpg.connect(postgres_db.dsn)        # postgresql://mics@...
        engine = create_async_engine(postgres_db.async_url)  # postgresql+asyncpg://...

``postgres_server`` is one server for the session (started on first use, about 1 s,
stopped at the end, also if the run is interrupted or killed); ``postgres_db`` is a fresh
empty database per test, dropped afterwards. Fault tests may ``kill()``/``stop()`` and
``start()``/``restart()`` the server (same port, same data); they must leave it running.
The lifecycle methods block (kill ~20 ms, start/restart ~0.1 s): async tests may just
call them. (From ``asyncio.to_thread`` they work too, but a server started from a worker
thread is not stopped if pytest is SIGKILLed; atexit still stops it.)

If the binaries are missing, the first start runs ``scripts/install-services``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# OWNER_FILE, die_with_parent, free_port and remove_stale_workdirs: formerly defined
# here, still importable from here.
from tests.support.process import INSTALL_SCRIPT as INSTALL_SCRIPT
from tests.support.process import OWNER_FILE as OWNER_FILE
from tests.support.process import (
    ServiceProcess,
    ServiceProcessError,
    pid_alive,
    run_install_services,
    run_tool,
)
from tests.support.process import die_with_parent as die_with_parent
from tests.support.process import free_port as free_port
from tests.support.process import remove_stale_workdirs as remove_stale_workdirs

PG_ROOT = Path("/usr/lib/postgresql")

USER = "mics"
DEFAULT_DATABASE = "postgres"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
WORKDIR_PREFIX = "mics-pg-"

# Speed over durability against *machine* crashes, which a test cluster never survives
# anyway. Not against process crashes: synchronous_commit stays on, so a commit is in the
# OS page cache when acknowledged and survives kill(). With fsync off it costs one write()
# per commit (measured: no slower than off); with it off, commits acknowledged in the
# last ~200 ms before kill() are lost, which would make crash tests flaky.
SERVER_SETTINGS: dict[str, str] = {
    "fsync": "off",
    "synchronous_commit": "on",
    "full_page_writes": "off",
    "shared_buffers": "16MB",
    "max_connections": "100",
    "max_wal_size": "1GB",
    "checkpoint_timeout": "1h",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "log_min_messages": "warning",
    "log_line_prefix": "%m [%p] ",
    "log_timezone": "UTC",
    "timezone": "UTC",
}


class PostgresServerError(ServiceProcessError):
    """The server could not be found, initialised, started, stopped or queried."""


# --- killing a process tree ------------------------------------------------------------


def child_pids(parent: int, *, zombies: bool = False) -> list[int]:
    """The direct children of ``parent`` (zombies too if asked), from /proc."""
    children: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split(" ")
        if (zombies or fields[0] not in ("Z", "X")) and int(fields[1]) == parent:
            children.append(int(entry.name))
    return children


@contextlib.contextmanager
def _child_subreaper() -> Iterator[None]:
    """Make this process a child subreaper (Linux) for the duration of the block."""
    pr_set_child_subreaper, pr_get_child_subreaper = 36, 37
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        yield
        return
    was = ctypes.c_int(0)
    already = prctl(pr_get_child_subreaper, ctypes.byref(was), 0, 0, 0) == 0 and was.value
    if not already:
        prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    try:
        yield
    finally:
        if not already:
            prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def _reap_orphans(pids: list[int], timeout: float = 10.0) -> None:
    """Wait until every pid has exited, reaping those that became our children."""
    deadline = time.monotonic() + timeout
    pending = set(pids)
    while pending:
        for pid in list(pending):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not ours (no subreaper): init reaps it
                done = 0 if pid_alive(pid) else pid
            if done:
                pending.discard(pid)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise PostgresServerError(f"processes survived SIGKILL: {sorted(pending)}")
        time.sleep(0.005)


# --- binaries --------------------------------------------------------------------------


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", path.name)) or (0,)


def find_pg_bindir(*, install: bool = True) -> Path:
    """The directory holding ``initdb`` and ``postgres``: ``$MICS_PG_BINDIR``, else the
    newest ``/usr/lib/postgresql/<ver>/bin``, else the one of ``postgres`` on PATH.

    Runs ``scripts/install-services`` once if none is found and ``install`` is true.
    """
    override = os.environ.get("MICS_PG_BINDIR")
    if override:
        bindir = Path(override)
        if not (bindir / "postgres").is_file():
            raise PostgresServerError(f"MICS_PG_BINDIR={override} holds no postgres binary")
        return bindir
    versions = sorted(
        (d for d in PG_ROOT.glob("*") if (d / "bin" / "postgres").is_file()),
        key=_version_key,
        reverse=True,
    )
    for version in versions:
        bindir = version / "bin"
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_isready", "psql")):
            return bindir
    on_path = shutil.which("postgres")
    if on_path:
        bindir = Path(on_path).resolve().parent
        if (bindir / "initdb").is_file():
            return bindir
    if install:
        run_install_services(PostgresServerError)
        return find_pg_bindir(install=False)
    raise PostgresServerError(
        "PostgreSQL server binaries not found (looked in /usr/lib/postgresql/*/bin and "
        "PATH): run scripts/install-services, or apt-get install postgresql"
    )


def _run_as() -> tuple[str, int, int] | None:
    """Under root: the unprivileged OS user (name, uid, gid) to run PostgreSQL as."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, entry.pw_uid, entry.pw_gid
    raise PostgresServerError("running as root, and neither a postgres nor a nobody user")


@dataclass(frozen=True)
class PostgresDatabase:
    """One database on a :class:`PostgresServer` (what ``postgres_db`` yields)."""

    server: PostgresServer
    name: str

    @property
    def dsn(self) -> str:
        """``postgresql://mics@127.0.0.1:<port>/<name>``: asyncpg, psycopg, libpq."""
        return self.server.dsn_for(self.name)

    @property
    def async_url(self) -> str:
        """``postgresql+asyncpg://mics@127.0.0.1:<port>/<name>``: SQLAlchemy async."""
        return self.server.async_url_for(self.name)


class PostgresServer(ServiceProcess):
    """One private PostgreSQL cluster. Port and data directory are chosen once, in the
    constructor, and kept across ``stop()``/``kill()`` and ``start()``.

    ``start()`` runs initdb the first time; ``stop()`` is a fast shutdown (SIGINT:
    sessions are ended, data is flushed), then an immediate one (SIGQUIT), then
    ``kill()``; ``kill()`` crashes the postmaster and all it forked, and the next
    ``start()`` runs crash recovery on the same data.
    """

    name = "postgres"
    error = PostgresServerError
    workdir_prefix = WORKDIR_PREFIX
    log_name = "postgres.log"
    stop_timeout = STOP_TIMEOUT_S
    death_signal = signal.SIGINT
    port_taken_messages = ("could not bind", "Address already in use")

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        settings: Mapping[str, str | int] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        super().__init__(workdir, ready_timeout=ready_timeout)
        self.data_dir = self.workdir / "data"
        self.socket_dir = self.workdir / "run"
        self.user = USER
        self.database = DEFAULT_DATABASE
        self._settings = {**SERVER_SETTINGS, **{k: str(v) for k, v in (settings or {}).items()}}
        self._bindir: Path | None = None
        self._run_as = _run_as()

    # --- addresses -------------------------------------------------------------------

    def dsn_for(self, database: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def async_url_for(self, database: str) -> str:
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{database}"

    @property
    def dsn(self) -> str:
        """libpq/asyncpg URL of the default database (``postgres``)."""
        return self.dsn_for(self.database)

    @property
    def async_url(self) -> str:
        """SQLAlchemy async URL of the default database (``postgres``)."""
        return self.async_url_for(self.database)

    @property
    def version(self) -> int:
        """The cluster's major version (from ``PG_VERSION``; 0 before ``initdb``)."""
        try:
            return int((self.data_dir / "PG_VERSION").read_text().strip().split(".")[0])
        except (OSError, ValueError):
            return 0

    @property
    def bindir(self) -> Path:
        if self._bindir is None:
            self._bindir = find_pg_bindir()
        return self._bindir

    # --- lifecycle: PostgreSQL's own parts -------------------------------------------

    def _stop_signals(self, timeout: float) -> tuple[tuple[signal.Signals, float], ...]:
        return ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0))

    def _kill_process(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the postmaster and every process it forked, with no shutdown at all.

        Each PostgreSQL child is its own session leader, so the postmaster is stopped
        first (it can fork no more), its children are listed, then all are killed and
        reaped; returns once none is left (a survivor attached to the shared memory would
        make the next start fail).
        """
        # Orphans go to the nearest subreaper: be it, so the killed children are reaped
        # here and now, not whenever init gets to them.
        with _child_subreaper():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGSTOP)
            # Zombies too: children that exited but the stopped postmaster did not reap
            # yet become ours to reap once it is gone.
            children = child_pids(proc.pid, zombies=True)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            for child in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            proc.wait()
            _reap_orphans(children)

    # --- databases -------------------------------------------------------------------

    def execute(self, sql: str, database: str | None = None) -> str:
        """Run SQL through ``psql`` (blocking, usable with or without an event loop)."""
        command = [
            str(self.bindir / "psql"),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-d",
            database or self.database,
            "-c",
            sql,
        ]
        done = run_tool(command, PostgresServerError, timeout=60, what="psql", env=_client_env())
        if done.returncode != 0:
            raise PostgresServerError(f"psql {sql!r} failed: {done.stderr.strip()}")
        return done.stdout

    def create_database(self, name: str) -> PostgresDatabase:
        """Create an empty database owned by ``mics``."""
        # FILE_COPY (PostgreSQL >= 15) copies the template's files instead of logging
        # them to the WAL: about a quarter faster with fsync off.
        strategy = " STRATEGY FILE_COPY" if self.version >= 15 else ""
        self.execute(f'CREATE DATABASE "{_identifier(name)}"{strategy}')
        return PostgresDatabase(self, name)

    def drop_database(self, name: str) -> None:
        """Drop a database, terminating any sessions still connected to it."""
        self.execute(f'DROP DATABASE IF EXISTS "{_identifier(name)}" WITH (FORCE)')

    # --- readiness -------------------------------------------------------------------

    def _probe(self, pid: int, remaining: float) -> str | None:
        """Polls the status line of ``postmaster.pid`` (``starting`` -> ``ready``, what
        ``pg_ctl -w`` waits on; a stale file left by ``kill()`` names another pid), then
        proves it with a real connection (``pg_isready``).
        """
        status = self._pidfile_status(pid)
        if not status:
            return "postmaster.pid not written yet"
        if status != "ready":
            return f"postmaster.pid says {status!r}"
        answer = self._pg_isready(max(1, min(5, int(remaining))))
        if answer == 0:
            return None
        return {1: "rejecting connections", 2: "no response"}.get(
            answer, f"pg_isready exit {answer}"
        )

    def _pidfile_status(self, pid: int) -> str | None:
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        if len(lines) < 8 or lines[0].strip() != str(pid):
            return None
        return lines[7].strip()

    def _pg_isready(self, timeout_s: int) -> int:
        command = [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1"]
        command += ["-p", str(self.port), "-U", self.user, "-d", self.database]
        done = subprocess.run(
            [*command, "-t", str(timeout_s)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            env=_client_env(),
        )
        return done.returncode

    # --- internals -------------------------------------------------------------------

    def _as_user(self) -> dict[str, Any]:
        if self._run_as is None:
            return {}
        _, uid, gid = self._run_as
        return {"user": uid, "group": gid, "extra_groups": []}

    def _chown_workdir(self) -> None:
        if self._run_as is None:
            return
        _, uid, gid = self._run_as
        for root, dirs, files in os.walk(self.workdir):
            os.chown(root, uid, gid)
            for name in dirs + files:
                os.lchown(os.path.join(root, name), uid, gid)

    def _prepare(self) -> None:
        """Run initdb the first time."""
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()

    def _initdb(self) -> None:
        self.socket_dir.mkdir(exist_ok=True)
        self._chown_workdir()
        command = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        done = run_tool(
            command,
            PostgresServerError,
            timeout=120,
            what="initdb",
            cwd=self.workdir,
            env=_server_env(),
            **self._as_user(),
        )
        (self.workdir / "initdb.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise PostgresServerError(f"initdb failed ({done.returncode}):\n{output}")

    def _command(self) -> list[str]:
        settings = {
            **self._settings,
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
        }
        options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        return [str(self.bindir / "postgres"), "-D", str(self.data_dir), *options]

    def _popen_options(self) -> dict[str, Any]:
        return {"env": _server_env(), **self._as_user()}


def _identifier(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain SQL identifier: {name!r}")
    return name


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_"))}
    env["LANG"] = "C"
    return env


def _client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGCONNECT_TIMEOUT"] = "5"
    return env


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session; always stopped and removed."""
    yield from PostgresServer().serve()


@pytest.fixture
def postgres_db(postgres_server: PostgresServer) -> Iterator[PostgresDatabase]:
    """A fresh, empty database for one test (``test_<hex>``), dropped afterwards."""
    if not postgres_server.running:  # an earlier fault test left it down
        postgres_server.start()
    database = postgres_server.create_database(f"test_{uuid.uuid4().hex}")
    try:
        yield database
    finally:
        if not postgres_server.running:
            postgres_server.start()
        postgres_server.drop_database(database.name)
