"""One connection's messages: per-recipient order, without waiting on the broker.

protocol.md 9.9 asks that each recipient receive one connection's messages in the order
they were sent. A message to an offline user waits (bounded) for the broker to confirm
its OFFLINE_MESSAGE event before it is acked; that wait must not hold up the
connection's later messages to other users, and must still keep the order of the
messages to the same user. The bus here confirms only when the test says so, and the
loop is stepped until nothing moves any more: no timing is involved.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from mics.cluster.routes import MemoryRouteTable
from mics.gateway.config import GatewaySettings
from mics.gateway.core import Gateway
from mics.gateway.pipeline import MessagePipeline
from mics.gateway.session import Session
from mics.gateway.tenants import OfflineMode, TenantDirectory, TenantRuntime
from mics.hooks.policy import HookDefaults
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb

TENANT = "t1"


class ManualBus:
    """An event bus whose confirmations the test resolves, or that refuses them."""

    enabled = True

    def __init__(self) -> None:
        self.refuse = False
        self.chat: list[hook_pb.MqEvent] = []
        self.offline: list[hook_pb.MqEvent] = []
        self.pending: dict[str, asyncio.Future[bool]] = {}

    def publish(self, event: hook_pb.MqEvent) -> bool:
        self.chat.append(event)
        return True

    def publish_confirmed(self, event: hook_pb.MqEvent) -> asyncio.Future[bool] | None:
        if self.refuse:
            return None
        self.offline.append(event)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.pending[f"{event.msg_id}>{event.to_user_id}"] = future
        return future

    def offline_ids(self, recipient: str) -> list[str]:
        return [e.msg_id for e in self.offline if e.to_user_id == recipient]

    def confirm(self, msg_id: str, recipient: str, ok: bool = True) -> None:
        self.pending.pop(f"{msg_id}>{recipient}").set_result(ok)

    async def start(self) -> None:
        return None

    async def stop(self, timeout_s: float) -> None:
        return None


class FakeTransport:
    def write(self, data: bytes) -> None:
        return None

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class RecordingSession(Session):
    """A session that keeps what was sent to it, decoded."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.frames: list[msg_pb.ServerFrame] = []

    def send(self, frame: bytes) -> None:
        self.frames.append(msg_pb.ServerFrame.FromString(frame))

    def acks(self) -> list[tuple[str, int, str]]:
        return [
            (f.ack.msg_id, f.ack.status, f.ack.reason) for f in self.frames if f.HasField("ack")
        ]

    def delivered(self) -> list[str]:
        return [f.delivery.message.msg_id for f in self.frames if f.HasField("delivery")]


def runtime(hook_base_url: str = "") -> TenantRuntime:
    config = hook_pb.TenantRuntimeConfig(
        tenant_secret="s3cret",
        offline_mode=OfflineMode.NOTIFY_PULL.value,
        hook_base_url=hook_base_url,
    )
    return TenantDirectory({TENANT: "http://auth"}, {}, HookDefaults()).runtime_from_auth(
        TENANT, config
    )


def session(user: str, rt: TenantRuntime) -> RecordingSession:
    s = RecordingSession(
        tenant_id=TENANT,
        user_id=user,
        device_id="d1",
        conn_id=f"c-{user}",
        trace_id=f"tr-{user}",
        runtime=rt,
        v11=False,
        transport=FakeTransport(),
        loop=asyncio.get_running_loop(),
        send_limit=0,
        close_cb=lambda *_: None,
    )
    s.release_held()  # no connect drain in these tests
    return s


class World:
    def __init__(self, *, hooks: bool = False, max_inflight: int = 32) -> None:
        self.bus = ManualBus()
        settings = GatewaySettings(
            node_id="n1",
            max_inflight_per_connection=max_inflight,
            offline_notify_wait_ms=3_600_000,  # never times out: the test confirms
        )
        self.gateway = Gateway(settings, routes=MemoryRouteTable(), events=self.bus)
        self.pipeline: MessagePipeline = self.gateway.pipeline
        self.runtime = runtime("http://hooks" if hooks else "")
        self.sender = session("s", self.runtime)

    def online(self, user: str) -> RecordingSession:
        s = session(user, self.runtime)
        self.gateway.registry.add(s)
        return s

    async def send(self, msg_id: str, to: str = "", group: str = "") -> None:
        req = msg_pb.MessageRequest(
            msg_id=msg_id,
            msg_type=msg_pb.GROUP_CHAT if group else msg_pb.SINGLE_CHAT,
            to_user_id=to,
            group_id=group,
            msg_body=b"hi",
        )
        await self.pipeline.on_message(self.sender, req)

    def acked(self) -> list[str]:
        return [msg_id for msg_id, _, _ in self.sender.acks()]


async def settle(rounds: int = 50) -> None:
    """Run the loop until every ready callback has run (nothing here waits on time)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


def reasons(world: World, ids: Iterable[str]) -> dict[str, tuple[int, str]]:
    acks = {msg_id: (status, reason) for msg_id, status, reason in world.sender.acks()}
    return {i: acks[i] for i in ids}


async def test_a_slow_confirmation_does_not_hold_up_other_recipients() -> None:
    world = World()
    bob = world.online("bob")
    await world.send("m1", to="alice")  # offline: waits for the broker
    await world.send("m2", to="bob")
    await world.send("m3", to="alice")  # offline too, behind m1
    await world.send("m4", to="bob")
    await settle()
    # Bob has both of his, in order, and their acks are out; m1 is still unconfirmed.
    assert bob.delivered() == ["m2", "m4"]
    assert world.acked() == ["m2", "m4"]
    assert list(world.bus.pending) == ["m1>alice"]
    # Alice's second message waits for her first: not even enqueued yet.
    assert world.bus.offline_ids("alice") == ["m1"]
    world.bus.confirm("m1", "alice")
    await settle()
    assert world.bus.offline_ids("alice") == ["m1", "m3"]
    assert world.acked() == ["m2", "m4", "m1"]
    world.bus.confirm("m3", "alice")
    await world.pipeline.wait_idle()
    assert world.acked() == ["m2", "m4", "m1", "m3"]
    sent_offline = (msg_pb.SENT, "user_offline")
    assert reasons(world, ["m1", "m3"]) == {"m1": sent_offline, "m3": sent_offline}
    assert reasons(world, ["m2", "m4"]) == {"m2": (msg_pb.SENT, ""), "m4": (msg_pb.SENT, "")}


async def test_offline_messages_to_different_users_overlap() -> None:
    world = World()
    for i in range(5):
        await world.send(f"m{i}", to=f"user{i}")
    await settle()
    # All five are with the broker at once: none waits for another's confirmation.
    assert sorted(world.bus.pending) == [f"m{i}>user{i}" for i in range(5)]
    for i in reversed(range(5)):
        world.bus.confirm(f"m{i}", f"user{i}")
    await world.pipeline.wait_idle()
    assert sorted(world.acked()) == [f"m{i}" for i in range(5)]


async def test_fallbacks_to_the_buffer_keep_each_recipients_order() -> None:
    world = World()
    await world.send("m1", to="alice")
    await settle()
    # The next one is refused by the bus at once (its queue is full): it goes to the
    # buffer, but only after m1 did, which the broker then fails to confirm.
    world.bus.refuse = True
    await world.send("m2", to="alice")
    await settle()
    assert world.gateway.buffer.pending(TENANT, "alice") == 0
    world.bus.confirm("m1", "alice", ok=False)
    await world.pipeline.wait_idle()
    frames = world.gateway.buffer.take(TENANT, "alice")
    ids = [msg_pb.ServerFrame.FromString(f).delivery.message.msg_id for f in frames]
    assert ids == ["m1", "m2"]
    buffered = (msg_pb.SENT, "offline_buffered")
    assert reasons(world, ["m1", "m2"]) == {"m1": buffered, "m2": buffered}


async def test_a_group_message_keeps_its_place_behind_earlier_messages_to_its_members(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = World(hooks=True)
    bob = world.online("bob")

    async def allow(*_: object) -> None:
        return None

    async def members(*_: object) -> list[str]:
        return ["alice", "bob", "carol"]

    monkeypatch.setattr(world.pipeline, "_check", allow)
    monkeypatch.setattr(world.pipeline, "_members", members)
    await world.send("m1", to="alice")
    await world.send("g2", group="g")
    await world.send("m3", to="bob")
    await settle()
    # Bob, online, got the group message and the next one without waiting for anyone.
    assert bob.delivered() == ["g2", "m3"]
    assert world.acked() == ["m3"]
    # The offline members' copies wait for m1, which went offline to one of them.
    assert world.bus.offline_ids("alice") == ["m1"]
    assert world.bus.offline_ids("carol") == []
    world.bus.confirm("m1", "alice")
    await settle()
    assert world.bus.offline_ids("alice") == ["m1", "g2"]
    assert world.bus.offline_ids("carol") == ["g2"]
    world.bus.confirm("g2", "alice")
    world.bus.confirm("g2", "carol")
    await world.pipeline.wait_idle()
    assert world.acked() == ["m3", "m1", "g2"]
    group_ack = next(f.ack for f in world.sender.frames if f.ack.msg_id == "g2")
    assert (group_ack.status, group_ack.offline_notified_users) == (msg_pb.SENT, 2)


async def test_the_in_flight_limit_still_counts_messages_waiting_for_the_broker() -> None:
    world = World(max_inflight=2)
    await world.send("m1", to="alice")
    await world.send("m2", to="bob")
    third = asyncio.get_running_loop().create_task(world.send("m3", to="carol"))
    await settle()
    assert not third.done(), "the reader waits for a free slot"
    assert sorted(world.bus.pending) == ["m1>alice", "m2>bob"]
    world.bus.confirm("m2", "bob")
    await settle()
    assert third.done()
    assert sorted(world.bus.pending) == ["m1>alice", "m3>carol"]
    world.bus.confirm("m1", "alice")
    world.bus.confirm("m3", "carol")
    await world.pipeline.wait_idle()
    assert world.acked() == ["m2", "m1", "m3"]
