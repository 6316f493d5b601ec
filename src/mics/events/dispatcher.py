"""The event dispatcher: bounded per-tenant queues drained fairly into a transport.

- `publish` never blocks: it appends to the tenant's queue and returns whether the
  event was accepted. A full tenant queue (`tenant_quota`) or a full dispatcher
  (`queue_full`) refuses and counts the drop, so the caller can fall back.
- One pump drains the queues round-robin, one event per tenant per turn, and never has
  more than `max_inflight_per_tenant` produce calls outstanding for one tenant: a
  tenant whose topic is slow or failing fills its own window, not everyone's.
- A failed produce is retried with exponential backoff up to `max_attempts`, then sent
  once to the tenant's dead-letter topic, then dropped and counted. Nothing is queued
  without bound.
- `publish_confirmed` returns a future that resolves True once the transport has
  durably accepted the event on the event topic, False once it has given up on it. The
  event is handed to the transport at once when nothing of its tenant is queued ahead
  of it (someone is waiting), else in its turn. The future is the caller's: one that
  stops waiting may resolve or cancel it, and the event still goes out.
- `stop` flushes what is queued within a time bound.

Ordering: one tenant's events leave its queue in order; a retried event goes back to
the head of its queue, and with `max_inflight_per_tenant` > 1 a retry can land behind
events produced after it. Per-key order on the broker is what the consumer relies on,
and the Kafka producer keeps it (idempotent producer, in-order retries inside one
attempt); a retry after a failed attempt is the rare case where order may differ.

Events someone waits on (`publish_confirmed`: the offline path's durable ack) may go
through a transport of their own (`confirmed`), e.g. a Kafka producer that does not
linger, while the others keep batching. Per-key order then holds within each kind:
every OFFLINE_MESSAGE event is published confirmed, every other event is not.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from prometheus_client import Counter

from mics.events.bus import dlq_topic_for, partition_key, topic_for
from mics.events.config import DispatcherConfig
from mics.events.transport import EventTransport, TransportFull
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_hook_pb2 as hook_pb

log = logging.getLogger("mics.events")

EVENT_TYPE_LABEL = {
    hook_pb.CONNECT_ONLINE: "ConnectOnline",
    hook_pb.CONNECT_OFFLINE: "ConnectOffline",
    hook_pb.SINGLE_CHAT_MSG: "SingleChatMsg",
    hook_pb.GROUP_CHAT_MSG: "GroupChatMsg",
    hook_pb.OFFLINE_MESSAGE: "OfflineMessage",
}


_PRODUCE_BUDGET = 512


class EventMetrics:
    def __init__(self, registry: MetricsRegistry) -> None:
        r = registry
        self.queue_depth = r.gauge(
            "mics_kafka_queue_depth", "Events waiting in the in-process queue", ("tenant",)
        )
        self.push_failed = r.counter(
            "mics_kafka_push_failed", "Events that never reached the event topic", ("tenant",)
        )
        self.published = r.counter(
            "mics_mq_published", "Events accepted by the broker", ("tenant", "topic", "event_type")
        )
        self.failed = r.counter(
            "mics_mq_failed", "Failed produce attempts", ("tenant", "topic", "event_type")
        )
        self.retried = r.counter("mics_mq_retried", "Produce retries", ("tenant", "event_type"))
        self.dlq = r.counter(
            "mics_mq_dlq", "Events sent to the dead-letter topic", ("tenant", "event_type")
        )
        self.dropped = r.counter("mics_mq_dropped", "Events dropped", ("tenant", "reason"))


class _TenantChildren:
    """The per-event metric children of one tenant, bound once: labels() takes a lock
    and builds a key on every call, several times per event otherwise."""

    __slots__ = ("_m", "_published", "_tenant", "depth")

    def __init__(self, m: EventMetrics, tenant: str) -> None:
        self._m = m
        self._tenant = tenant
        self.depth = m.queue_depth.labels(tenant)
        self._published: dict[tuple[str, str], Counter] = {}

    def published(self, topic_label: str, event_type: str) -> Counter:
        key = (topic_label, event_type)
        child = self._published.get(key)
        if child is None:
            child = self._published[key] = self._m.published.labels(
                self._tenant, topic_label, event_type
            )
        return child


@dataclass(slots=True)
class _Item:
    tenant: str
    event_type: str
    key: bytes
    value: bytes
    confirm: asyncio.Future[bool] | None
    attempts: int = 0
    dead_letter: bool = False


@dataclass(slots=True)
class _TenantQueue:
    items: deque[_Item] = field(default_factory=deque)
    inflight: int = 0
    retry_waiting: int = 0


class EventDispatcher:
    """An `EventBus` over any `EventTransport` (and optionally a second one for the
    events published with `publish_confirmed`)."""

    def __init__(
        self,
        transport: EventTransport,
        config: DispatcherConfig,
        metrics: MetricsRegistry,
        confirmed: EventTransport | None = None,
    ) -> None:
        self._transport = transport
        self._confirmed_transport = confirmed if confirmed is not None else transport
        self._transports = [transport] if confirmed in (None, transport) else [transport, confirmed]
        self._config = config
        self._m = EventMetrics(metrics)
        self._tenants: dict[str, _TenantQueue] = {}
        # Kept while the process lives, like the metric children they point to.
        self._children: dict[str, _TenantChildren] = {}
        self._queued = 0  # items in tenant queues (not yet produced)
        self._inflight = 0
        self._retry_waiting = 0
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._stopping = False

    # -- EventBus -------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return True

    def publish(self, event: hook_pb.MqEvent) -> bool:
        return self._enqueue(event, None)

    def publish_confirmed(self, event: hook_pb.MqEvent) -> asyncio.Future[bool] | None:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        return future if self._enqueue(event, future) else None

    async def start(self) -> None:
        for transport in self._transports:
            await transport.start()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    async def stop(self, timeout_s: float) -> None:
        """Stop taking events, flush the queues within ``timeout_s``, then close."""
        self._stopping = True
        if self._idle is not None and self._pending_total():
            self._kick()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout_s)
            except TimeoutError:
                log.warning("event flush timed out", extra={"pending": self._pending_total()})
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.gather(self._pump_task, return_exceptions=True)
        remaining = 0
        for transport in self._transports:
            remaining += await transport.flush(0.5)
        self._drop_everything("shutdown")
        if remaining:
            log.warning("events left in the transport at shutdown", extra={"count": remaining})
        for transport in self._transports:
            await transport.close()

    # -- queueing ----------------------------------------------------------------------------

    def _enqueue(self, event: hook_pb.MqEvent, confirm: asyncio.Future[bool] | None) -> bool:
        tenant = event.tenant_id
        if self._stopping or self._wake is None:
            self._m.dropped.labels(tenant, "stopping").inc()
            return False
        if self._queued + self._inflight + self._retry_waiting >= self._config.queue_capacity:
            self._m.dropped.labels(tenant, "queue_full").inc()
            self._m.push_failed.labels(tenant).inc()
            return False
        queue = self._tenants.get(tenant)
        if queue is None:
            queue = self._tenants[tenant] = _TenantQueue()
        pending = len(queue.items) + queue.inflight + queue.retry_waiting
        if pending >= self._config.max_pending_per_tenant:
            self._m.dropped.labels(tenant, "tenant_quota").inc()
            self._m.push_failed.labels(tenant).inc()
            return False
        item = _Item(
            tenant=tenant,
            event_type=EVENT_TYPE_LABEL.get(event.event_type, "Unknown"),
            key=partition_key(event).encode("utf-8"),
            value=event.SerializeToString(),
            confirm=confirm,
        )
        queue.items.append(item)
        self._queued += 1
        self._children_of(tenant).depth.inc()
        if (
            confirm is not None
            and len(queue.items) == 1
            and queue.inflight < self._config.max_inflight_per_tenant
            and self._produce_now(queue)
        ):
            return True
        self._kick()
        return True

    def _produce_now(self, queue: _TenantQueue) -> bool:
        """Someone waits for the event just queued, with nothing ahead of it in its
        tenant's queue: hand it to the transport now rather than on the pump's next turn
        (one loop iteration later). False if the transport is full: the pump retries."""
        item = queue.items[0]
        try:
            self._produce(item)
        except TransportFull:
            return False
        queue.items.popleft()
        self._queued -= 1
        queue.inflight += 1
        self._inflight += 1
        if self._idle is not None:
            self._idle.clear()
        return True

    def _kick(self) -> None:
        if self._idle is not None:
            self._idle.clear()
        if self._wake is not None:
            self._wake.set()

    def _pending_total(self) -> int:
        return self._queued + self._inflight + self._retry_waiting

    # -- the pump ------------------------------------------------------------------------------

    async def _pump(self) -> None:
        assert self._wake is not None
        assert self._idle is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._drain_round_robin()
            if not self._pending_total():
                self._idle.set()

    def _drain_round_robin(self) -> None:
        """Hand events to the transport, one per tenant per turn, within each window.

        At most `_PRODUCE_BUDGET` produces per call: a large backlog is handed over in
        slices so that the chat path on the same event loop never waits long for it.
        """
        limit = self._config.max_inflight_per_tenant
        budget = _PRODUCE_BUDGET
        while True:
            if budget <= 0:
                self._kick()
                return
            progressed = False
            for tenant, queue in list(self._tenants.items()):
                if not queue.items or queue.inflight >= limit:
                    if not queue.items and not queue.inflight and not queue.retry_waiting:
                        del self._tenants[tenant]  # idle tenants cost nothing
                    continue
                item = queue.items.popleft()
                try:
                    self._produce(item)
                except TransportFull:
                    queue.items.appendleft(item)
                    self._retry_later(0.005)  # the producer's buffer drains on its own
                    return
                self._queued -= 1
                queue.inflight += 1
                self._inflight += 1
                budget -= 1
                progressed = True
            if not progressed:
                return

    def _produce(self, item: _Item) -> None:
        topic = dlq_topic_for(item.tenant) if item.dead_letter else topic_for(item.tenant)
        transport = self._transport if item.confirm is None else self._confirmed_transport
        transport.produce(topic, item.key, item.value, lambda error: self._on_done(item, error))

    def _retry_later(self, delay_s: float) -> None:
        asyncio.get_running_loop().call_later(delay_s, self._kick)

    # -- results ------------------------------------------------------------------------------

    def _on_done(self, item: _Item, error: Exception | None) -> None:
        queue = self._tenants.get(item.tenant)
        if queue is None:
            queue = self._tenants[item.tenant] = _TenantQueue()
        queue.inflight -= 1
        self._inflight -= 1
        topic_label = "dlq" if item.dead_letter else "event"
        if error is None:
            self._children_of(item.tenant).published(topic_label, item.event_type).inc()
            self._finish(item, delivered=not item.dead_letter)
        else:
            self._m.failed.labels(item.tenant, topic_label, item.event_type).inc()
            self._after_failure(queue, item, error)
        self._kick()

    def _after_failure(self, queue: _TenantQueue, item: _Item, error: Exception) -> None:
        item.attempts += 1
        if item.dead_letter:
            log.error(
                "event lost: dead-letter topic failed too",
                extra={"tenant": item.tenant, "event_type": item.event_type, "error": str(error)},
            )
            self._m.dropped.labels(item.tenant, "dlq_failed").inc()
            self._finish(item, delivered=False)
            return
        if item.attempts < self._config.max_attempts:
            self._m.retried.labels(item.tenant, item.event_type).inc()
            delay_ms = min(
                self._config.retry_backoff_ms * 2 ** (item.attempts - 1),
                self._config.retry_backoff_cap_ms,
            )
            self._hold_for_retry(queue, item, delay_ms / 1000)
            return
        log.warning(
            "event to dead-letter topic after %d attempts",
            item.attempts,
            extra={"tenant": item.tenant, "event_type": item.event_type, "error": str(error)},
        )
        self._m.push_failed.labels(item.tenant).inc()
        self._m.dlq.labels(item.tenant, item.event_type).inc()
        # The event topic never got it: whoever waits for a confirmation learns so now.
        self._resolve(item, False)
        item.dead_letter = True
        queue.items.appendleft(item)
        self._queued += 1

    def _hold_for_retry(self, queue: _TenantQueue, item: _Item, delay_s: float) -> None:
        queue.retry_waiting += 1
        self._retry_waiting += 1

        def requeue() -> None:
            q = self._tenants.get(item.tenant)
            if q is None:
                q = self._tenants[item.tenant] = _TenantQueue()
            q.retry_waiting -= 1
            self._retry_waiting -= 1
            q.items.appendleft(item)
            self._queued += 1
            self._kick()

        asyncio.get_running_loop().call_later(delay_s, requeue)

    def _children_of(self, tenant: str) -> _TenantChildren:
        children = self._children.get(tenant)
        if children is None:
            children = self._children[tenant] = _TenantChildren(self._m, tenant)
        return children

    def _finish(self, item: _Item, *, delivered: bool) -> None:
        self._children_of(item.tenant).depth.dec()
        self._resolve(item, delivered)

    @staticmethod
    def _resolve(item: _Item, value: bool) -> None:
        if item.confirm is not None and not item.confirm.done():
            item.confirm.set_result(value)

    def _drop_everything(self, reason: str) -> None:
        for tenant, queue in self._tenants.items():
            for item in queue.items:
                self._m.dropped.labels(tenant, reason).inc()
                self._m.push_failed.labels(tenant).inc()
                self._m.queue_depth.labels(tenant).dec()
                self._resolve(item, False)
            queue.items.clear()
        self._queued = 0

    # -- introspection (tests, health) -----------------------------------------------------------

    def depth(self, tenant_id: str) -> int:
        queue = self._tenants.get(tenant_id)
        if queue is None:
            return 0
        return len(queue.items) + queue.inflight + queue.retry_waiting
