"""Events at the points the protocol defines, through the in-process bus (section 6, 9.6)."""

from __future__ import annotations

import pytest

from mics.events.bus import topic_for
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import verify_event
from tests.e2e.conftest import SECRET, TENANT, Stack, StackFactory, tenant_config
from tests.support.waiting import wait_until


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, bytes, hook_pb.MqEvent]] = []

    async def __call__(self, topic: str, key: bytes, value: bytes) -> None:
        self.events.append((topic, key, hook_pb.MqEvent.FromString(value)))

    def of(self, event_type: int) -> list[tuple[str, bytes, hook_pb.MqEvent]]:
        return [e for e in self.events if e[2].event_type == event_type]


async def events_stack(make_stack: StackFactory, **tenant: object) -> tuple[Stack, Recorder]:
    stack = await make_stack(tenant_config(**tenant), event_bus="inprocess")
    recorder = Recorder()
    assert stack.gateway.inprocess is not None
    stack.gateway.inprocess.subscribe(recorder)
    return stack, recorder


async def test_connect_events_are_signed_and_carry_the_connect_ack(
    make_stack: StackFactory,
) -> None:
    stack, recorder = await events_stack(make_stack)
    client = await stack.connect("u1", "phone")
    await wait_until(lambda: len(recorder.of(hook_pb.CONNECT_ONLINE)) == 1, what="online event")
    await client.close()
    await wait_until(lambda: len(recorder.of(hook_pb.CONNECT_OFFLINE)) == 1, what="offline event")
    for event_type in (hook_pb.CONNECT_ONLINE, hook_pb.CONNECT_OFFLINE):
        topic, key, event = recorder.of(event_type)[0]
        assert (topic, key) == (topic_for(TENANT), b"u1")
        assert (event.user_id, event.device_id, event.msg_id) == ("u1", "phone", "")
        assert verify_event(event, SECRET)
        ack = msg_pb.ConnectAck.FromString(event.event_data)
        assert (ack.code, ack.user_id, ack.node_id) == (1000, "u1", "node-test")
        assert ack.trace_id == event.trace_id != ""


async def test_chat_events_only_for_sent_messages(make_stack: StackFactory) -> None:
    stack, recorder = await events_stack(make_stack)
    alice = await stack.connect("u1")
    await stack.connect("u2")
    assert (await alice.send_single("u2", b"hi", msg_id="ok-1")).status == msg_pb.SENT
    denied = await alice.send_single("u2", b"forbidden words", msg_id="no-1")
    assert denied.status == msg_pb.FAILED
    assert (await alice.send_group("g1", b"all", msg_id="grp-1")).status == msg_pb.SENT
    await wait_until(lambda: len(recorder.of(hook_pb.GROUP_CHAT_MSG)) == 1, what="group event")
    singles = recorder.of(hook_pb.SINGLE_CHAT_MSG)
    assert [e.msg_id for _, _, e in singles] == ["ok-1"]
    _, key, single = singles[0]
    assert key == b"u1"
    assert (single.user_id, single.to_user_id) == ("u1", "u2")
    assert msg_pb.MessageRequest.FromString(single.event_data).msg_body == b"hi"
    assert all(verify_event(e, SECRET) for _, _, e in recorder.events)
    _, _, group = recorder.of(hook_pb.GROUP_CHAT_MSG)[0]
    assert (group.group_id, group.msg_id) == ("g1", "grp-1")


@pytest.mark.parametrize("mode", ["notify_pull", "dual"])
async def test_offline_recipient_gets_one_event_keyed_by_recipient(
    make_stack: StackFactory, mode: str
) -> None:
    stack, recorder = await events_stack(make_stack, offline_mode=mode)
    alice = await stack.connect("u1")
    ack = await alice.send_single("u2", b"later", msg_id="off-1")
    assert (ack.status, ack.reason) == (msg_pb.SENT, "user_offline")
    offline = recorder.of(hook_pb.OFFLINE_MESSAGE)
    assert len(offline) == 1
    topic, key, event = offline[0]
    assert (topic, key) == (topic_for(TENANT), b"u2")
    assert (event.user_id, event.to_user_id, event.msg_id) == ("u1", "u2", "off-1")
    assert verify_event(event, SECRET)
    # dual also buffers; notify_pull holds nothing in the gateway.
    pending = stack.gateway.gateway.buffer.pending(TENANT, "u2")
    assert pending == (1 if mode == "dual" else 0)
    group = await alice.send_group("g1", b"to all", msg_id="grp-off")
    assert group.offline_notified_users == 2
    await wait_until(lambda: len(recorder.of(hook_pb.OFFLINE_MESSAGE)) == 3, what="group offline")
    recipients = sorted(e.to_user_id for _, _, e in recorder.of(hook_pb.OFFLINE_MESSAGE)[1:])
    assert recipients == ["u2", "u3"]


async def test_without_a_consumer_offline_messages_fall_back_to_the_buffer(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(tenant_config(offline_mode="notify_pull"), event_bus="inprocess")
    alice = await stack.connect("u1")
    ack = await alice.send_single("u2", b"held by the gateway", msg_id="fb-1")
    assert (ack.status, ack.reason) == (msg_pb.SENT, "offline_buffered")
    bob = await stack.connect("u2")
    assert (await bob.next_delivery(timeout=5)).msg_id == "fb-1"
