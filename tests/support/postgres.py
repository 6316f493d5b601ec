"""A real PostgreSQL server for tests: Debian's binaries, a private cluster, no Docker.

:class:`PostgresServer` runs ``initdb`` into a fresh temporary directory and starts the
``postgres`` binary itself (not ``pg_ctl``, which daemonizes: the postmaster stays this
process's child, so it can be SIGKILLed for fault tests and is stopped if pytest dies).
It listens on 127.0.0.1 on a free port, with its Unix socket inside its directory, trust
authentication for the role ``mics`` (any password is accepted), and fsync and
full_page_writes off for speed; committed data still survives ``kill()`` (see
``SERVER_SETTINGS``). Its log goes to ``postgres.log`` in that directory.

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

import atexit
import contextlib
import ctypes
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "install-services"
PG_ROOT = Path("/usr/lib/postgresql")

USER = "mics"
DEFAULT_DATABASE = "postgres"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0
WORKDIR_PREFIX = "mics-pg-"
OWNER_FILE = "owner.pid"

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


class PostgresServerError(RuntimeError):
    """The server could not be found, initialised, started, stopped or queried."""


# --- process helpers, shared with tests/support/redis.py ----------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range.

    Outgoing connections take their local ports from the ephemeral range, so a port
    below it cannot be grabbed by a client while the server is down for a restart.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = range(max(1024, low - 12000), low) if low > 3024 else range(20000, 30000)
    for _ in range(200):
        port = random.choice(candidates)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        fallback: int = sock.getsockname()[1]
        return fallback


def die_with_parent(sig: signal.Signals) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when pytest dies.

    Covers a run killed outright (no finally, no atexit). Only from the main thread: the
    signal fires when the *thread* that forked exits, and a worker thread
    (``asyncio.to_thread``) would take the server down with it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)

    return preexec


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[stat.rfind(")") + 2 :].split(" ", 1)[0] not in ("Z", "X")


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


def remove_stale_workdirs(prefix: str) -> None:
    """Delete work directories left by earlier runs that were killed (owner pid gone)."""
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            owner = int((path / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not pid_alive(owner):
            shutil.rmtree(path, ignore_errors=True)


def run_install_services(error: type[Exception] = PostgresServerError) -> None:
    """Run ``scripts/install-services`` (silent and instant when all is installed)."""
    try:
        done = subprocess.run(
            ["bash", str(INSTALL_SCRIPT)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{INSTALL_SCRIPT} failed: {exc}") from exc
    if done.returncode != 0:
        raise error(
            f"{INSTALL_SCRIPT} exited with {done.returncode}:\n"
            f"{done.stdout.strip()}\n{done.stderr.strip()}"
        )


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
        run_install_services()
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


class PostgresServer:
    """One private PostgreSQL cluster. Port and data directory are chosen once, in the
    constructor, and kept across ``stop()``/``kill()`` and ``start()``.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        settings: Mapping[str, str | int] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self._owns_workdir = workdir is None
        if workdir is None:
            remove_stale_workdirs(WORKDIR_PREFIX)
            workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.data_dir = self.workdir / "data"
        self.socket_dir = self.workdir / "run"
        self.log_file = self.workdir / "postgres.log"
        self.port = free_port()
        self.user = USER
        self.database = DEFAULT_DATABASE
        self.ready_timeout = ready_timeout
        self._settings = {**SERVER_SETTINGS, **{k: str(v) for k, v in (settings or {}).items()}}
        self._bindir: Path | None = None
        self._run_as = _run_as()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._atexit_registered = False
        self.starts = 0

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
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        return self._proc.pid if self.running and self._proc else None

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

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the server (running initdb the first time) and wait until it accepts
        connections. The first start moves to another free port if its port was taken
        in the meantime; later starts keep the port.
        """
        if self.running:
            raise PostgresServerError(f"postgres already running (pid {self.pid})")
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        attempts = 3 if self.starts == 0 else 1
        for attempt in range(attempts):
            self._spawn()
            try:
                self.wait_ready(self.ready_timeout)
                return
            except BaseException as exc:
                self.kill()
                port_taken = isinstance(exc, PostgresServerError) and (
                    "could not bind" in str(exc) or "Address already in use" in str(exc)
                )
                if port_taken and attempt + 1 < attempts:
                    self.port = free_port()
                    continue
                raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Fast shutdown (SIGINT: sessions are ended, data is flushed); if the server is
        still up after ``timeout`` seconds, immediate shutdown, then SIGKILL.
        """
        proc = self._proc
        if proc is None:
            return
        for sig, wait_s in ((signal.SIGINT, timeout), (signal.SIGQUIT, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait_s)
        if proc.poll() is None:
            self.kill()
            return
        self._reap()

    def kill(self) -> None:
        """Crash the server: SIGKILL the postmaster and every process it forked, with no
        shutdown at all. The next ``start()`` runs crash recovery on the same data.

        Each PostgreSQL child is its own session leader, so the postmaster is stopped
        first (it can fork no more), its children are listed, then all are killed and
        reaped; returns once none is left (a survivor attached to the shared memory would
        make the next start fail).
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # Orphans go to the nearest subreaper: be it, so the killed children are
            # reaped here and now, not whenever init gets to them.
            with _child_subreaper():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGSTOP)
                # Zombies too: children that exited but the stopped postmaster did not
                # reap yet become ours to reap once it is gone.
                children = child_pids(proc.pid, zombies=True)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                for child in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                proc.wait()
                _reap_orphans(children)
        self._reap()

    def restart(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop (if running) and start again on the same port and data directory."""
        self.stop(timeout)
        self.start()

    def close(self) -> None:
        """Stop the server; remove its directory if this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        try:
            done = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env=_client_env(),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresServerError(f"psql failed: {exc}") from exc
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

    # --- readiness and diagnostics ---------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Block until the server accepts connections, or raise with the end of its log.

        Polls the status line of ``postmaster.pid`` (``starting`` -> ``ready``, what
        ``pg_ctl -w`` waits on; a stale file left by ``kill()`` names another pid), then
        proves it with a real connection (``pg_isready``).
        """
        deadline = time.monotonic() + timeout
        last = "postmaster.pid not written yet"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise PostgresServerError(
                    f"postgres exited with code {code} while starting\n{self._tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PostgresServerError(
                    f"postgres on 127.0.0.1:{self.port} not ready after {timeout:.0f} s "
                    f"({last})\n{self._tail()}"
                )
            status = self._pidfile_status(proc.pid)
            if status == "ready":
                answer = self._pg_isready(max(1, min(5, int(remaining))))
                if answer == 0:
                    return
                last = {1: "rejecting connections", 2: "no response"}.get(
                    answer, f"pg_isready exit {answer}"
                )
            elif status:
                last = f"postmaster.pid says {status!r}"
            time.sleep(0.01)

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

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _tail(self) -> str:
        return f"--- last lines of {self.log_file} ---\n{self.log_tail()}"

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
        try:
            done = subprocess.run(
                command,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                env=_server_env(),
                **self._as_user(),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresServerError(f"initdb failed: {exc}") from exc
        (self.workdir / "initdb.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise PostgresServerError(f"initdb failed ({done.returncode}):\n{output}")

    def _spawn(self) -> None:
        self.starts += 1
        self._log_fh = self.log_file.open("ab")
        self._log_fh.write(f"=== start #{self.starts} on port {self.port} ===\n".encode())
        self._log_fh.flush()
        settings = {
            **self._settings,
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
        }
        options = [arg for key, value in settings.items() for arg in ("-c", f"{key}={value}")]
        self._proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data_dir), *options],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            env=_server_env(),
            start_new_session=True,  # Ctrl-C reaches pytest only; it stops the server
            preexec_fn=die_with_parent(signal.SIGINT),  # after setuid: survives it
            **self._as_user(),
        )
        if not self._atexit_registered:
            atexit.register(self._at_exit)
            self._atexit_registered = True

    def _reap(self) -> None:
        self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


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
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


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
