"""From OFFLINE_MESSAGE events to stored rows: verification, filters, priority, storing.

One code path for both ways events arrive:

* the Kafka consumer (:mod:`mics.backend.consumer`) hands each polled batch to
  :meth:`OfflineIngestor.ingest` and commits the batch's offsets only after it returned;
* the in-process event bus of ``mics dev`` calls :meth:`OfflineIngestor.store_event_bytes`
  per event, and retries when it raises.

For each event (offline-design.md 3.2):

1. parse the ``MqEvent`` (unparsable: counted, skipped);
2. map the topic ``im-mics-{tenant}-event`` to a configured tenant (else skipped);
3. other event types are counted and ignored;
4. verify the signature with the tenant secret (``protocol.md`` 5.2). An invalid or
   missing signature is counted in ``offline_message_invalid_sign_total``, logged and
   skipped: whoever can write to the topic must not be able to inject messages;
5. check the content: the event's tenant is the topic's, recipient, sender and msg id
   are present, ``event_data`` parses as a ``MessageRequest`` of the same tenant, sender
   and msg id; ids are at most 512 UTF-8 bytes without NUL (an id the database cannot
   index would fail the insert forever); the timestamp is before year 10000 (its UTC
   day is the counters' key);
6. run the :class:`MessageFilter` plug-ins (first drop reason wins) and the
   :class:`PriorityRule` plug-ins (highest value wins, default 0);
7. insert the batch in one transaction together with the daily counters
   (``offline_consume_stats``); a database error raises :class:`StoreFailed` and
   nothing of the batch is stored or counted;
8. after the commit, nudge the gateway for every recipient that got a new row.

Skipped events are not errors: they are never retried.

Steps 1-6 (:meth:`OfflineIngestor.decode`) are CPU only and steps 7-8
(:meth:`OfflineIngestor.store`) I/O, so that the consumer can decode one batch while the
previous one is being stored.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Protocol

from google.protobuf.message import DecodeError

from mics.backend.config import BackendConfig
from mics.backend.directory import Directory
from mics.backend.store.engine import Store
from mics.backend.store.models import MAX_ID_BYTES
from mics.backend.store.repository import NewMessage, Stats, StatsKey, StoreOutcome, day_of
from mics.events.bus import topic_for
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import verify_event

if TYPE_CHECKING:
    from mics.backend.nudge import Nudger
    from mics.backend.state import BackendMetrics

log = logging.getLogger("mics.backend.ingest")

# Metric label values (offline_consumer_events_total{event_type}).
EVENT_TYPE_LABELS = {
    hook_pb.CONNECT_ONLINE: "ConnectOnline",
    hook_pb.CONNECT_OFFLINE: "ConnectOffline",
    hook_pb.SINGLE_CHAT_MSG: "SingleChatMsg",
    hook_pb.GROUP_CHAT_MSG: "GroupChatMsg",
    hook_pb.OFFLINE_MESSAGE: "OfflineMessage",
}

# offline_message_skipped_total{reason}
SKIP_UNPARSABLE = "unparsable"
SKIP_UNKNOWN_TOPIC = "unknown_topic"
SKIP_TENANT_MISMATCH = "tenant_mismatch"
SKIP_INVALID_DATA = "invalid_data"
SKIP_FILTERED = "filtered"


class StoreFailed(Exception):
    """The store transaction failed: nothing of the batch was stored; retry it."""


class OfflineEvent(NamedTuple):
    """A verified OFFLINE_MESSAGE, as the plug-ins see it (immutable; a named tuple
    because one is built per consumed event and that is several times cheaper than a
    frozen dataclass)."""

    tenant_id: str
    recipient: str  # MqEvent.to_user_id
    sender: str  # MqEvent.user_id
    device_id: str  # sender device
    message_id: str
    message: msg_pb.MessageRequest  # parsed event_data (do not modify)
    message_data: bytes  # event_data, stored as is
    created_at: int  # MqEvent.timestamp (Unix ms)


class MessageFilter(Protocol):
    """Store-time filter (blacklist, sensitive words, ...): None keeps the message,
    a string drops it and says why (logged at debug level, counted as ``filtered``)."""

    def __call__(self, event: OfflineEvent, /) -> str | None: ...


class PriorityRule(Protocol):
    """Store-time priority (VIP senders, system messages, ...); the highest rule wins."""

    def __call__(self, event: OfflineEvent, /) -> int: ...


class BlockedWordsFilter:
    """Drops messages whose body contains one of the tenant's ``blocked_words``, the
    rule /check-message applies (it matters when that hook failed open)."""

    def __init__(self, config: BackendConfig) -> None:
        self._words = {
            tenant_id: [w.casefold() for w in tenant.blocked_words]
            for tenant_id, tenant in config.tenants.items()
            if tenant.blocked_words
        }

    def __call__(self, event: OfflineEvent, /) -> str | None:
        words = self._words.get(event.tenant_id)
        if not words:
            return None
        body = event.message.msg_body.decode("utf-8", errors="ignore").casefold()
        return "blocked word" if any(w in body for w in words) else None


class BlockedSenderFilter:
    """Drops messages of senders blocked in the directory (the backend's blacklist)."""

    def __init__(self, directory: Directory) -> None:
        self._directory = directory

    def __call__(self, event: OfflineEvent, /) -> str | None:
        if self._directory.is_blocked(event.tenant_id, event.sender):
            return "sender blocked"
        return None


class SenderPriority:
    """Priority per sender from the tenants' ``offline_sender_priority`` (VIPs)."""

    def __init__(self, config: BackendConfig) -> None:
        self._priorities = {
            tenant_id: dict(tenant.offline_sender_priority)
            for tenant_id, tenant in config.tenants.items()
            if tenant.offline_sender_priority
        }

    def __call__(self, event: OfflineEvent, /) -> int:
        return self._priorities.get(event.tenant_id, {}).get(event.sender, 0)


def default_filters(config: BackendConfig, directory: Directory) -> list[MessageFilter]:
    return [BlockedSenderFilter(directory), BlockedWordsFilter(config)]


def default_priority_rules(config: BackendConfig) -> list[PriorityRule]:
    return [SenderPriority(config)]


# Ids of at most this many characters fit MAX_ID_BYTES whatever they hold (UTF-8 takes
# at most 4 bytes per character): no need to encode them to know.
_SHORT_ID_CHARS = MAX_ID_BYTES // 4


def _valid_id(value: str) -> bool:
    if not value or "\x00" in value:
        return False
    return len(value) <= _SHORT_ID_CHARS or len(value.encode("utf-8")) <= MAX_ID_BYTES


# Latest event timestamp a stats day can be computed for (9999-12-31T23:59:59.999Z).
MAX_TIMESTAMP_MS = 253_402_300_799_999


@dataclass(slots=True)
class DecodedBatch:
    """One batch decoded by :meth:`OfflineIngestor.decode`: rows to insert and what to
    count once they are stored (nothing is counted before)."""

    rows: list[NewMessage] = field(default_factory=list)
    stats: dict[StatsKey, Stats] = field(default_factory=dict)
    events: Tally[tuple[str, str]] = field(default_factory=Tally)  # (tenant, type)
    consumed: Tally[str] = field(default_factory=Tally)
    invalid_sign: Tally[str] = field(default_factory=Tally)
    skipped: Tally[tuple[str, str]] = field(default_factory=Tally)  # (tenant, reason)

    def stat(self, day: str, tenant_id: str) -> Stats:
        key = (day, tenant_id)
        value = self.stats.get(key)
        if value is None:
            value = self.stats[key] = Stats()
        return value


class OfflineIngestor:
    """Decodes, verifies, filters and stores OFFLINE_MESSAGE events of the configured
    tenants. Used from one event loop."""

    def __init__(
        self,
        config: BackendConfig,
        store: Store,
        metrics: BackendMetrics,
        *,
        filters: Iterable[MessageFilter] = (),
        priority_rules: Iterable[PriorityRule] = (),
        nudger: Nudger | None = None,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._metrics = metrics
        self.filters = list(filters)
        self.priority_rules = list(priority_rules)
        self.nudger = nudger
        self._clock = clock or (lambda: time.time_ns() // 1_000_000)
        self._topics = {topic_for(tenant_id): tenant_id for tenant_id in config.tenants}

    def tenant_for_topic(self, topic: str) -> str | None:
        """The configured tenant whose event topic is ``topic``."""
        return self._topics.get(topic)

    @property
    def topics(self) -> list[str]:
        return list(self._topics)

    # -- entry points --------------------------------------------------------------------

    async def store_event_bytes(self, topic: str, key: bytes, value: bytes) -> None:
        """In-process event bus subscriber: store one event, or raise so that the bus
        retries it (``StoreFailed``). Invalid and foreign events return normally."""
        await self.ingest([(topic, value)])

    async def ingest(self, records: Sequence[tuple[str, bytes | None]]) -> StoreOutcome:
        """Store the OFFLINE_MESSAGE events among ``records`` (topic, value) in one
        transaction. Raises StoreFailed if that failed; then nothing was stored or
        counted and the caller must retry the whole batch."""
        return await self.store(self.decode(records))

    def decode(self, records: Iterable[tuple[str, bytes | None]]) -> DecodedBatch:
        """Steps 1-6 of the module doc for ``records`` (topic, value): CPU only, no I/O,
        nothing counted yet. The consumer decodes the next batch while the previous
        one is being stored."""
        batch = DecodedBatch()
        self.decode_into(batch, records)
        return batch

    def decode_into(self, batch: DecodedBatch, records: Iterable[tuple[str, bytes | None]]) -> None:
        """:meth:`decode`, adding to ``batch`` (a batch decoded in several slices)."""
        decode = self._decode
        for topic, value in records:
            decode(batch, topic, value)

    async def store(self, batch: DecodedBatch) -> StoreOutcome:
        """Steps 7-8 for a decoded batch: store it in one transaction, then count it and
        nudge. Raises StoreFailed if the transaction failed; then nothing was stored or
        counted, and the batch may be stored again."""
        outcome = StoreOutcome(0)
        if batch.rows or batch.stats:
            outcome = await self._write(batch)
        self._count(batch, outcome)
        if self.nudger is not None:
            for tenant_id, user_id in sorted(outcome.recipients):
                self.nudger.notify(tenant_id, user_id)
        return outcome

    # -- steps ---------------------------------------------------------------------------

    def _decode(self, batch: DecodedBatch, topic: str, value: bytes | None) -> None:
        tenant_id = self.tenant_for_topic(topic)
        if tenant_id is None:
            batch.skipped[("", SKIP_UNKNOWN_TOPIC)] += 1
            log.warning("event from an unknown topic skipped", extra={"topic": topic})
            return
        event = hook_pb.MqEvent()
        try:
            event.ParseFromString(value or b"")
        except (DecodeError, RuntimeError, ValueError):
            value = None
        if not value:
            batch.skipped[(tenant_id, SKIP_UNPARSABLE)] += 1
            batch.stat(day_of(self._clock()), tenant_id).invalid += 1
            log.warning("unparsable event skipped", extra={"tenant": tenant_id, "topic": topic})
            return
        batch.events[(tenant_id, EVENT_TYPE_LABELS.get(event.event_type, "Unknown"))] += 1
        if event.event_type != hook_pb.OFFLINE_MESSAGE:
            return
        batch.consumed[tenant_id] += 1

        if not verify_event(event, self._config.tenants[tenant_id].secret):
            batch.invalid_sign[tenant_id] += 1
            batch.stat(day_of(self._clock()), tenant_id).invalid += 1
            log.warning(
                "OFFLINE_MESSAGE with an invalid signature dropped",
                extra={
                    "tenant": tenant_id,
                    "signed": bool(event.sign),
                    "msg_id": event.msg_id[:64],
                    "node": event.node_id[:64],
                },
            )
            return

        checked = self._check(tenant_id, event)
        if isinstance(checked, str):
            reason = SKIP_TENANT_MISMATCH if checked == "tenant mismatch" else SKIP_INVALID_DATA
            batch.skipped[(tenant_id, reason)] += 1
            batch.stat(day_of(self._clock()), tenant_id).invalid += 1
            log.warning(
                "invalid OFFLINE_MESSAGE dropped",
                extra={"tenant": tenant_id, "reason": checked, "msg_id": event.msg_id[:64]},
            )
            return

        stats = batch.stat(day_of(checked.created_at), tenant_id)
        stats.consumed += 1
        if self.filters:
            dropped = self._filter(checked)
            if dropped is not None:
                batch.skipped[(tenant_id, SKIP_FILTERED)] += 1
                stats.filtered += 1
                log.debug(
                    "offline message filtered",
                    extra={"tenant": tenant_id, "reason": dropped, "msg_id": checked.message_id},
                )
                return
        message = checked.message
        batch.rows.append(
            NewMessage(
                tenant_id,
                checked.recipient,
                checked.sender,
                checked.message_id,
                checked.device_id,
                int(message.msg_type),
                message.group_id,
                checked.message_data,
                checked.created_at,
                self._priority(checked) if self.priority_rules else 0,
            )
        )

    def _check(self, tenant_id: str, event: hook_pb.MqEvent) -> OfflineEvent | str:
        """The verified event's content, or why it cannot be stored."""
        if event.tenant_id != tenant_id:
            return "tenant mismatch"
        recipient, sender, msg_id = event.to_user_id, event.user_id, event.msg_id
        if not (_valid_id(recipient) and _valid_id(sender) and _valid_id(msg_id)):
            return "missing or invalid recipient, sender or msg_id"
        message = msg_pb.MessageRequest()
        try:
            message.ParseFromString(event.event_data)
        except (DecodeError, RuntimeError, ValueError):
            return "event_data is not a MessageRequest"
        if message.tenant_id != tenant_id:
            return "tenant mismatch"
        if message.msg_id != msg_id or message.user_id != sender:
            return "event_data does not match the event"
        group_id, device_id = message.group_id, message.device_id
        if (group_id and not _valid_id(group_id)) or (device_id and not _valid_id(device_id)):
            return "invalid group or device id"
        timestamp = event.timestamp
        if timestamp > MAX_TIMESTAMP_MS:
            return "timestamp out of range"
        return OfflineEvent(
            tenant_id,
            recipient,
            sender,
            device_id or event.device_id,
            msg_id,
            message,
            event.event_data,
            timestamp if timestamp > 0 else self._clock(),
        )

    def _filter(self, event: OfflineEvent) -> str | None:
        for message_filter in self.filters:
            try:
                reason = message_filter(event)
            except Exception:
                # Fail open: a broken filter must not lose messages or stall the topic.
                log.exception("offline message filter failed; message kept")
                continue
            if reason is not None:
                return reason
        return None

    def _priority(self, event: OfflineEvent) -> int:
        priority = 0
        for rule in self.priority_rules:
            try:
                priority = max(priority, int(rule(event)))
            except Exception:
                log.exception("offline priority rule failed; ignored")
        return max(-(2**31), min(priority, 2**31 - 1))

    async def _write(self, batch: DecodedBatch) -> StoreOutcome:
        started = time.perf_counter()
        try:
            repository = await self._store.repository()
            outcome = await repository.store(batch.rows, batch.stats)
        except Exception as exc:
            failed: Tally[str] = Tally(row.tenant_id for row in batch.rows)
            for tenant_id, count in failed.items():
                self._metrics.store_failed.labels(tenant_id).inc(count)
            log.error(
                "offline store failed; the batch will be retried",
                extra={"rows": len(batch.rows), "error": f"{type(exc).__name__}: {exc}"},
            )
            raise StoreFailed(str(exc)) from exc
        finally:
            self._metrics.store_duration_ms.observe((time.perf_counter() - started) * 1000)
        return outcome

    def _count(self, batch: DecodedBatch, outcome: StoreOutcome) -> None:
        m = self._metrics
        for (tenant_id, event_type), n in batch.events.items():
            m.events.labels(tenant_id, event_type).inc(n)
        for tenant_id, n in batch.consumed.items():
            m.consumed.labels(tenant_id).inc(n)
        for tenant_id, n in batch.invalid_sign.items():
            m.invalid_sign.labels(tenant_id).inc(n)
        for (tenant_id, reason), n in batch.skipped.items():
            m.skipped.labels(tenant_id, reason).inc(n)
        for tenant_id, n in outcome.inserted_by_tenant.items():
            m.stored.labels(tenant_id).inc(n)
        for tenant_id, n in outcome.duplicates_by_tenant.items():
            m.duplicates.labels(tenant_id).inc(n)
