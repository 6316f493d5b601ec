"""What the dispatcher needs from an event transport (Kafka, or in-process for dev)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

# Called on the event loop with None on success or the error that ended the attempt.
DoneCallback = Callable[[Exception | None], None]


class TransportFull(Exception):
    """The transport's local buffer is full right now; try again shortly."""


class EventTransport(Protocol):
    async def start(self) -> None: ...

    def produce(self, topic: str, key: bytes, value: bytes, on_done: DoneCallback) -> None:
        """Start one produce without blocking; ``on_done`` fires exactly once, later.

        Raises TransportFull when the local buffer cannot take more for now.
        """
        ...

    async def flush(self, timeout_s: float) -> int:
        """Wait up to ``timeout_s`` for outstanding produces; return how many remain."""
        ...

    async def close(self) -> None: ...
