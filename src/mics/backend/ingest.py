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
   index would fail the insert forever);
6. run the :class:`MessageFilter` plug-ins (first drop reason wins) and the
   :class:`PriorityRule` plug-ins (highest value wins, default 0);
7. insert the batch in one transaction together with the daily counters
   (``offline_consume_stats``); a database error raises :class:`StoreFailed` and
   nothing of the batch is stored or counted;
8. after the commit, nudge the gateway for every recipient that got a new row.

Skipped events are not errors: they are never retried.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

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


@dataclass(frozen=True, slots=True)
class OfflineEvent:
    """A verified OFFLINE_MESSAGE, as the plug-ins see it."""

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


def _valid_id(value: str) -> bool:
    return bool(value) and "\x00" not in value and len(value.encode("utf-8")) <= MAX_ID_BYTES


@dataclass(slots=True)
class _Batch:
    """One batch being decoded: rows to insert and what to count once it is stored."""

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
        batch = _Batch()
        for topic, value in records:
            self._decode(batch, topic, value)
        outcome = StoreOutcome(0)
        if batch.rows or batch.stats:
            outcome = await self._write(batch)
        self._count(batch, outcome)
        if self.nudger is not None:
            for tenant_id, user_id in sorted(outcome.recipients):
                self.nudger.notify(tenant_id, user_id)
        return outcome

    # -- steps ---------------------------------------------------------------------------

    def _decode(self, batch: _Batch, topic: str, value: bytes | None) -> None:
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
        dropped = self._filter(checked)
        if dropped is not None:
            batch.skipped[(tenant_id, SKIP_FILTERED)] += 1
            stats.filtered += 1
            log.debug(
                "offline message filtered",
                extra={"tenant": tenant_id, "reason": dropped, "msg_id": checked.message_id},
            )
            return
        batch.rows.append(
            NewMessage(
                tenant_id=tenant_id,
                user_id=checked.recipient,
                from_user_id=checked.sender,
                message_id=checked.message_id,
                device_id=checked.device_id,
                message_type=int(checked.message.msg_type),
                group_id=checked.message.group_id,
                message_data=checked.message_data,
                created_at=checked.created_at,
                priority=self._priority(checked),
            )
        )

    def _check(self, tenant_id: str, event: hook_pb.MqEvent) -> OfflineEvent | str:
        """The verified event's content, or why it cannot be stored."""
        if event.tenant_id != tenant_id:
            return "tenant mismatch"
        ids = (event.to_user_id, event.user_id, event.msg_id)
        if not all(_valid_id(v) for v in ids):
            return "missing or invalid recipient, sender or msg_id"
        message = msg_pb.MessageRequest()
        try:
            message.ParseFromString(event.event_data)
        except (DecodeError, RuntimeError, ValueError):
            return "event_data is not a MessageRequest"
        if message.tenant_id != tenant_id:
            return "tenant mismatch"
        if message.msg_id != event.msg_id or message.user_id != event.user_id:
            return "event_data does not match the event"
        for optional in (message.group_id, message.device_id):
            if optional and not _valid_id(optional):
                return "invalid group or device id"
        return OfflineEvent(
            tenant_id=tenant_id,
            recipient=event.to_user_id,
            sender=event.user_id,
            device_id=message.device_id or event.device_id,
            message_id=event.msg_id,
            message=message,
            message_data=event.event_data,
            created_at=event.timestamp if event.timestamp > 0 else self._clock(),
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

    async def _write(self, batch: _Batch) -> StoreOutcome:
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

    def _count(self, batch: _Batch, outcome: StoreOutcome) -> None:
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
