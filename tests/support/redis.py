"""A real Redis server for tests: Debian's ``redis-server``, a private one, no Docker.

:class:`RedisServer` runs ``redis-server`` in the foreground on 127.0.0.1 and a free
port, with no persistence (``--save "" --appendonly no``), its working directory and log
(``redis.log``) in a fresh temporary directory. Root is fine for Redis.

Make the fixtures visible once, in ``tests/conftest.py``::

    from tests.support.redis import redis_server, redis_url  # noqa: F401

then ask for them::

    from tests.support.redis import RedisServer

    async def test_something(redis_url: str) -> None:
        client = redis.asyncio.Redis.from_url(redis_url)  # redis://127.0.0.1:<port>/0

``redis_server`` is one server for the session (about 0.05 s to start; stopped at the
end, also if the run is interrupted or killed); ``redis_url`` is its URL after a
FLUSHALL, so every test starts from an empty server. Fault tests may ``kill()``/``stop()``
and ``start()``/``restart()`` it (same port; the data is gone, there is no persistence);
they must leave it running.

If ``redis-server`` is missing, the first start runs ``scripts/install-services``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.postgres import (
    OWNER_FILE,
    die_with_parent,
    free_port,
    remove_stale_workdirs,
    run_install_services,
)

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
WORKDIR_PREFIX = "mics-redis-"


class RedisServerError(RuntimeError):
    """The server could not be found, started or stopped."""


def find_redis_server(*, install: bool = True) -> str:
    """``$MICS_REDIS_SERVER``, else ``redis-server`` on PATH or in /usr/bin.

    Runs ``scripts/install-services`` once if it is missing and ``install`` is true.
    """
    override = os.environ.get("MICS_REDIS_SERVER")
    if override:
        if not Path(override).is_file():
            raise RedisServerError(f"MICS_REDIS_SERVER={override} is not a file")
        return override
    found = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if Path("/usr/bin/redis-server").is_file() else None
    )
    if found:
        return found
    if install:
        run_install_services(RedisServerError)
        return find_redis_server(install=False)
    raise RedisServerError(
        "redis-server not found: run scripts/install-services, or apt-get install redis-server"
    )


class RedisServer:
    """One private ``redis-server``. The port and directory are chosen once, in the
    constructor, and kept across ``stop()``/``kill()`` and ``start()``.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        options: Mapping[str, str | int] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self._owns_workdir = workdir is None
        if workdir is None:
            remove_stale_workdirs(WORKDIR_PREFIX)
            workdir = tempfile.mkdtemp(prefix=WORKDIR_PREFIX)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.log_file = self.workdir / "redis.log"
        self.host = "127.0.0.1"
        self.port = free_port()
        self.ready_timeout = ready_timeout
        self._options = {k: str(v) for k, v in (options or {}).items()}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._atexit_registered = False
        self.starts = 0

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def client(self, **kwargs: object) -> redis.Redis:
        """A synchronous client that fails fast instead of retrying."""
        settings: dict[str, object] = {
            "socket_connect_timeout": 2.0,
            "socket_timeout": 5.0,
            "retry": Retry(NoBackoff(), 0),
            **kwargs,
        }
        return redis.Redis(host=self.host, port=self.port, **settings)  # type: ignore[arg-type]

    def flushall(self) -> None:
        with contextlib.closing(self.client()) as client:
            client.flushall()

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it answers PING. The first start moves to
        another free port if its port was taken meanwhile; later starts keep the port.
        """
        if self.running:
            raise RedisServerError(f"redis-server already running (pid {self.pid})")
        binary = find_redis_server()
        attempts = 3 if self.starts == 0 else 1
        for attempt in range(attempts):
            self._spawn(binary)
            try:
                self.wait_ready(self.ready_timeout)
                return
            except BaseException as exc:
                self.kill()
                port_taken = isinstance(exc, RedisServerError) and "already in use" in str(exc)
                if port_taken and attempt + 1 < attempts:
                    self.port = free_port()
                    continue
                raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (Redis shuts down; nothing to save), SIGKILL after ``timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """Crash the server: SIGKILL. Its data is lost (no persistence)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._reap()

    def restart(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop (if running) and start again on the same port."""
        self.stop(timeout)
        self.start()

    def close(self) -> None:
        """Stop the server; remove its directory if this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- readiness and diagnostics ---------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Block until PING is answered, or raise with the end of the server log."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        with contextlib.closing(self.client(socket_connect_timeout=0.5, socket_timeout=1)) as c:
            while True:
                proc = self._proc
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    raise RedisServerError(
                        f"redis-server exited with code {code} while starting\n{self._tail()}"
                    )
                if time.monotonic() > deadline:
                    raise RedisServerError(
                        f"redis-server on {self.host}:{self.port} not ready after "
                        f"{timeout:.0f} s ({last})\n{self._tail()}"
                    )
                try:
                    if c.ping():
                        return
                except (redis.RedisError, OSError) as exc:
                    last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.01)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _tail(self) -> str:
        return f"--- last lines of {self.log_file} ---\n{self.log_tail()}"

    # --- internals -------------------------------------------------------------------

    def _command(self, binary: str) -> list[str]:
        options = {
            "bind": self.host,
            "port": str(self.port),
            "save": "",
            "appendonly": "no",
            "daemonize": "no",
            "dir": str(self.workdir),
            "logfile": "",  # stdout, which goes to redis.log
            "databases": "16",
            **self._options,
        }
        return [binary, *(arg for key, value in options.items() for arg in (f"--{key}", value))]

    def _spawn(self, binary: str) -> None:
        self.starts += 1
        self._log_fh = self.log_file.open("ab")
        self._log_fh.write(f"=== start #{self.starts} on port {self.port} ===\n".encode())
        self._log_fh.flush()
        self._proc = subprocess.Popen(
            self._command(binary),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches pytest only; it stops the server
            preexec_fn=die_with_parent(signal.SIGTERM),
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


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis server for the whole session; always stopped and removed."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied (FLUSHALL) for this test."""
    if not redis_server.running:  # an earlier fault test left it down
        redis_server.start()
    redis_server.flushall()
    return redis_server.url
