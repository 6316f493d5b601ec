"""Single and group chat, acks and their reasons, over real sockets (protocol.md 2.5-2.7)."""

from __future__ import annotations

import asyncio

import pytest

from mics.backend.config import UserConfig
from mics.client import ConnectRejected
from mics.protocol import codec
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.conftest import TENANT, Stack, StackFactory, tenant_config

SENT = msg_pb.SENT
FAILED = msg_pb.FAILED


async def test_single_chat_reaches_every_device_of_recipient_not_senders_others(
    stack: Stack,
) -> None:
    alice_phone = await stack.connect("u1", "phone")
    alice_laptop = await stack.connect("u1", "laptop")
    bob_phone = await stack.connect("u2", "phone")
    bob_laptop = await stack.connect("u2", "laptop")
    ack = await alice_phone.send_single("u2", b"hello", msg_id="m-1")
    assert (ack.msg_id, ack.status, ack.reason) == ("m-1", SENT, "")
    assert (ack.partial_delivery, ack.offline_buffered_users) == (False, 0)
    for device in (bob_phone, bob_laptop):
        got = await device.next_delivery(timeout=5)
        assert (got.user_id, got.device_id, got.to_user_id, got.msg_body) == (
            "u1",
            "phone",
            "u2",
            b"hello",
        )
        assert got.tenant_id == TENANT
    # The sender's other device gets no copy: the next thing it sees is a later message.
    await bob_phone.send_single("u1", b"reply")
    got = await alice_laptop.next_delivery(timeout=5)
    assert got.msg_body == b"reply"


async def test_message_to_self_reaches_all_own_devices(stack: Stack) -> None:
    phone = await stack.connect("u1", "phone")
    laptop = await stack.connect("u1", "laptop")
    ack = await phone.send_single("u1", b"note to self")
    assert ack.status == SENT
    assert (await phone.next_delivery(timeout=5)).msg_body == b"note to self"
    assert (await laptop.next_delivery(timeout=5)).msg_body == b"note to self"


async def test_spoofed_sender_fields_are_overwritten(stack: Stack) -> None:
    mallory = await stack.connect("u3", "evil")
    bob = await stack.connect("u2")
    spoof = msg_pb.MessageRequest(
        tenant_id="other-tenant",
        user_id="u1",
        device_id="alices-phone",
        msg_id="spoof-1",
        to_user_id="u2",
        msg_body=b"I am alice",
    )
    ack = await mallory.send(spoof)
    assert ack.status == SENT
    got = await bob.next_delivery(timeout=5)
    assert (got.tenant_id, got.user_id, got.device_id) == (TENANT, "u3", "evil")


async def test_blank_msg_id_and_timestamp_are_filled(stack: Stack) -> None:
    import aiohttp

    bob = await stack.connect("u2")
    async with aiohttp.ClientSession() as http:
        ws = await http.ws_connect(f"{stack.ws_url}?tenantId={TENANT}&token=u1-token&deviceId=d")
        await ws.receive()
        frame = msg_pb.ClientFrame(message=msg_pb.MessageRequest(to_user_id="u2", msg_body=b"x"))
        await ws.send_bytes(frame.SerializeToString())
        reply = msg_pb.ServerFrame.FromString((await ws.receive()).data)
        await ws.close()
    assert reply.ack.status == SENT
    assert len(reply.ack.msg_id) == 32
    got = await bob.next_delivery(timeout=5)
    assert got.msg_id == reply.ack.msg_id
    assert got.timestamp_ms > 1_600_000_000_000


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (msg_pb.MessageRequest(msg_type=msg_pb.SINGLE_CHAT, to_user_id=" "), "missing to_user_id"),
        (msg_pb.MessageRequest(msg_type=msg_pb.GROUP_CHAT), "missing group_id"),
        (msg_pb.MessageRequest(msg_type=7, to_user_id="u2"), "invalid msg_type"),  # type: ignore[arg-type]
    ],
    ids=["missing-to", "missing-group", "bad-type"],
)
async def test_validation_failures(
    stack: Stack, message: msg_pb.MessageRequest, reason: str
) -> None:
    client = await stack.connect("u1")
    message.msg_id = "v-1"
    ack = await client.send(message)
    assert (ack.status, ack.reason) == (FAILED, reason)


async def test_oversized_body_fails_and_oversized_frame_gets_4401(make_stack: StackFactory) -> None:
    stack = await make_stack(max_message_bytes=1000)
    client = await stack.connect("u1")
    bob = await stack.connect("u2")
    ack = await client.send_single("u2", b"x" * 1001)
    assert (ack.status, ack.reason) == (FAILED, "msg_body_too_large")
    big = msg_pb.ClientFrame(
        message=msg_pb.MessageRequest(msg_id="huge", to_user_id="u2", msg_body=b"y" * 70_000)
    )
    await client.send_raw(big.SerializeToString())
    err = await client.next_error(timeout=5)
    assert (err.code, err.message) == (codec.ERROR_FRAME_TOO_LARGE, "frame too large")
    # The connection stays open and usable; nothing of the rejected frame was delivered.
    ok = await client.send_single("u2", b"small")
    assert ok.status == SENT
    assert (await bob.next_delivery(timeout=5)).msg_body == b"small"
    assert (
        stack.metric(
            "mics_ws_frames_rejected_total", {"tenant": TENANT, "reason": "frame_too_large"}
        )
        == 1
    )


async def test_invalid_protobuf_gets_4400_and_connection_stays(stack: Stack) -> None:
    client = await stack.connect("u1")
    await client.send_raw(b"\xff\xff\xff\xff")
    err = await client.next_error(timeout=5)
    assert (err.code, err.message) == (codec.ERROR_INVALID_PROTOBUF, "invalid protobuf")
    ack = await client.send_single("u1", b"still here")
    assert ack.status == SENT


async def test_duplicate_msg_id_is_acked_duplicate_and_not_delivered_again(stack: Stack) -> None:
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    assert (await alice.send_single("u2", b"once", msg_id="dup-1")).reason == ""
    again = await alice.send_single("u2", b"once", msg_id="dup-1")
    assert (again.status, again.reason) == (SENT, "duplicate")
    await alice.send_single("u2", b"next", msg_id="dup-2")
    assert (await bob.next_delivery(timeout=5)).msg_id == "dup-1"
    assert (await bob.next_delivery(timeout=5)).msg_id == "dup-2"
    # Another sender may reuse the same id (dedup is per sender, section 9.7).
    carol = await stack.connect("u3")
    assert (await carol.send_single("u2", b"mine", msg_id="dup-1")).reason == ""


async def test_hook_deny_fails_with_reason_and_does_not_consume_id(stack: Stack) -> None:
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    denied = await alice.send_single("u2", b"this is forbidden", msg_id="deny-1")
    assert (denied.status, denied.reason) == (FAILED, "blocked word")
    unknown = await alice.send_single("nobody", b"hi", msg_id="deny-2")
    assert (unknown.status, unknown.reason) == (FAILED, "recipient unknown")
    retry = await alice.send_single("u2", b"this is fine", msg_id="deny-1")
    assert (retry.status, retry.reason) == (SENT, "")
    assert (await bob.next_delivery(timeout=5)).msg_body == b"this is fine"


async def test_tenant_qps_limit(make_stack: StackFactory) -> None:
    stack = await make_stack(tenant_config(tenant_max_message_qps=3))
    alice = await stack.connect("u1")
    acks = await asyncio.gather(*(alice.send_single("u2", b"x") for _ in range(8)))
    limited = [a for a in acks if a.reason == "tenant qps limited"]
    assert all(a.status == FAILED for a in limited)
    # At most 3 per second pass; the burst may straddle one second boundary.
    assert 2 <= len(limited) <= 5
    assert stack.metric("mics_rate_limited_total", {"tenant": TENANT, "kind": "message_qps"}) >= 2


async def test_offline_recipient_is_buffered_and_drained_on_connect(stack: Stack) -> None:
    alice = await stack.connect("u1")
    first = await alice.send_single("u2", b"while you were out", msg_id="off-1")
    second = await alice.send_single("u2", b"and again", msg_id="off-2")
    assert (first.status, first.reason) == (SENT, "offline_buffered")
    assert second.reason == "offline_buffered"
    bob = stack.client("u2")
    await bob.connect()
    assert [(await bob.next_delivery(timeout=5)).msg_id for _ in range(2)] == ["off-1", "off-2"]
    sync = await bob.next_offline_sync(timeout=5)
    assert (sync.delivered, sync.complete, sync.reason) == (2, True, "")


async def test_legacy_buffer_evicts_oldest_when_full(make_stack: StackFactory) -> None:
    stack = await make_stack(offline_buffer_max_messages_per_user=2)
    alice = await stack.connect("u1")
    for i in range(3):
        assert (await alice.send_single("u2", b"m", msg_id=f"e-{i}")).reason == "offline_buffered"
    bob = await stack.connect("u2")
    got = [(await bob.next_delivery(timeout=5)).msg_id for _ in range(2)]
    assert got == ["e-1", "e-2"]
    assert stack.metric("mics_offline_buffer_evicted_total", {"tenant": TENANT}) == 1


async def test_message_too_big_for_buffer_is_failed_not_silently_sent(
    make_stack: StackFactory,
) -> None:
    stack = await make_stack(offline_buffer_max_bytes_per_user=100)
    alice = await stack.connect("u1")
    ack = await alice.send_single("u2", b"z" * 500)
    assert (ack.status, ack.reason) == (FAILED, "offline_buffer_full")


async def test_live_messages_wait_behind_the_backlog(stack: Stack) -> None:
    alice = await stack.connect("u1")
    await alice.send_single("u2", b"old", msg_id="b-1")
    bob = stack.client("u2")
    connecting = asyncio.create_task(bob.connect())
    live = asyncio.create_task(alice.send_single("u2", b"new", msg_id="b-2"))
    await connecting
    await live
    order = [(await bob.next_delivery(timeout=5)).msg_id for _ in range(2)]
    assert order == ["b-1", "b-2"]


async def test_group_fan_out_with_offline_member_and_diagnostics(stack: Stack) -> None:
    u1 = await stack.connect("u1")
    u2a = await stack.connect("u2", "a")
    u2b = await stack.connect("u2", "b")
    ack = await u1.send_group("g1", b"hello group", msg_id="g-1")
    assert ack.status == SENT
    assert ack.offline_buffered_users == 1  # u3 is offline
    assert ack.offline_skipped_users == 0
    assert ack.partial_delivery is False
    for device in (u1, u2a, u2b):
        got = await device.next_delivery(timeout=5)
        assert (got.msg_id, got.group_id, got.msg_type) == ("g-1", "g1", msg_pb.GROUP_CHAT)
    u3 = await stack.connect("u3")
    assert (await u3.next_delivery(timeout=5)).msg_id == "g-1"


async def test_group_failures(make_stack: StackFactory) -> None:
    users = [f"m{i}" for i in range(6)]
    stack = await make_stack(
        tenant_config(
            users=["u1", "u2", "u3", *users],
            groups={"g1": ["u1", "u2", "u3"], "big": ["u1", *users], "solo": ["u2"]},
        ),
        group_members_max_users=4,
        group_offline_buffer_max_users=1,
    )
    u1 = await stack.connect("u1")
    too_big = await u1.send_group("big", b"x")
    assert (too_big.status, too_big.reason) == (FAILED, "group too large")
    not_member = await u1.send_group("solo", b"x")
    assert (not_member.status, not_member.reason) == (FAILED, "not a group member")
    unknown = await u1.send_group("unknown-group", b"x")
    assert (unknown.status, unknown.reason) == (FAILED, "group unknown")
    # Offline members beyond GROUP_OFFLINE_BUFFER_MAX_USERS are skipped: partial delivery.
    partial = await u1.send_group("g1", b"x")
    assert partial.status == SENT
    assert (partial.offline_buffered_users, partial.offline_skipped_users) == (1, 1)
    assert partial.partial_delivery is True


async def test_per_sender_order_is_kept_with_hooks_in_flight(stack: Stack) -> None:
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    ids = [f"o-{i}" for i in range(50)]
    acks = await asyncio.gather(*(alice.send_single("u2", b"n", msg_id=i) for i in ids))
    assert all(a.status == SENT for a in acks)
    received = [(await bob.next_delivery(timeout=5)).msg_id for _ in ids]
    assert received == ids


async def test_tenants_are_isolated(make_stack: StackFactory) -> None:
    other = tenant_config(
        secret="secret-t2",
        users={u: UserConfig(tokens=[f"t2-{u}-token"]) for u in ("u1", "u2")},
        groups={},
    )
    stack = await make_stack(extra_tenants={"t2": other})
    t1_bob = await stack.connect("u2")
    t2_alice = stack.client("u1", tenant="t2", token="t2-u1-token")
    await t2_alice.connect()
    t2_bob = stack.client("u2", "d9", tenant="t2", token="t2-u2-token")
    await t2_bob.connect()
    ack = await t2_alice.send_single("u2", b"t2 only")
    assert ack.status == SENT
    got = await t2_bob.next_delivery(timeout=5)
    assert got.tenant_id == "t2"
    # t1's u2 shares the user id but not the tenant: it must see nothing.
    await (await stack.connect("u1")).send_single("u2", b"t1 marker")
    assert (await t1_bob.next_delivery(timeout=5)).msg_body == b"t1 marker"
    # A t2 token does not open a t1 session.
    stack.backend.state.directory.add_user("t2", "zed", ["zed-token"])
    with pytest.raises(ConnectRejected):
        await stack.client("zed", tenant=TENANT, token="zed-token").connect()
