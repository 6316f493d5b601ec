"""Kafka consumer of the tenants' event topics: stores OFFLINE_MESSAGE events.

Groups (``consumer_group_mode``):

* ``per_tenant`` (default, the design's): one consumer per tenant, group
  ``offline-message-consumer-{tenant}``, topic ``im-mics-{tenant}-event``; a slow or
  broken tenant does not hold up the others;
* ``shared``: one consumer, group ``offline-message-consumer``, over every configured
  tenant's topic.

Every librdkafka call of one consumer happens on its own worker thread (a single-thread
executor): polls, commits, seeks, pauses, the lag refresh, and the rebalance and commit
callbacks they serve. (The client serializes calls on one consumer: a call from another
thread would wait for the poll in progress.) A poll waits up to ``poll_timeout_s`` for
the *first* record only, then takes whatever else is already fetched, up to
``batch_size``, without waiting: a lone event is handed over at once, a backlog in full
batches.

The event loop runs a pipeline, so that the backend's CPU (decoding, verifying), the
database's work and the next poll overlap:

1. while batch *n* is being stored, batch *n+1* is polled (the worker thread) and
   decoded and verified (:meth:`mics.backend.ingest.OfflineIngestor.decode_into`, on
   the loop, in slices so that the transaction in flight keeps going);
2. batch *n+1*'s store transaction starts when batch *n*'s has committed: at most one
   transaction is in flight, so batches are stored in partition order;
3. as soon as batch *n*'s transaction committed, its offsets (last offset + 1 per
   partition) are committed asynchronously (``enable.auto.commit=false``): queued on
   the worker thread behind the poll in progress, in batch order, and sent in that
   order by librdkafka; no poll waits for a commit. Offsets are never committed before
   the rows are stored, and never move backwards.

If a store transaction failed, nothing is committed: the failed batch and every batch
read after it are dropped, every partition among them is rewound (``seek``) to its
first unstored offset, and reading resumes after an exponential backoff (0.1 s doubling
up to 5 s). Kafka keeps the events; the unique key makes the retry idempotent. No loss,
no duplicate row. A failed offset commit only means the stored rows are read again
(counted in ``kafka_consumer_commit_failed_total``; stored as duplicates, no-ops).
Stopping finishes the transaction in flight and commits its offsets synchronously.

:meth:`OfflineConsumer.pause` stops fetching without leaving the group (librdkafka
``pause`` on the assignment, and on partitions assigned later; no rebalance); batches
already read are still stored and committed. :meth:`OfflineConsumer.resume` undoes it.

Metrics: ``kafka_consumer_lag{tenant,partition}`` (high watermark minus the group's
committed offset, or minus the low watermark when the group never committed) and
``kafka_consumer_offset{tenant,partition}`` (committed offset) are refreshed every
``lag_interval_s`` between two polls, without a broker round trip per partition: the
watermarks come from librdkafka's cache (the last fetch responses; a partition not
fetched yet is skipped), and what the group committed before this consumer got a
partition is asked once per assignment, for all new partitions in one request to the
group coordinator (a few ms). While paused nothing is fetched, so the cache goes stale:
then the high watermarks are asked from the partition leaders (there is no consumption
to hold up).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from mics.backend.config import BackendConfig
from mics.backend.ingest import DecodedBatch, OfflineIngestor, StoreFailed
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
# Longest wait for a broker's answer in a lag refresh.
LAG_REQUEST_TIMEOUT_S = 2.0
# Records decoded between two turns of the event loop (~0.5 ms): each round trip of the
# store transaction in flight waits for the slice in progress.
DECODE_SLICE = 25

_T = TypeVar("_T")
_Key = tuple[str, int]  # (topic, partition)


def group_id_for(tenant_id: str | None) -> str:
    """``offline-message-consumer-{tenant}``, or the shared group for ``None``."""
    return GROUP_PREFIX if tenant_id is None else f"{GROUP_PREFIX}-{tenant_id}"


@dataclass(slots=True)
class _Storing:
    """The batch whose store transaction is in flight."""

    records: list[Message]
    task: asyncio.Task[None]


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
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
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
            # Ours: the results of the asynchronous offset commits.
            "on_commit": self._on_commit,
        }
        strategy = str(self._config.get("partition.assignment.strategy", ""))
        # Incremental (cooperative) assignment: a rebalance callback that assigns
        # partitions itself must then use incremental_assign.
        self._incremental = (
            "cooperative" in strategy or str(self._config.get("group.protocol", "")) == "consumer"
        )
        self._batch_size = batch_size
        self._poll_timeout_s = poll_timeout_s
        self._backoff_min_s = backoff_min_s
        self._backoff_max_s = backoff_max_s
        self._lag_interval_s = lag_interval_s
        self._consumer: Consumer | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._paused = False
        # Consumer thread only (rebalance and commit callbacks, commits, lag refresh):
        self._assigned: set[_Key] = set()
        # Committed offsets known to this consumer: its own commits, and the group's
        # earlier ones (asked once per assignment, see _refresh_lag).
        self._committed: dict[_Key, int] = {}
        # Assigned partitions whose earlier committed offset has not been asked yet.
        self._base_unknown: set[_Key] = set()
        # Highest offset this consumer asked to commit per partition since it was
        # assigned: commits never move an offset backwards.
        self._commit_floor: dict[_Key, int] = {}
        self._next_lag = 0.0  # time.monotonic() of the next lag refresh
        self._missing_topics_logged = False
        # Observability for tests and /metrics.
        self.batches_stored = 0
        self.batches_failed = 0
        self.polls = 0  # poll calls that returned (with or without records)
        self.assignments = 0  # rebalance callbacks that assigned partitions

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
        """Finish the store transaction in flight (its offsets are committed if it
        succeeded), leave the group and stop the thread."""
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

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def assigned(self) -> set[_Key]:
        """The partitions currently assigned, as (topic, partition)."""
        return set(self._assigned)

    async def pause(self) -> None:
        """Stop fetching events, without leaving the group (no rebalance): the assigned
        partitions are paused, and so are partitions assigned later. Batches already
        read are still stored and their offsets committed. Idempotent."""
        self._paused = True
        if self._executor is not None:
            await self._call(self._apply_pause)
        log.info("offline consumer paused", extra={"group": self.group_id})

    async def resume(self) -> None:
        """Fetch again from where the consumer stopped. Idempotent."""
        self._paused = False
        if self._executor is not None:
            await self._call(self._apply_pause)
        log.info("offline consumer resumed", extra={"group": self.group_id})

    # -- the pipeline (event loop side) --------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = self._backoff_min_s
        fetch: asyncio.Future[list[Message]] | None = None
        storing: _Storing | None = None
        try:
            while not self._stopping.is_set():
                if fetch is None:
                    fetch = self._submit(self._poll)
                try:
                    records = await fetch
                except Exception:
                    fetch = None
                    log.exception("offline consumer poll failed", extra={"group": self.group_id})
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self._backoff_max_s)
                    continue
                fetch = None
                if not records:
                    if storing is not None and storing.task.done():
                        # Idle: learn the outcome of the last batch now.
                        stored, storing = storing, None
                        if await self._finished(stored):
                            backoff = self._backoff_min_s
                        else:
                            await self._recover([stored.records], None)
                            await self._sleep(backoff)
                            backoff = min(backoff * 2, self._backoff_max_s)
                    continue
                # Read the next batch on the consumer thread while this one is decoded
                # and the previous one is stored.
                if not self._stopping.is_set():
                    fetch = self._submit(self._poll)
                batch: DecodedBatch | None
                try:
                    batch = await self._decode(records)
                except Exception:
                    log.exception("offline batch decoding failed", extra={"group": self.group_id})
                    batch = None
                failed: list[list[Message]] = []
                if storing is not None:
                    stored, storing = storing, None
                    if await self._finished(stored):
                        backoff = self._backoff_min_s
                    else:
                        failed.append(stored.records)
                if batch is None or failed:
                    # Nothing after a failed batch may be stored before it: drop this one
                    # too, rewind and retry after the backoff.
                    if batch is None:
                        self.batches_failed += 1
                    await self._recover([*failed, records], fetch)
                    fetch = None
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self._backoff_max_s)
                    continue
                storing = _Storing(records, loop.create_task(self._store(records, batch)))
                # Let it send its first statement before this loop goes on.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            # stop() gave up waiting: abandon the transaction in flight (rolled back,
            # nothing committed; the events are read again).
            if storing is not None:
                storing.task.cancel()
                storing = None
            raise
        finally:
            # Stopping: what was read but not stored is read again by whoever gets the
            # partitions next; the transaction in flight is finished and its offsets
            # committed.
            if storing is not None:
                if fetch is not None:
                    with contextlib.suppress(Exception):
                        await fetch
                if await self._finished(storing):
                    await self._call(self._commit_final)

    async def _decode(self, records: list[Message]) -> DecodedBatch:
        """Decode ``records`` in slices, letting the loop run in between: the store
        transaction in flight needs it for each of its round trips."""
        batch = DecodedBatch()
        decode_into = self._ingestor.decode_into
        for start in range(0, len(records), DECODE_SLICE):
            if start:
                await asyncio.sleep(0)
            decode_into(
                batch,
                [(r.topic() or "", r.value()) for r in records[start : start + DECODE_SLICE]],
            )
        return batch

    async def _store(self, records: list[Message], batch: DecodedBatch) -> None:
        """Store one decoded batch, then have its offsets committed without waiting."""
        await self._ingestor.store(batch)
        # On the consumer thread, after the poll in progress: in batch order.
        assert self._executor is not None
        self._executor.submit(self._commit, _next_offsets(records))

    async def _finished(self, storing: _Storing) -> bool:
        """Wait for the batch's store; True if it was stored (and its commit queued)."""
        try:
            await storing.task
        except StoreFailed:
            self.batches_failed += 1  # logged by the ingestor
            return False
        except Exception:
            self.batches_failed += 1
            log.exception("offline batch store failed", extra={"group": self.group_id})
            return False
        self.batches_stored += 1
        return True

    async def _recover(
        self, unstored: list[list[Message]], fetch: asyncio.Future[list[Message]] | None
    ) -> None:
        """Rewind every partition of the unstored batches, and of the poll in flight
        (awaited here), to its first unstored offset."""
        if fetch is not None:
            with contextlib.suppress(Exception):
                unstored.append(await fetch)
        records = [record for batch in unstored for record in batch]
        if not records:
            return
        try:
            await self._call(self._rewind, records)
        except Exception:
            log.exception("offline consumer rewind failed", extra={"group": self.group_id})

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    def _submit(self, fn: Callable[[], _T]) -> asyncio.Future[_T]:
        assert self._executor is not None
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

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

    def _poll(self) -> list[Message]:
        """The first record within the poll timeout, then whatever else is already
        fetched, up to the batch size, without waiting. Refreshes the lag when due."""
        consumer = self._consumer
        assert consumer is not None
        if time.monotonic() >= self._next_lag:
            self._next_lag = time.monotonic() + self._lag_interval_s
            try:
                self._refresh_lag(consumer)
            except Exception:
                log.exception("consumer lag refresh failed", extra={"group": self.group_id})
        first = consumer.poll(self._poll_timeout_s)
        polled = [first] if first is not None else []
        if first is not None and self._batch_size > 1:
            polled.extend(consumer.consume(num_messages=self._batch_size - 1, timeout=0))
        self.polls += 1
        records = []
        for record in polled:
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

    def _commit(self, next_offsets: dict[_Key, int]) -> None:
        """Commit ``next_offsets`` asynchronously: the request is queued, the next poll
        does not wait for it, and on_commit reports the result. Never raises (nobody
        waits for this call)."""
        consumer = self._consumer
        if consumer is None:
            return
        offsets = []
        for key, offset in next_offsets.items():
            if key in self._assigned and offset > self._commit_floor.get(key, -1):
                self._commit_floor[key] = offset
                offsets.append(TopicPartition(key[0], key[1], offset))
        if not offsets:
            return
        try:
            consumer.commit(offsets=offsets, asynchronous=True)
        except (KafkaException, RuntimeError) as exc:
            self._commit_failed(str(exc))
        except Exception:  # pragma: no cover - defensive, see above
            log.exception("offset commit failed", extra={"group": self.group_id})

    def _commit_final(self) -> None:
        """At stop: commit the last offsets synchronously (the asynchronous commits
        queued before are sent before it, in order)."""
        consumer = self._consumer
        if consumer is None:
            return
        offsets = [
            TopicPartition(t, p, o)
            for (t, p), o in sorted(self._commit_floor.items())
            if (t, p) in self._assigned
        ]
        if offsets:
            with contextlib.suppress(KafkaException, RuntimeError):
                consumer.commit(offsets=offsets, asynchronous=False)

    def _commit_failed(self, error: str) -> None:
        self._metrics.consumer_commit_failed.labels(self.group_id).inc()
        log.warning(
            "offset commit failed; the stored batch will be read again",
            extra={"group": self.group_id, "error": error},
        )

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's report of a commit (served by a poll, on the consumer thread)."""
        failures = [tp for tp in partitions if tp.error is not None]
        if error is not None or failures:
            self._commit_failed(error.str() if error is not None else str(failures[0].error))
        if error is not None:
            return
        for tp in partitions:
            key = (tp.topic, tp.partition)
            if tp.error is not None or tp.offset < 0 or key not in self._assigned:
                continue  # failed, or revoked meanwhile: not ours to report
            if tp.offset >= self._committed.get(key, -1):
                self._committed[key] = tp.offset
                tenant = self._ingestor.tenant_for_topic(tp.topic) or ""
                self._metrics.consumer_offset.labels(tenant, str(tp.partition)).set(tp.offset)

    def _rewind(self, records: Sequence[Message]) -> None:
        """Seek every partition of ``records`` back to its first offset among them."""
        consumer = self._consumer
        assert consumer is not None
        first: dict[_Key, int] = {}
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

    def _apply_pause(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        partitions = consumer.assignment()
        if not partitions:
            return
        if self._paused:
            consumer.pause(partitions)
        else:
            consumer.resume(partitions)
        self._next_lag = 0.0  # the watermarks' source changes: refresh at once

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            key = (tp.topic, tp.partition)
            self._assigned.add(key)
            self._base_unknown.add(key)
            self._commit_floor.pop(key, None)
        self.assignments += 1
        self._next_lag = 0.0
        if self._paused and partitions:
            # Assign here (instead of after the callback) to pause before any fetch.
            if self._incremental:
                consumer.incremental_assign(partitions)
            else:
                consumer.assign(partitions)
            consumer.pause(partitions)
        log.info(
            "partitions assigned",
            extra={
                "group": self.group_id,
                "partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions],
                "paused": self._paused,
            },
        )

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._forget(tp.topic, tp.partition)
        log.info("partitions revoked", extra={"group": self.group_id, "count": len(partitions)})

    def _forget(self, topic: str, partition: int) -> None:
        key = (topic, partition)
        self._assigned.discard(key)
        self._committed.pop(key, None)
        self._base_unknown.discard(key)
        self._commit_floor.pop(key, None)
        tenant = self._ingestor.tenant_for_topic(topic) or ""
        for gauge in (self._metrics.consumer_lag, self._metrics.consumer_offset):
            with contextlib.suppress(KeyError):
                gauge.remove(tenant, str(partition))

    def _refresh_lag(self, consumer: Consumer) -> None:
        """Set the lag and offset gauges of the assigned partitions (module doc)."""
        if not self._assigned:
            return
        learned: dict[_Key, int] = {}
        if self._base_unknown:
            # Partitions new to this consumer: what did the group commit before? One
            # request to the group coordinator for all of them, once per assignment.
            unknown = sorted(self._base_unknown)
            try:
                answer = consumer.committed(
                    [TopicPartition(t, p) for t, p in unknown], timeout=LAG_REQUEST_TIMEOUT_S
                )
            except KafkaException:
                answer = []  # asked again next time
            for tp in answer:
                key = (tp.topic, tp.partition)
                if tp.error is not None or key not in self._base_unknown:
                    continue
                self._base_unknown.discard(key)
                if tp.offset >= 0 and key not in self._committed:
                    self._committed[key] = learned[key] = tp.offset
        for topic, partition in sorted(self._assigned):
            key = (topic, partition)
            if key in self._base_unknown:
                continue
            tp = TopicPartition(topic, partition)
            try:
                if self._paused:
                    low, high = consumer.get_watermark_offsets(
                        tp, timeout=LAG_REQUEST_TIMEOUT_S, cached=False
                    )
                else:
                    low, high = consumer.get_watermark_offsets(tp, cached=True)
            except KafkaException:
                continue
            # Never committed by the group: the whole retained partition is behind.
            base = self._committed.get(key, low)
            if high is None or high < 0 or base is None or base < 0:
                continue  # not fetched yet
            tenant = self._ingestor.tenant_for_topic(topic) or ""
            self._metrics.consumer_lag.labels(tenant, str(partition)).set(max(0, high - base))
            if key in learned:
                self._metrics.consumer_offset.labels(tenant, str(partition)).set(learned[key])


def _next_offsets(records: Iterable[Message]) -> dict[_Key, int]:
    """Per (topic, partition): the offset to commit, last offset of the batch + 1."""
    offsets: dict[_Key, int] = {}
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

    async def pause(self) -> None:
        """Pause every consumer (see :meth:`OfflineConsumer.pause`): no rebalance."""
        await asyncio.gather(*(c.pause() for c in self.consumers))

    async def resume(self) -> None:
        await asyncio.gather(*(c.resume() for c in self.consumers))
