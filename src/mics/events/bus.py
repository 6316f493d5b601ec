"""The event-bus seam between the gateway and an event transport.

The gateway builds and signs `MqEvent`s and hands them to an `EventBus`. Publishing
never blocks the caller: it returns at once whether the event was accepted. Callers
that must know the event is durable (the offline path's ack) ask for a confirmation
future instead.

Implementations: `NullEventBus` (events disabled, MICS v1's empty
KAFKA__BOOTSTRAP_SERVERS), and later an in-process bus and a Kafka bus.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from mics.protocol.pb import mics_hook_pb2 as hook_pb


def topic_for(tenant_id: str) -> str:
    return f"im-mics-{tenant_id}-event"


def dlq_topic_for(tenant_id: str) -> str:
    return f"im-mics-{tenant_id}-event-dlq"


def partition_key(event: hook_pb.MqEvent) -> str:
    """Recipient for OFFLINE_MESSAGE (one user's backlog stays ordered), else the user."""
    if event.event_type == hook_pb.OFFLINE_MESSAGE:
        return event.to_user_id
    return event.user_id


class EventBus(Protocol):
    @property
    def enabled(self) -> bool:
        """False when events are switched off: callers skip building them."""
        ...

    def publish(self, event: hook_pb.MqEvent) -> bool:
        """Enqueue without blocking; False if refused (queue full, disabled, stopping)."""
        ...

    def publish_confirmed(self, event: hook_pb.MqEvent) -> asyncio.Future[bool] | None:
        """Enqueue and return a future resolved when the transport has durably accepted
        the event (True) or given up on it (False); None if refused at once."""
        ...

    async def start(self) -> None: ...

    async def stop(self, timeout_s: float) -> None:
        """Flush what is queued within ``timeout_s``, then stop."""
        ...


class NullEventBus:
    """Events disabled: every publish is refused, nothing is built."""

    @property
    def enabled(self) -> bool:
        return False

    def publish(self, event: hook_pb.MqEvent) -> bool:
        return False

    def publish_confirmed(self, event: hook_pb.MqEvent) -> asyncio.Future[bool] | None:
        return None

    async def start(self) -> None:
        return None

    async def stop(self, timeout_s: float) -> None:
        return None
