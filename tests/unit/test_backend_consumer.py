"""The offline consumer's librdkafka calls, against a recording stand-in for the client:
how a poll takes a batch, what the lag refresh asks the broker, how offsets are
committed. The behaviour against a real broker is in
tests/integration/test_backend_consumer_kafka.py."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import TopicPartition

from mics.backend.config import BackendConfig, TenantConfig
from mics.backend.consumer import OfflineConsumer
from mics.backend.state import BackendState
from mics.events.bus import topic_for

TENANT = "t1"
TOPIC = topic_for(TENANT)


class Record:
    """A fetched record, as confluent_kafka.Message answers."""

    def __init__(self, partition: int, offset: int) -> None:
        self._partition = partition
        self._offset = offset

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return TOPIC

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return b""


class FakeClient:
    """Records every call; answers from ``fetched`` (records waiting in the client)."""

    def __init__(self, fetched: list[Record] | None = None) -> None:
        self.fetched = list(fetched or [])
        self.calls: list[tuple[str, Any]] = []
        self.watermarks: dict[int, tuple[int, int]] = {}
        self.group_offsets: dict[int, int] = {}
        self.commits: list[list[tuple[int, int]]] = []

    def poll(self, timeout: float) -> Record | None:
        self.calls.append(("poll", timeout))
        return self.fetched.pop(0) if self.fetched else None

    def consume(self, num_messages: int, timeout: float) -> list[Record]:
        self.calls.append(("consume", (num_messages, timeout)))
        taken, self.fetched = self.fetched[:num_messages], self.fetched[num_messages:]
        return taken

    def get_watermark_offsets(
        self, tp: TopicPartition, timeout: float | None = None, cached: bool = False
    ) -> tuple[int, int]:
        self.calls.append(("watermarks", (tp.partition, cached)))
        return self.watermarks.get(tp.partition, (-1001, -1001))

    def committed(self, tps: list[TopicPartition], timeout: float | None = None) -> list[Any]:
        self.calls.append(("committed", sorted(tp.partition for tp in tps)))
        return [
            TopicPartition(tp.topic, tp.partition, self.group_offsets.get(tp.partition, -1001))
            for tp in tps
        ]

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.calls.append(("commit", asynchronous))
        self.commits.append([(tp.partition, tp.offset) for tp in offsets])


@pytest.fixture
def state() -> BackendState:
    return BackendState.from_config(BackendConfig(tenants={TENANT: TenantConfig(secret="s")}))


def make_consumer(state: BackendState, client: FakeClient, **settings: Any) -> OfflineConsumer:
    consumer = OfflineConsumer(
        "127.0.0.1:9", "g", [TOPIC], state.ingestor, state.metrics, **settings
    )
    consumer._consumer = client  # type: ignore[assignment]
    return consumer


def assign(consumer: OfflineConsumer, client: FakeClient, *partitions: int) -> None:
    consumer._on_assign(client, [TopicPartition(TOPIC, p) for p in partitions])  # type: ignore[arg-type]


def gauge(state: BackendState, name: str, partition: int) -> float | None:
    return state.metrics.registry.registry.get_sample_value(
        name, {"tenant": TENANT, "partition": str(partition)}
    )


def test_a_poll_waits_for_the_first_record_only(state: BackendState) -> None:
    client = FakeClient([Record(0, i) for i in range(3)])
    consumer = make_consumer(state, client, batch_size=500, poll_timeout_s=7.0, lag_interval_s=1e9)
    consumer._next_lag = float("inf")
    records = consumer._poll()
    assert [r.offset() for r in records] == [0, 1, 2]
    # Waiting is for the first record; the rest is what is already fetched, up to the
    # batch size, taken without waiting: never "until the batch is full or the time is up".
    assert client.calls == [("poll", 7.0), ("consume", (499, 0))]
    assert consumer._poll() == []
    assert client.calls[2:] == [("poll", 7.0)]


def test_a_batch_of_one_needs_no_consume(state: BackendState) -> None:
    client = FakeClient([Record(0, 0), Record(0, 1)])
    consumer = make_consumer(state, client, batch_size=1)
    consumer._next_lag = float("inf")
    assert [r.offset() for r in consumer._poll()] == [0]
    assert [name for name, _ in client.calls] == ["poll"]


def test_lag_refresh_uses_cached_watermarks_and_asks_committed_once(
    state: BackendState,
) -> None:
    client = FakeClient()
    client.watermarks = {0: (5, 50), 1: (0, 30), 2: (-1001, -1001)}
    client.group_offsets = {1: 20}  # partition 0 never committed, 2 not fetched yet
    consumer = make_consumer(state, client)
    assign(consumer, client, 0, 1, 2)

    consumer._refresh_lag(client)  # type: ignore[arg-type]
    consumer._refresh_lag(client)  # type: ignore[arg-type]

    # One request for the offsets the group committed before, for all new partitions.
    assert [c for c in client.calls if c[0] == "committed"] == [("committed", [0, 1, 2])]
    # Watermarks only from the client's cache: no round trip per partition.
    watermark_calls = [c for c in client.calls if c[0] == "watermarks"]
    assert watermark_calls
    assert all(cached for _, (_, cached) in watermark_calls)
    assert gauge(state, "kafka_consumer_lag", 0) == 45  # high - low: never committed
    assert gauge(state, "kafka_consumer_lag", 1) == 10  # high - committed
    assert gauge(state, "kafka_consumer_offset", 1) == 20
    assert gauge(state, "kafka_consumer_lag", 2) is None  # not fetched yet: skipped

    # A partition assigned later is asked about once, alone.
    client.watermarks[3] = (0, 4)
    assign(consumer, client, 3)
    consumer._refresh_lag(client)  # type: ignore[arg-type]
    assert [c for c in client.calls if c[0] == "committed"][1:] == [("committed", [3])]
    assert gauge(state, "kafka_consumer_lag", 3) == 4


def test_lag_refresh_while_paused_asks_the_broker(state: BackendState) -> None:
    # Paused partitions are not fetched, so the cached watermarks would go stale.
    client = FakeClient()
    client.watermarks = {0: (0, 9)}
    consumer = make_consumer(state, client)
    assign(consumer, client, 0)
    consumer._paused = True
    consumer._refresh_lag(client)  # type: ignore[arg-type]
    assert ("watermarks", (0, False)) in client.calls
    assert gauge(state, "kafka_consumer_lag", 0) == 9


def test_commits_are_asynchronous_and_never_move_back(state: BackendState) -> None:
    client = FakeClient()
    consumer = make_consumer(state, client)
    assign(consumer, client, 0, 1)
    consumer._commit({(TOPIC, 0): 10, (TOPIC, 1): 5})
    consumer._commit({(TOPIC, 0): 8, (TOPIC, 1): 7})  # 0: a batch read again, stored again
    consumer._commit({(TOPIC, 0): 10, (TOPIC, 9): 3})  # 9: not assigned (revoked)
    assert client.commits == [[(0, 10), (1, 5)], [(1, 7)]]
    assert {c[1] for c in client.calls if c[0] == "commit"} == {True}
    # A new assignment starts afresh.
    consumer._on_revoke(client, [TopicPartition(TOPIC, 0)])  # type: ignore[arg-type]
    assign(consumer, client, 0)
    consumer._commit({(TOPIC, 0): 4})
    assert client.commits[-1] == [(0, 4)]


def test_commit_reports_update_the_offset_gauge(state: BackendState) -> None:
    client = FakeClient()
    consumer = make_consumer(state, client)
    assign(consumer, client, 0)
    consumer._on_commit(None, [TopicPartition(TOPIC, 0, 12), TopicPartition(TOPIC, 5, 3)])
    assert gauge(state, "kafka_consumer_offset", 0) == 12
    assert gauge(state, "kafka_consumer_offset", 5) is None  # not assigned: not reported
    failed = state.metrics.registry.sample("kafka_consumer_commit_failed_total", {"group": "g"})
    assert failed == 0


def test_batch_size_must_be_positive(state: BackendState) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        OfflineConsumer("x", "g", [TOPIC], state.ingestor, state.metrics, batch_size=0)
