"""Offline-available nudges to the gateway (protocol.md section 9.5).

After an OFFLINE_MESSAGE for user X of tenant T is durably stored, and never before, the
backend calls ``POST {gateway}/v1/offline-available`` with a signed
``OfflineAvailableRequest{meta, user_id}``; a gateway node holding X's connections makes
them pull again, so a message stored while X was online still arrives within seconds.

:meth:`Nudger.notify` never blocks and never fails: storing must not wait for the
gateway. Per (tenant, user):

* notifications within ``debounce_s`` are coalesced into one call;
* at most one call is in flight; notifications arriving meanwhile queue exactly one
  more call (the re-pull the in-flight call triggers may already have run before the
  newer row was committed);
* a call is retried once, on the next configured node, after a 5xx, a network error or a
  timeout; 4xx answers (``invalid sign``, ``invalid tenant``, ...) are not retried.

At most ``max_pending`` users wait for a nudge; beyond that new ones are dropped and
counted (``offline_nudge_total{result="dropped"}``): the messages stay stored and arrive
with the next pull. Each attempt is a new request (new request id and timestamp), as the
gateway rejects replayed ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import aiohttp

from mics.protocol.ids import new_request_id
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.signing import sign_hook_request

if TYPE_CHECKING:
    from mics.backend.state import BackendMetrics

log = logging.getLogger("mics.backend.nudge")

PATH = "/v1/offline-available"
PROTOBUF = "application/protobuf"

# offline_nudge_total{result}
NUDGE_OK = "ok"
NUDGE_RETRIED = "retried"  # first attempt failed, a second one was made
NUDGE_FAILED = "failed"  # both attempts failed (5xx, network, timeout)
NUDGE_REJECTED = "rejected"  # 4xx: the gateway refused (sign, tenant, ...)
NUDGE_DROPPED = "dropped"  # too many users waiting, or no secret
NUDGE_ERROR = "error"  # unexpected exception


class _Retry(Exception):
    """This attempt failed in a way worth one retry on another node."""


class Nudger:
    """Debounced, bounded nudges for one backend. Create it anywhere; the HTTP session
    is created on first use and closed by :meth:`close`."""

    def __init__(
        self,
        gateway_urls: list[str],
        secret_for: Callable[[str], str | None],
        metrics: BackendMetrics,
        *,
        debounce_s: float = 0.05,
        timeout_s: float = 2.0,
        max_concurrency: int = 64,
        max_pending: int = 100_000,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self.urls = [url.rstrip("/") for url in gateway_urls]
        self._secret_for = secret_for
        self._metrics = metrics
        self._debounce_s = debounce_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._max_concurrency = max_concurrency
        self._max_pending = max_pending
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self._next_url = itertools.cycle(range(len(self.urls))) if self.urls else None
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._dirty: set[tuple[str, str]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._closed = False

    def set_gateway_urls(self, gateway_urls: list[str]) -> None:
        """Point the nudges at other gateways (for embedding, where a gateway's port is
        known only after the backend started)."""
        self.urls = [url.rstrip("/") for url in gateway_urls]
        self._next_url = itertools.cycle(range(len(self.urls))) if self.urls else None

    @property
    def enabled(self) -> bool:
        return bool(self.urls)

    @property
    def pending(self) -> int:
        """Users with a nudge scheduled or in flight."""
        return len(self._tasks)

    def notify(self, tenant_id: str, user_id: str) -> None:
        """Schedule a nudge for (tenant, user); returns at once."""
        if not self.urls or self._closed:
            return
        key = (tenant_id, user_id)
        self._dirty.add(key)
        if key in self._tasks:
            return  # coalesced into the scheduled or queued call
        if len(self._tasks) >= self._max_pending:
            self._dirty.discard(key)
            self._metrics.nudges.labels(tenant_id, NUDGE_DROPPED).inc()
            return
        self._tasks[key] = asyncio.get_running_loop().create_task(self._run(key))

    async def _run(self, key: tuple[str, str]) -> None:
        try:
            while key in self._dirty:
                if self._debounce_s > 0:
                    await asyncio.sleep(self._debounce_s)
                self._dirty.discard(key)
                await self._send(*key)
        finally:
            self._tasks.pop(key, None)

    async def _send(self, tenant_id: str, user_id: str) -> None:
        secret = self._secret_for(tenant_id)
        if not secret:  # unsigned nudges are rejected anyway
            self._metrics.nudges.labels(tenant_id, NUDGE_DROPPED).inc()
            return
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_concurrency)
        async with self._slots:
            result = await self._attempts(tenant_id, user_id, secret)
        self._metrics.nudges.labels(tenant_id, result).inc()

    async def _attempts(self, tenant_id: str, user_id: str, secret: str) -> str:
        assert self._next_url is not None
        first = next(self._next_url)
        for attempt in range(2):
            url = self.urls[(first + attempt) % len(self.urls)] + PATH
            try:
                return await self._post(url, tenant_id, user_id, secret)
            except _Retry as exc:
                log.info(
                    "offline nudge failed",
                    extra={
                        "tenant": tenant_id,
                        "url": url,
                        "attempt": attempt + 1,
                        "error": str(exc),
                    },
                )
                if attempt == 0:
                    self._metrics.nudges.labels(tenant_id, NUDGE_RETRIED).inc()
            except Exception:
                log.exception("offline nudge error", extra={"tenant": tenant_id, "url": url})
                return NUDGE_ERROR
        log.warning("offline nudge gave up", extra={"tenant": tenant_id, "user_id": user_id})
        return NUDGE_FAILED

    async def _post(self, url: str, tenant_id: str, user_id: str, secret: str) -> str:
        request = hook_pb.OfflineAvailableRequest(
            meta=hook_pb.HookMeta(
                tenant_id=tenant_id, request_id=new_request_id(), timestamp_ms=self._clock()
            ),
            user_id=user_id,
        )
        sign_hook_request(request, secret)
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with session.post(
                url, data=request.SerializeToString(), headers={"Content-Type": PROTOBUF}
            ) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        if status >= 500:
            raise _Retry(f"HTTP {status}")
        answer = hook_pb.OfflineAvailableResponse()
        with contextlib.suppress(Exception):
            answer.ParseFromString(body)
        if 200 <= status < 300:
            log.debug(
                "offline nudge sent",
                extra={"tenant": tenant_id, "user_id": user_id, "connections": answer.connections},
            )
            return NUDGE_OK
        log.warning(
            "offline nudge rejected",
            extra={"tenant": tenant_id, "url": url, "status": status, "reason": answer.reason},
        )
        return NUDGE_REJECTED

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no nudge is scheduled or in flight; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._tasks:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            await asyncio.wait(list(self._tasks.values()), timeout=remaining)
        return True

    async def close(self, timeout_s: float = 1.0) -> None:
        """Let scheduled nudges finish for up to ``timeout_s``, cancel the rest, close."""
        self._closed = True
        if not await self.wait_idle(timeout_s):
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def reopen(self) -> None:
        """Accept notifications again after :meth:`close` (a restarted backend)."""
        self._closed = False
        self._slots = None
