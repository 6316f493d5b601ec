"""In-process event transport: the embedded default used by `mics dev`.

Events go straight to subscribers in the same process (the reference backend's
consumer) instead of a broker. Each topic is served by one worker in order, so the
per-key order a Kafka partition would give is kept (stronger: per topic). A subscriber
that raises fails the produce, and the dispatcher retries it as it would a broker error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from mics.events.transport import DoneCallback

log = logging.getLogger("mics.events.inprocess")

# (topic, key, value) -> awaitable; raising means "not stored".
Subscriber = Callable[[str, bytes, bytes], Awaitable[None]]


class NoSubscriber(Exception):
    """The in-process bus has no consumer attached."""


class InProcessTransport:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._queues: dict[str, asyncio.Queue[tuple[bytes, bytes, DoneCallback]]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._outstanding = 0
        self._drained = asyncio.Event()
        self._drained.set()

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    async def start(self) -> None:
        return None

    def produce(self, topic: str, key: bytes, value: bytes, on_done: DoneCallback) -> None:
        if not self._subscribers:
            # Nobody would store it: never confirm an event that nothing holds.
            asyncio.get_running_loop().call_soon(on_done, NoSubscriber(topic))
            return
        queue = self._queues.get(topic)
        if queue is None:
            queue = self._queues[topic] = asyncio.Queue()
            self._workers[topic] = asyncio.get_running_loop().create_task(self._work(topic, queue))
        self._outstanding += 1
        self._drained.clear()
        queue.put_nowait((key, value, on_done))

    async def _work(
        self, topic: str, queue: asyncio.Queue[tuple[bytes, bytes, DoneCallback]]
    ) -> None:
        while True:
            key, value, on_done = await queue.get()
            error: Exception | None = None
            try:
                for subscriber in self._subscribers:
                    await subscriber(topic, key, value)
            except Exception as exc:
                log.warning(
                    "in-process subscriber failed", extra={"topic": topic, "error": str(exc)}
                )
                error = exc
            self._outstanding -= 1
            if not self._outstanding:
                self._drained.set()
            on_done(error)

    async def flush(self, timeout_s: float) -> int:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout_s)
        return self._outstanding

    async def close(self) -> None:
        for task in self._workers.values():
            task.cancel()
        await asyncio.gather(*self._workers.values(), return_exceptions=True)
        self._workers.clear()
        self._queues.clear()
