"""Application factory and server lifecycle of the reference backend.

    config = load_config("backend.toml")          # or demo_config()
    async with BackendServer(config) as server:   # binds; port 0 picks a free port
        print(server.url)                         # give this to the gateway
        ...

Routes: the hooks (:mod:`mics.backend.hookserver`), the admin API under ``/admin``
(:mod:`mics.backend.admin`), and ``GET /``, ``/healthz``, ``/readyz``, ``/metrics``.

Besides HTTP, a started server runs the offline path of its state: the store (opened at
start when ``database_url`` or Kafka is configured, else on first use), the Kafka
consumers (only with ``kafka_bootstrap_servers``), the nudger and the periodic jobs.
Events of an in-process bus go to :attr:`BackendServer.event_subscriber`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from aiohttp import web

from mics.backend.admin import AdminApi
from mics.backend.config import BackendConfig
from mics.backend.consumer import OfflineConsumers
from mics.backend.hookserver import HookServer
from mics.backend.jobs import PeriodicJobs
from mics.backend.replay import wall_clock_ms
from mics.backend.state import BackendState
from mics.observability.metrics import CONTENT_TYPE

log = logging.getLogger("mics.backend")

# The state of the application, for handlers added by other modules.
STATE_KEY = web.AppKey("mics_backend_state", BackendState)


def create_backend_app(state: BackendState) -> web.Application:
    """The aiohttp application serving ``state``; everything is wired from the argument."""
    app = web.Application(client_max_size=state.config.max_request_bytes)
    app[STATE_KEY] = state
    app.add_routes(HookServer(state).routes())

    async def index(request: web.Request) -> web.Response:
        return web.Response(text="MICS reference backend")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def readyz(request: web.Request) -> web.Response:
        # 503 once shutdown began, so that load balancers stop sending hooks here.
        return web.Response(text="ok") if state.ready else web.Response(status=503)

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=state.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    app.add_routes(
        [
            web.get("/", index),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/metrics", metrics),
        ]
    )

    if state.config.admin_enabled:
        app.add_subapp("/admin", AdminApi(state).app())
    else:
        log.warning(
            "admin API disabled: the backend listens on a non-loopback address "
            "and no admin_token is configured",
            extra={"host": state.config.host},
        )
    return app


class BackendServer:
    """One running backend: ``await start()``, then ``port`` / ``url``; ``await stop()``."""

    def __init__(
        self,
        config: BackendConfig,
        *,
        state: BackendState | None = None,
        clock: Callable[[], int] = wall_clock_ms,
        shutdown_timeout: float = 5.0,
        consumer_settings: dict[str, Any] | None = None,
    ) -> None:
        """``state`` defaults to a fresh BackendState.from_config(config, clock=clock).

        ``consumer_settings`` are keyword arguments of each
        :class:`mics.backend.consumer.OfflineConsumer` (batch size, backoff, ...).
        """
        self.config = config
        self.state = state or BackendState.from_config(config, clock=clock)
        self._shutdown_timeout = shutdown_timeout
        self._consumer_settings = consumer_settings or {}
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self.consumers = OfflineConsumers([])
        self.jobs = PeriodicJobs(
            self.state.store,
            self.state.metrics,
            interval_s=config.jobs_interval_seconds,
            retention_days=config.retention_days,
        )

    @property
    def event_subscriber(self) -> Callable[[str, bytes, bytes], Awaitable[None]]:
        """The in-process event bus subscriber ``(topic, key, value)``: stores
        OFFLINE_MESSAGE events like the Kafka consumer does; raises if storing failed."""
        return self.state.ingestor.store_event_bytes

    @property
    def port(self) -> int:
        """The bound TCP port (the real one when the config says 0)."""
        if self._port is None:
            raise RuntimeError("BackendServer is not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the hooks: ``public_url`` if configured, else http://host:port.

        This is TenantRuntimeConfig.hook_base_url and the gateway's TENANT_AUTH_MAP entry.
        """
        if self._port is None:
            raise RuntimeError("BackendServer is not started")
        return self.state.public_url

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("BackendServer already started")
        state = self.state
        config = self.config
        # A configured database must work before we answer hooks: fail fast.
        if config.database_url or config.kafka_bootstrap_servers:
            await state.store.open()
        state.nudger.reopen()
        runner = web.AppRunner(create_backend_app(state), shutdown_timeout=self._shutdown_timeout)
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.host, config.port)
            await site.start()
            self.consumers = OfflineConsumers.from_config(
                config, state.ingestor, state.metrics, **self._consumer_settings
            )
            await self.consumers.start()
        except BaseException:
            await runner.cleanup()
            await self._stop_offline()
            raise
        self.jobs.start()
        self._runner = runner
        # With port 0 every socket of the site has its own port; with a hostname that
        # resolves to several addresses, use an IP literal to get one port.
        self._port = int(runner.addresses[0][1])
        self.state.public_url = self.config.resolved_public_url(self._port)
        self.state.ready = True
        log.info("backend listening", extra={"url": self.state.public_url, "port": self._port})

    async def stop(self) -> None:
        """Stop listening and finish in-flight requests (up to shutdown_timeout)."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        self.state.ready = False
        # Consumers first: a batch in progress is stored and committed, then no more.
        await self.consumers.stop()
        await runner.cleanup()
        await self._stop_offline()
        self._port = None
        log.info("backend stopped")

    async def _stop_offline(self) -> None:
        await self.consumers.stop()
        await self.jobs.stop()
        await self.state.nudger.close()
        await self.state.store.close()

    async def __aenter__(self) -> BackendServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def run_backend(config: BackendConfig, *, ready: asyncio.Event | None = None) -> None:
    """Serve ``config`` until cancelled (the ``mics backend`` command).

    ``ready`` is set once the backend listens. Callers that need the bound port should
    use :class:`BackendServer` directly.
    """
    server = BackendServer(config)
    await server.start()
    try:
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()  # until the task is cancelled
    finally:
        await server.stop()
