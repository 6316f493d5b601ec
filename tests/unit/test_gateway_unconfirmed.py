"""Deliveries a v1.1 connection did not confirm: the ledger, the session, the requeue."""

from __future__ import annotations

import asyncio

import pytest

from mics.gateway.metrics import GatewayMetrics
from mics.gateway.offline import LegacyBuffer, OfflineDelivery
from mics.gateway.session import Session
from mics.gateway.tenants import OfflineMode, TenantDirectory, TenantRuntime
from mics.gateway.unconfirmed import Kind, Unconfirmed
from mics.hooks.policy import HookDefaults
from mics.observability.metrics import MetricsRegistry
from mics.protocol.pb import mics_hook_pb2 as hook_pb

# -- the ledger ------------------------------------------------------------------------------


def test_a_receipt_confirms_the_earliest_delivery_with_its_id() -> None:
    ledger = Unconfirmed(max_entries=10, max_bytes=1000)
    ledger.add("m1", b"first", Kind.LIVE)
    ledger.add("m2", b"other", Kind.BUFFERED)
    ledger.add("m1", b"second", Kind.BUFFERED)  # another sender reused the id
    assert ledger.pending("m1", Kind.BUFFERED) == 1
    assert ledger.confirm("m1") is Kind.LIVE
    assert ledger.confirm("m9") is None  # ids that match nothing are ignored
    assert ledger.take() == [("m2", b"other"), ("m1", b"second")]
    assert len(ledger) == 0
    assert ledger.bytes == 0
    assert ledger.confirm("m1") is None


def test_the_ledger_forgets_the_oldest_past_its_caps_and_counts_them() -> None:
    ledger = Unconfirmed(max_entries=3, max_bytes=10)
    for index in range(5):
        ledger.add(f"m{index}", b"ab", Kind.LIVE)
    assert [msg_id for msg_id, _ in ledger.take()] == ["m2", "m3", "m4"]
    assert ledger.evicted == 2
    ledger.add("big", b"x" * 8, Kind.LIVE)
    ledger.add("next", b"x" * 8, Kind.LIVE)  # 16 bytes > 10: the oldest goes
    assert ledger.take() == [("next", b"x" * 8)]
    # A single frame over the byte cap is still kept: the cap never empties the ledger.
    ledger.add("huge", b"x" * 50, Kind.LIVE)
    assert len(ledger) == 1


# -- the session -----------------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0


def runtime(mode: OfflineMode = OfflineMode.NOTIFY_PULL) -> TenantRuntime:
    config = hook_pb.TenantRuntimeConfig(tenant_secret="s3cret", offline_mode=mode.value)
    return TenantDirectory({"t1": "http://auth"}, {}, HookDefaults()).runtime_from_auth(
        "t1", config
    )


def make_session(loop: asyncio.AbstractEventLoop, *, v11: bool) -> tuple[Session, FakeTransport]:
    transport = FakeTransport()
    session = Session(
        tenant_id="t1",
        user_id="u1",
        device_id="d1",
        conn_id="c1",
        trace_id="tr",
        runtime=runtime(),
        v11=v11,
        transport=transport,
        loop=loop,
        send_limit=0,
        close_cb=lambda *_: None,
        ledger_limits=(100, 1 << 20),
    )
    return session, transport


async def test_a_v11_session_keeps_live_deliveries_until_confirmed_in_write_order() -> None:
    session, transport = make_session(asyncio.get_running_loop(), v11=True)
    assert session.ledger is None, "an idle connection carries no ledger"
    assert session.deliver(b"held-1", "h1")  # held behind the connect drain
    session.release_held()
    session.send_tracked(b"buffered", "b1", Kind.BUFFERED)
    assert session.deliver(b"live-1", "l1")
    session.hold()  # another drain (a nudge)
    assert session.deliver(b"held-2", "h2")
    await asyncio.sleep(0)  # the per-tick flush
    assert b"".join(transport.written).count(b"held-2") == 0
    assert session.ledger is not None
    assert session.ledger.confirm("b1") is Kind.BUFFERED
    # Written and unconfirmed first, in write order, then what is still held.
    assert session.take_undelivered() == [("h1", b"held-1"), ("l1", b"live-1"), ("h2", b"held-2")]
    assert session.take_undelivered() == []


async def test_a_v1_session_tracks_nothing_but_still_hands_back_held_deliveries() -> None:
    session, _ = make_session(asyncio.get_running_loop(), v11=False)
    session.release_held()
    assert session.deliver(b"live", "l1")
    session.hold()
    assert session.deliver(b"held", "h1")
    assert session.ledger is None
    assert session.take_undelivered() == [("h1", b"held")]


async def test_a_closed_session_refuses_deliveries_so_they_go_offline() -> None:
    session, transport = make_session(asyncio.get_running_loop(), v11=True)
    session.release_held()
    transport.closing = True
    assert session.deliver(b"live", "l1")  # queued: the flush finds the socket closing
    await asyncio.sleep(0)
    assert session.closed
    assert not session.deliver(b"late", "l2")
    assert session.take_undelivered() == [("l1", b"live")]


# -- the requeue -----------------------------------------------------------------------------


class ManualBus:
    """An event bus whose confirmations the test resolves."""

    enabled = True

    def __init__(self, *, refuse: bool = False) -> None:
        self.refuse = refuse
        self.events: list[hook_pb.MqEvent] = []
        self.confirmations: list[asyncio.Future[bool]] = []

    def publish(self, event: hook_pb.MqEvent) -> bool:
        self.events.append(event)
        return True

    def publish_confirmed(self, event: hook_pb.MqEvent) -> asyncio.Future[bool] | None:
        if self.refuse:
            return None
        self.events.append(event)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.confirmations.append(future)
        return future

    async def start(self) -> None:
        return None

    async def stop(self, timeout_s: float) -> None:
        return None


def make_offline(bus: ManualBus, **buffer_limits: int) -> tuple[OfflineDelivery, LegacyBuffer]:
    metrics = GatewayMetrics(MetricsRegistry())
    limits = {"max_messages_per_user": 100, "max_bytes_per_user": 10_000}
    limits.update(buffer_limits)
    buffer = LegacyBuffer(max_users_per_tenant=100, metrics=metrics, **limits)
    return OfflineDelivery(buffer=buffer, events=bus, notify_wait_s=5.0, metrics=metrics), buffer


def items(*names: str) -> list[tuple[bytes, object]]:
    def builder(name: str) -> object:
        return lambda: hook_pb.MqEvent(tenant_id="t1", msg_id=name, to_user_id="u1")

    return [(name.encode(), builder(name)) for name in names]


async def test_requeue_enqueues_and_buffers_in_order_before_it_returns() -> None:
    bus = ManualBus()
    offline, buffer = make_offline(bus)
    settle = offline.requeue(runtime(), "u1", items("a", "b", "c"))  # type: ignore[arg-type]
    # Everything is enqueued and buffered already, before anything is awaited.
    assert [e.msg_id for e in bus.events] == ["a", "b", "c"]
    assert buffer.pending("t1", "u1") == 3
    bus.confirmations[0].set_result(True)
    bus.confirmations[1].set_result(True)
    bus.confirmations[2].set_result(False)  # the broker gave up: the buffer still holds it
    result = await settle
    assert (result.notified, result.buffered, result.lost) == (2, 1, 0)
    assert buffer.take("t1", "u1") == [b"a", b"b", b"c"]


async def test_requeue_for_a_legacy_tenant_only_buffers() -> None:
    bus = ManualBus()
    offline, buffer = make_offline(bus)
    result = await offline.requeue(runtime(OfflineMode.LEGACY), "u1", items("a"))  # type: ignore[arg-type]
    assert bus.events == []
    assert (result.notified, result.buffered, result.lost) == (0, 1, 0)
    assert buffer.take("t1", "u1") == [b"a"]


async def test_requeue_counts_what_nothing_could_hold_as_lost() -> None:
    bus = ManualBus(refuse=True)  # the event queue is full
    offline, _ = make_offline(bus, max_bytes_per_user=1)  # and no frame fits the buffer
    result = await offline.requeue(runtime(), "u1", items("aa", "bb"))  # type: ignore[arg-type]
    assert (result.notified, result.buffered, result.lost) == (0, 0, 2)


# -- waiting for the broker's confirmation ---------------------------------------------------


async def test_a_confirmation_in_time_counts_and_a_late_one_is_given_up_on() -> None:
    from mics.gateway.offline import _confirmed_within

    loop = asyncio.get_running_loop()
    prompt: asyncio.Future[bool] = loop.create_future()
    loop.call_soon(prompt.set_result, True)
    assert await _confirmed_within(prompt, 5.0)

    late: asyncio.Future[bool] = loop.create_future()
    assert not await _confirmed_within(late, 0.01)
    # Given up on: resolved False by the waiter, so the dispatcher's late report (which
    # resolves only futures not yet done) changes nothing.
    assert late.done()
    assert late.result() is False

    failed: asyncio.Future[bool] = loop.create_future()
    loop.call_soon(failed.set_exception, RuntimeError("broker gave up"))
    assert not await _confirmed_within(failed, 5.0)
    refused: asyncio.Future[bool] = loop.create_future()
    refused.set_result(False)
    assert not await _confirmed_within(refused, 5.0)
    dropped: asyncio.Future[bool] = loop.create_future()
    loop.call_soon(dropped.cancel)  # by someone else: a False verdict, not a cancellation
    assert not await _confirmed_within(dropped, 5.0)


async def test_a_cancelled_waiter_stops_waiting_and_stays_cancelled() -> None:
    from mics.gateway.offline import _confirmed_within

    confirmation: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    waiter = asyncio.ensure_future(_confirmed_within(confirmation, 5.0))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert confirmation.cancelled()  # nobody waits on it any more
