"""Kafka consumer of the tenants' event topics: stores OFFLINE_MESSAGE events.

Groups (``consumer_group_mode``):

* ``per_tenant`` (default, the design's): one consumer per tenant, group
  ``offline-message-consumer-{tenant}``, topic ``im-mics-{tenant}-event``; a slow or
  broken tenant does not hold up the others;
* ``shared``: one consumer, group ``offline-message-consumer``, over every configured
  tenant's topic.

Each consumer polls in its own worker thread (``consume(500, 0.2 s)`` through
``run_in_executor`` on a single-thread executor, so every librdkafka call of one
consumer, rebalance callbacks included, happens on that thread) and hands each batch
to the event loop, which processes batches one after the other:

1. :meth:`mics.backend.ingest.OfflineIngestor.ingest` verifies and stores the batch in
   one database transaction;
2. only after it committed, the batch's offsets (last offset + 1 per partition) are
   committed synchronously (``enable.auto.commit=false``);
3. if the transaction failed, nothing is committed: every partition of the batch is
   rewound (``seek``) to the batch's first offset, and the batch is read again after an
   exponential backoff (0.1 s doubling up to 5 s). Kafka keeps the events; the unique
   key makes the retry idempotent. No loss, no duplicate.

A failed offset commit after a successful store only means the batch is read again
(counted in ``kafka_consumer_commit_failed_total``; stored as duplicates, no-ops).
Rebalances happen inside ``consume``, between batches, so a batch never straddles one.

Metrics: ``kafka_consumer_lag{tenant,partition}`` (high watermark minus the group's
committed offset, or minus the low watermark when the group never committed) and
``kafka_consumer_offset{tenant,partition}`` (committed offset) are refreshed every
``lag_interval_s``, from librdkafka's cached high watermarks; committed offsets this
consumer did not write itself are fetched from the coordinator in one request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from mics.backend.config import BackendConfig
from mics.backend.ingest import OfflineIngestor, StoreFailed
from mics.events.bus import topic_for

if TYPE_CHECKING:
    from mics.backend.state import BackendMetrics

log = logging.getLogger("mics.backend.consumer")
_librdkafka_log = logging.getLogger("mics.backend.librdkafka")

GROUP_PREFIX = "offline-message-consumer"

BATCH_SIZE = 500
POLL_TIMEOUT_S = 0.2
BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 5.0
LAG_INTERVAL_S = 5.0

_T = TypeVar("_T")


def group_id_for(tenant_id: str | None) -> str:
    """``offline-message-consumer-{tenant}``, or the shared group for ``None``."""
    return GROUP_PREFIX if tenant_id is None else f"{GROUP_PREFIX}-{tenant_id}"


class OfflineConsumer:
    """One Kafka consumer (one group) over some tenant topics; see the module doc."""

    def __init__(
        self,
        bootstrap_servers: str,
        group_id: str,
        topics: Sequence[str],
        ingestor: OfflineIngestor,
        metrics: BackendMetrics,
        *,
        options: dict[str, Any] | None = None,
        batch_size: int = BATCH_SIZE,
        poll_timeout_s: float = POLL_TIMEOUT_S,
        backoff_min_s: float = BACKOFF_MIN_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        lag_interval_s: float = LAG_INTERVAL_S,
    ) -> None:
        if not topics:
            raise ValueError("an offline consumer needs at least one topic")
        self.group_id = group_id
        self.topics = list(topics)
        self._ingestor = ingestor
        self._metrics = metrics
        self._config: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "client.id": f"mics-backend-{group_id}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": False,
            # Notice tenant topics created after the consumer started within seconds.
            "topic.metadata.refresh.interval.ms": 10_000,
            "logger": _librdkafka_log,
            **(options or {}),
        }
        self._batch_size = batch_size
        self._poll_timeout_s = poll_timeout_s
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._lag_interval_s = lag_interval_s
        self._consumer: Consumer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Touched only on the consumer thread (callbacks, commits, lag refresh).
        self._assigned: set[tuple[str, int]] = set()
        self._committed: dict[tuple[str, int], int] = {}
        self._missing_topics_logged = False
        # Observability for tests and /metrics.
        self.batches_stored = 0
        self.batches_failed = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("consumer already started")
        self._stopping.clear()
        self._executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"kafka-{self.group_id}"
        )
        await self._call(self._open)
        self._task = asyncio.get_running_loop().create_task(self._run())
        log.info("offline consumer started", extra={"group": self.group_id, "topics": self.topics})

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Finish the batch in progress (its offsets are committed if it was stored),
        leave the group and stop the thread."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        except Exception:
            log.exception("offline consumer failed", extra={"group": self.group_id})
        with contextlib.suppress(Exception):
            await self._call(self._close)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
        log.info("offline consumer stopped", extra={"group": self.group_id})

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    # -- the loop (event loop side) ------------------------------------------------------

    async def _run(self) -> None:
        backoff = self._backoff_min_s
        loop = asyncio.get_running_loop()
        next_lag = loop.time()
        while not self._stopping.is_set():
            if loop.time() >= next_lag:
                next_lag = loop.time() + self._lag_interval_s
                await self._call(self._refresh_lag)
            try:
                records = await self._call(self._poll)
            except Exception:
                log.exception("offline consumer poll failed", extra={"group": self.group_id})
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max_s)
                continue
            if not records:
                continue
            try:
                await self._ingestor.ingest([(r.topic() or "", r.value()) for r in records])
            except StoreFailed:
                # Nothing committed: read the batch again after the backoff.
                self.batches_failed += 1
                await self._call(self._rewind, records)
                await self._sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max_s)
                continue
            self.batches_stored += 1
            backoff = self._backoff_min_s
            await self._call(self._commit, records)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    # -- consumer thread side ------------------------------------------------------------

    def _open(self) -> None:
        consumer = Consumer(self._config)
        consumer.subscribe(
            self.topics,
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_revoke,
        )
        self._consumer = consumer

    def _close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            consumer.close()
        for topic, partition in list(self._assigned):
            self._forget(topic, partition)
        self._assigned.clear()

    def _poll(self) -> list[Message]:
        consumer = self._consumer
        assert consumer is not None
        records = []
        for record in consumer.consume(num_messages=self._batch_size, timeout=self._poll_timeout_s):
            error = record.error()
            if error is None:
                records.append(record)
            else:
                self._log_error(error)
        return records

    def _log_error(self, error: KafkaError) -> None:
        code = error.code()
        if code == KafkaError._PARTITION_EOF:
            return
        if code == KafkaError.UNKNOWN_TOPIC_OR_PART:
            # The topic appears with the tenant's first event; until then, say it once.
            if not self._missing_topics_logged:
                self._missing_topics_logged = True
                log.info(
                    "offline consumer waits for its topics",
                    extra={"group": self.group_id, "error": error.str()},
                )
            return
        log.warning("offline consumer error", extra={"group": self.group_id, "error": error.str()})

    def _commit(self, records: Sequence[Message]) -> None:
        consumer = self._consumer
        assert consumer is not None
        offsets = _next_offsets(records)
        try:
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
        except KafkaException as exc:
            self._metrics.consumer_commit_failed.labels(self.group_id).inc()
            log.warning(
                "offset commit failed; the stored batch will be read again",
                extra={"group": self.group_id, "error": str(exc)},
            )
            return
        for (topic, partition), offset in offsets.items():
            self._committed[(topic, partition)] = offset
            tenant = self._ingestor.tenant_for_topic(topic) or ""
            self._metrics.consumer_offset.labels(tenant, str(partition)).set(offset)

    def _rewind(self, records: Sequence[Message]) -> None:
        """Seek every partition of a failed batch back to the batch's first offset."""
        consumer = self._consumer
        assert consumer is not None
        first: dict[tuple[str, int], int] = {}
        for record in records:
            key = (record.topic() or "", record.partition() or 0)
            offset = record.offset() or 0
            first[key] = min(first.get(key, offset), offset)
        try:
            for (topic, partition), offset in first.items():
                consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            # Seeking needs an active fetcher. Without one, rejoin: the group restarts
            # every partition from its committed offset, which is at or before the batch.
            log.warning(
                "seek failed; recreating the consumer",
                extra={"group": self.group_id, "error": str(exc)},
            )
            self._close()
            self._open()
            return
        log.info(
            "batch rewound for retry",
            extra={"group": self.group_id, "partitions": len(first), "records": len(records)},
        )

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._assigned.add((tp.topic, tp.partition))
        log.info(
            "partitions assigned",
            extra={
                "group": self.group_id,
                "partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions],
            },
        )

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._assigned.discard((tp.topic, tp.partition))
            self._forget(tp.topic, tp.partition)
        log.info("partitions revoked", extra={"group": self.group_id, "count": len(partitions)})

    def _forget(self, topic: str, partition: int) -> None:
        self._committed.pop((topic, partition), None)
        tenant = self._ingestor.tenant_for_topic(topic) or ""
        for gauge in (self._metrics.consumer_lag, self._metrics.consumer_offset):
            with contextlib.suppress(KeyError):
                gauge.remove(tenant, str(partition))

    def _refresh_lag(self) -> None:
        consumer = self._consumer
        if consumer is None or not self._assigned:
            return
        # Partitions this consumer has not committed yet: ask the group coordinator (once
        # per refresh, one request), e.g. after a rebalance or while the store is down.
        unknown = [
            TopicPartition(t, p) for t, p in sorted(self._assigned) if (t, p) not in self._committed
        ]
        committed_before: dict[tuple[str, int], int] = {}
        if unknown:
            with contextlib.suppress(KafkaException):
                for tp in consumer.committed(unknown, timeout=1.0):
                    if tp.offset >= 0:
                        committed_before[(tp.topic, tp.partition)] = tp.offset
        for topic, partition in sorted(self._assigned):
            key = (topic, partition)
            tp = TopicPartition(topic, partition)
            try:
                low, high = consumer.get_watermark_offsets(tp, cached=True)
                base = self._committed.get(key, committed_before.get(key))
                if base is None:
                    # Never committed: the whole retained partition is behind.
                    low, high = consumer.get_watermark_offsets(tp, timeout=1.0, cached=False)
                    base = low
            except KafkaException:
                continue
            if high is None or high < 0 or base is None or base < 0:
                continue  # not known yet
            tenant = self._ingestor.tenant_for_topic(topic) or ""
            self._metrics.consumer_lag.labels(tenant, str(partition)).set(max(0, high - base))
            if key in committed_before:
                self._metrics.consumer_offset.labels(tenant, str(partition)).set(base)


def _next_offsets(records: Sequence[Message]) -> dict[tuple[str, int], int]:
    """Per (topic, partition): the offset to commit, last offset of the batch + 1."""
    offsets: dict[tuple[str, int], int] = {}
    for record in records:
        key = (record.topic() or "", record.partition() or 0)
        offsets[key] = max(offsets.get(key, 0), (record.offset() or 0) + 1)
    return offsets


class OfflineConsumers:
    """The consumers of one backend, per the config's ``consumer_group_mode``."""

    def __init__(self, consumers: list[OfflineConsumer]) -> None:
        self.consumers = consumers

    @classmethod
    def from_config(
        cls,
        config: BackendConfig,
        ingestor: OfflineIngestor,
        metrics: BackendMetrics,
        **kwargs: Any,
    ) -> OfflineConsumers:
        """No consumer without ``kafka_bootstrap_servers`` or tenants."""
        servers = config.kafka_bootstrap_servers
        tenants = sorted(config.tenants)
        if not servers or not tenants:
            return cls([])
        options = dict(config.kafka_consumer_options)
        if config.consumer_group_mode == "shared":
            topics = [topic_for(t) for t in tenants]
            return cls(
                [
                    OfflineConsumer(
                        servers,
                        group_id_for(None),
                        topics,
                        ingestor,
                        metrics,
                        options=options,
                        **kwargs,
                    )
                ]
            )
        return cls(
            [
                OfflineConsumer(
                    servers,
                    group_id_for(t),
                    [topic_for(t)],
                    ingestor,
                    metrics,
                    options=options,
                    **kwargs,
                )
                for t in tenants
            ]
        )

    async def start(self) -> None:
        started: list[OfflineConsumer] = []
        try:
            for consumer in self.consumers:
                await consumer.start()
                started.append(consumer)
        except BaseException:
            for consumer in started:
                await consumer.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(c.stop() for c in self.consumers))
