"""A real Redis server for tests: Debian's ``redis-server``, a private one, no Docker.

:class:`RedisServer` runs ``redis-server`` in the foreground on 127.0.0.1 and a free
port, with no persistence (``--save "" --appendonly no``), its working directory and log
(``redis.log``) in a fresh temporary directory. Root is fine for Redis. The process
handling (work directory, stop, kill, restart, cleanup) is
:class:`tests.support.process.ServiceProcess`'s.

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

import contextlib
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.support.process import ServiceProcess, ServiceProcessError, run_install_services

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
WORKDIR_PREFIX = "mics-redis-"


class RedisServerError(ServiceProcessError):
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


class RedisServer(ServiceProcess):
    """One private ``redis-server``. The port and directory are chosen once, in the
    constructor, and kept across ``stop()``/``kill()`` and ``start()``.

    ``stop()`` is SIGTERM (Redis shuts down; nothing to save), SIGKILL after the timeout;
    ``kill()`` is SIGKILL, and the data is lost (no persistence).
    """

    name = "redis-server"
    error = RedisServerError
    workdir_prefix = WORKDIR_PREFIX
    log_name = "redis.log"
    stop_timeout = STOP_TIMEOUT_S
    port_taken_messages = ("already in use",)

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        options: Mapping[str, str | int] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        super().__init__(workdir, ready_timeout=ready_timeout)
        self.host = "127.0.0.1"
        self._options = {k: str(v) for k, v in (options or {}).items()}
        self._binary: str | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://{self.host}:{self.port}/0"

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

    # --- readiness -------------------------------------------------------------------

    def _probe(self, pid: int, remaining: float) -> str | None:
        """Ready once PING is answered."""
        try:
            with contextlib.closing(
                self.client(socket_connect_timeout=0.5, socket_timeout=1)
            ) as client:
                return None if client.ping() else "PING not answered"
        except (redis.RedisError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"

    # --- internals -------------------------------------------------------------------

    def _prepare(self) -> None:
        self._binary = find_redis_server()

    def _command(self) -> list[str]:
        assert self._binary is not None, "_prepare() runs first"
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
        return [
            self._binary,
            *(arg for key, value in options.items() for arg in (f"--{key}", value)),
        ]


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One Redis server for the whole session; always stopped and removed."""
    yield from RedisServer().serve()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied (FLUSHALL) for this test."""
    if not redis_server.running:  # an earlier fault test left it down
        redis_server.start()
    redis_server.flushall()
    return redis_server.url
