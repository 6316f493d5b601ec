"""From events to rows (verification, filters, priority, counters, nudges) and the
operations jobs (retention cleanup, reconciliation), on SQLite."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from mics.backend import BackendConfig, BackendState, demo_config
from mics.backend.ingest import OfflineEvent, OfflineIngestor, StoreFailed
from mics.backend.jobs import PeriodicJobs, cleanup, reconcile, run_cleanup, run_reconcile
from mics.backend.store import OfflineRepository, Stats, Store
from mics.events.bus import topic_for
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_event

SECRET = "dev-secret-demo"
TOPIC = topic_for("demo")
T0 = 1_700_000_000_000  # 2023-11-14
DAY = dt.date(2023, 11, 14)
DAY_MS = 86_400_000


def offline_event(
    mid: str = "m1",
    *,
    sender: str = "alice",
    recipient: str = "bob",
    body: bytes = b"hi",
    group: str = "",
    ts: int = T0,
    tenant: str = "demo",
    secret: str | None = SECRET,
    event_type: int = hook_pb.OFFLINE_MESSAGE,
    message: msg_pb.MessageRequest | None = None,
) -> hook_pb.MqEvent:
    request = message or msg_pb.MessageRequest(
        tenant_id=tenant,
        user_id=sender,
        device_id="d1",
        msg_id=mid,
        msg_type=msg_pb.GROUP_CHAT if group else msg_pb.SINGLE_CHAT,
        to_user_id="" if group else recipient,
        group_id=group,
        msg_body=body,
        timestamp_ms=ts - 5,
    )
    event = hook_pb.MqEvent(
        tenant_id=tenant,
        event_type=event_type,  # type: ignore[arg-type]
        msg_id=mid,
        user_id=sender,
        device_id="d1",
        to_user_id=recipient,
        group_id=group,
        event_data=request.SerializeToString(),
        timestamp=ts,
        node_id="n1",
    )
    if secret is not None:
        sign_event(event, secret)
    return event


def wire(event: hook_pb.MqEvent) -> tuple[str, bytes]:
    return TOPIC, event.SerializeToString()


class RecordingNudger:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def notify(self, tenant_id: str, user_id: str) -> None:
        self.calls.append((tenant_id, user_id))


@pytest.fixture
def config(tmp_path: Path) -> BackendConfig:
    base = demo_config()
    demo = base.tenants["demo"].model_copy(update={"offline_sender_priority": {"carol": 7}})
    return base.model_copy(
        update={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'offline.db'}",
            "tenants": {"demo": demo},
        }
    )


@pytest.fixture
async def state(config: BackendConfig) -> AsyncIterator[BackendState]:
    state = BackendState.from_config(config)
    state.ingestor.nudger = RecordingNudger()  # type: ignore[assignment]
    try:
        yield state
    finally:
        await state.store.close()


@pytest.fixture
def ingestor(state: BackendState) -> OfflineIngestor:
    return state.ingestor


async def rows(state: BackendState, user: str = "bob") -> list[Any]:
    repo = await state.store.repository()
    return await repo.fetch_page("demo", user, 0, 1000)


def sample(state: BackendState, name: str, **labels: str) -> float:
    return state.metrics.registry.sample(name, labels)


# -- storing -----------------------------------------------------------------------------


async def test_event_is_stored_once_and_counted(state: BackendState) -> None:
    event = offline_event()
    outcome = await state.ingestor.ingest([wire(event), wire(event)])
    assert outcome.inserted == 1
    await state.ingestor.store_event_bytes(TOPIC, b"bob", event.SerializeToString())
    [row] = await rows(state)
    assert row.message_data == event.event_data
    assert (row.from_user_id, row.message_id, row.device_id) == ("alice", "m1", "d1")
    assert row.created_at == T0
    assert sample(state, "offline_message_consumed_total", tenant="demo") == 3
    assert sample(state, "offline_message_stored_total", tenant="demo") == 1
    assert sample(state, "offline_message_duplicate_total", tenant="demo") == 2
    assert (
        sample(state, "offline_consumer_events_total", tenant="demo", event_type="OfflineMessage")
        == 3
    )
    stats = (await (await state.store.repository()).consume_stats(DAY))["demo"]
    assert stats == Stats(consumed=3, stored=1, duplicate=2)


async def test_group_message_to_three_offline_members(state: BackendState) -> None:
    events = [offline_event("g-1", group="friends", recipient=u) for u in ("bob", "carol", "dave")]
    outcome = await state.ingestor.ingest([wire(e) for e in events])
    assert outcome.inserted == 3
    for user in ("bob", "carol", "dave"):
        [row] = await rows(state, user)
        assert row.group_id == "friends"
        assert row.message_type == msg_pb.GROUP_CHAT


async def test_nudges_only_recipients_with_new_rows(state: BackendState) -> None:
    nudger = state.ingestor.nudger
    assert isinstance(nudger, RecordingNudger)
    await state.ingestor.ingest(
        [wire(offline_event("m1")), wire(offline_event("m1", recipient="carol"))]
    )
    await state.ingestor.ingest([wire(offline_event("m1"))])  # duplicate: no nudge
    assert sorted(nudger.calls) == [("demo", "bob"), ("demo", "carol")]


async def test_other_event_types_are_ignored_without_touching_the_store(
    state: BackendState,
) -> None:
    connect = offline_event(event_type=hook_pb.CONNECT_ONLINE)
    chat = offline_event(event_type=hook_pb.SINGLE_CHAT_MSG)
    outcome = await state.ingestor.ingest([wire(connect), wire(chat)])
    assert outcome.inserted == 0
    assert not state.store.is_open  # a lazily opened store stays closed
    assert (
        sample(state, "offline_consumer_events_total", tenant="demo", event_type="ConnectOnline")
        == 1
    )
    assert (
        sample(state, "offline_consumer_events_total", tenant="demo", event_type="SingleChatMsg")
        == 1
    )
    assert sample(state, "offline_message_consumed_total", tenant="demo") == 0


# -- rejection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "metric", "labels"),
    [
        (offline_event(secret="wrong-secret"), "offline_message_invalid_sign_total", {}),
        (offline_event(secret=None), "offline_message_invalid_sign_total", {}),
        (
            offline_event(tenant="other", secret=SECRET),
            "offline_message_skipped_total",
            {"reason": "tenant_mismatch"},
        ),
        (
            offline_event(recipient=""),
            "offline_message_skipped_total",
            {"reason": "invalid_data"},
        ),
        (
            offline_event(mid="x" * 513),
            "offline_message_skipped_total",
            {"reason": "invalid_data"},
        ),
        (
            offline_event(mid="a\x00b"),
            "offline_message_skipped_total",
            {"reason": "invalid_data"},
        ),
        (
            offline_event(mid="\U0001f600" * 129),  # 129 characters, 516 bytes
            "offline_message_skipped_total",
            {"reason": "invalid_data"},
        ),
        (
            offline_event(ts=10**17),  # past year 9999: no day to count it on
            "offline_message_skipped_total",
            {"reason": "invalid_data"},
        ),
        (
            offline_event(
                message=msg_pb.MessageRequest(tenant_id="demo", user_id="alice", msg_id="other")
            ),
            "offline_message_skipped_total",
            {"reason": "invalid_data"},
        ),
        (
            offline_event(
                message=msg_pb.MessageRequest(tenant_id="other", user_id="alice", msg_id="m1")
            ),
            "offline_message_skipped_total",
            {"reason": "tenant_mismatch"},
        ),
    ],
    ids=[
        "wrong-sign",
        "unsigned",
        "event-tenant",
        "no-recipient",
        "long-id",
        "nul-id",
        "long-utf8-id",
        "far-future",
        "data-msg-id",
        "data-tenant",
    ],
)
async def test_invalid_events_are_skipped_and_counted(
    state: BackendState, event: hook_pb.MqEvent, metric: str, labels: dict[str, str]
) -> None:
    outcome = await state.ingestor.ingest([wire(event), wire(offline_event("good"))])
    assert outcome.inserted == 1
    assert [r.message_id for r in await rows(state)] == ["good"]
    assert sample(state, metric, tenant="demo", **labels) == 1
    stats = await (await state.store.repository()).consume_stats(dt.datetime.now(dt.UTC).date())
    assert stats["demo"].invalid == 1


async def test_ids_up_to_512_utf8_bytes_are_stored(state: BackendState) -> None:
    longest = "\U0001f600" * 128  # 512 bytes
    outcome = await state.ingestor.ingest([wire(offline_event(longest, sender="é" * 256))])
    assert outcome.inserted == 1
    assert [r.message_id for r in await rows(state)] == [longest]


async def test_event_data_that_is_not_a_message_is_skipped(state: BackendState) -> None:
    event = offline_event()
    event.event_data = b"\xff\xff\xff"
    sign_event(event, SECRET)
    await state.ingestor.ingest([wire(event)])
    assert sample(state, "offline_message_skipped_total", tenant="demo", reason="invalid_data") == 1


async def test_unparsable_and_foreign_records_are_skipped(state: BackendState) -> None:
    await state.ingestor.ingest(
        [(TOPIC, b"\xff\x00garbage"), (TOPIC, None), ("im-mics-nobody-event", b"")]
    )
    assert sample(state, "offline_message_skipped_total", tenant="demo", reason="unparsable") == 2
    assert sample(state, "offline_message_skipped_total", tenant="", reason="unknown_topic") == 1


# -- plug-ins ----------------------------------------------------------------------------


async def test_default_filters_drop_blocked_words_and_blocked_senders(state: BackendState) -> None:
    state.directory.set_blocked("demo", "carol", True)
    await state.ingestor.ingest(
        [
            wire(offline_event("w", body=b"this is FORBIDDEN")),
            wire(offline_event("c", sender="carol")),
            wire(offline_event("ok")),
        ]
    )
    assert [r.message_id for r in await rows(state)] == ["ok"]
    assert sample(state, "offline_message_skipped_total", tenant="demo", reason="filtered") == 2
    stats = (await (await state.store.repository()).consume_stats(DAY))["demo"]
    assert (stats.consumed, stats.filtered, stats.stored) == (3, 2, 1)


async def test_custom_filter_and_priority_rules(state: BackendState) -> None:
    seen: list[OfflineEvent] = []

    def only_to_bob(event: OfflineEvent) -> str | None:
        seen.append(event)
        return None if event.recipient == "bob" else "not bob"

    def broken(event: OfflineEvent) -> str | None:
        raise RuntimeError("bug")

    state.ingestor.filters = [broken, only_to_bob]
    state.ingestor.priority_rules.append(lambda e: 3 if e.message.msg_body == b"urgent" else 0)
    await state.ingestor.ingest(
        [
            wire(offline_event("a")),
            wire(offline_event("b", body=b"urgent")),
            wire(offline_event("c", sender="carol")),  # SenderPriority from the config: 7
            wire(offline_event("d", sender="carol", body=b"urgent")),  # max(7, 3)
            wire(offline_event("e", recipient="dave")),
        ]
    )
    assert [(r.message_id, r.priority) for r in await rows(state)] == [
        ("a", 0),
        ("b", 3),
        ("c", 7),
        ("d", 7),
    ]
    assert await rows(state, "dave") == []
    assert seen[0].message.msg_id == "a"
    assert seen[0].sender == "alice"


# -- failures ----------------------------------------------------------------------------


class BrokenStore(Store):
    def __init__(self, inner: Store) -> None:
        super().__init__(inner.url)
        self.inner = inner
        self.broken = True

    async def repository(self) -> OfflineRepository:
        if self.broken:
            raise ConnectionError("database down")
        return await self.inner.repository()


async def test_store_failure_raises_and_counts_nothing(
    config: BackendConfig, state: BackendState
) -> None:
    broken = BrokenStore(state.store)
    ingestor = OfflineIngestor(config, broken, state.metrics, nudger=RecordingNudger())  # type: ignore[arg-type]
    event = offline_event()
    with pytest.raises(StoreFailed):
        await ingestor.ingest([wire(event)])
    with pytest.raises(StoreFailed):
        await ingestor.store_event_bytes(TOPIC, b"bob", event.SerializeToString())
    assert sample(state, "offline_message_store_failed_total", tenant="demo") == 2
    assert sample(state, "offline_message_consumed_total", tenant="demo") == 0
    broken.broken = False
    await ingestor.store_event_bytes(TOPIC, b"bob", event.SerializeToString())
    assert len(await rows(state)) == 1
    assert sample(state, "offline_message_consumed_total", tenant="demo") == 1


# -- jobs --------------------------------------------------------------------------------


async def test_run_cleanup_uses_retention_days(state: BackendState, config: BackendConfig) -> None:
    now = T0 + 31 * DAY_MS
    await state.ingestor.ingest(
        [wire(offline_event("old", ts=T0)), wire(offline_event("young", ts=now - DAY_MS))]
    )
    repo = await state.store.repository()
    await repo.mark_delivered_upto("demo", "bob", await repo.max_id("demo", "bob"))
    # 30 days (default) before "now" is after T0: "old" goes, "young" stays.
    assert await cleanup(repo, 30, now_ms=now, batch=1) == 1
    assert await cleanup(repo, 30, now_ms=now) == 0
    async with repo.engine.connect() as conn:
        left = (await conn.execute(text("SELECT message_id FROM offline_messages"))).scalars().all()
    assert left == ["young"]
    # The CLI entry point, with the real clock: "young" (2023) is older than a day too.
    assert await run_cleanup(config.database_url, 1) == 1


async def test_reconcile_flags_a_difference_over_one_percent(
    state: BackendState, config: BackendConfig, caplog: pytest.LogCaptureFixture
) -> None:
    events = [wire(offline_event(f"m{i}")) for i in range(200)]
    await state.ingestor.ingest(events)
    await state.ingestor.ingest(events[:50])  # redelivered: duplicates, not a difference
    await state.ingestor.ingest([wire(offline_event("f", body=b"forbidden"))])  # filtered
    repo = await state.store.repository()
    [ok] = await reconcile(repo, DAY, metrics=state.metrics)
    assert (ok.consumed, ok.stored, ok.duplicate, ok.filtered) == (251, 200, 50, 1)
    assert (ok.expected, ok.rows, ok.diff_ratio, ok.alert) == (200, 200, 0.0, False)

    # 2 rows vanish: 1 % exactly is still fine, 3 rows (1.5 %) alert.
    async with repo._write() as conn:
        await conn.execute(text("DELETE FROM offline_messages WHERE message_id IN ('m1', 'm2')"))
    [edge] = await reconcile(repo, DAY)
    assert edge.diff_ratio == pytest.approx(0.01)
    assert not edge.alert
    async with repo._write() as conn:
        await conn.execute(text("DELETE FROM offline_messages WHERE message_id = 'm3'"))
    caplog.set_level(logging.INFO, logger="mics.backend.jobs")
    [bad] = await reconcile(repo, DAY, metrics=state.metrics)
    assert bad.alert
    assert bad.rows == 197
    assert bad.diff_ratio == pytest.approx(0.015)
    assert state.metrics.registry.sample(
        "offline_message_reconcile_diff_ratio", {"tenant": "demo"}
    ) == pytest.approx(0.015)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["offline reconciliation mismatch"]
    # CLI entry point, day as a string; an empty day is fine.
    [cli] = await run_reconcile(config.database_url, "2023-11-14")
    assert cli.alert
    assert await run_reconcile(config.database_url, "2001-01-01") == []


async def test_periodic_jobs_skip_an_unopened_store_and_reconcile_each_day_once(
    state: BackendState,
) -> None:
    jobs = PeriodicJobs(state.store, state.metrics, interval_s=3600, clock=lambda: T0 + DAY_MS)
    await jobs.run_once()
    assert jobs.runs == 0
    assert not state.store.is_open
    await state.ingestor.ingest([wire(offline_event())])
    await jobs.run_once()
    await jobs.run_once()
    assert jobs.runs == 2
    assert jobs.last_reconciled == DAY
    assert (
        state.metrics.registry.sample("offline_message_reconcile_diff_ratio", {"tenant": "demo"})
        == 0.0
    )
