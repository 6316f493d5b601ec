"""Offline drain end to end: hook pull, receipts, confirmed commit, OfflineSync.

protocol.md 4.5 and 9.2-9.4, offline-design.md section 8. A real gateway pulls from
``ScriptedBackend``'s in-memory offline store over signed HTTP and pushes to real
WebSocket clients (the SDK, or a plain WebSocket where the exact frame order matters).
Nothing waits on a fixed sleep: every wait is for a condition, with a deadline that
only bounds a failing test.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from mics.client import MicsClient
from mics.hooks.client import HookOp
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.scripted_backend import (
    ACK_OFFLINE,
    GET_OFFLINE,
    TENANT,
    ScriptedBackend,
    ScriptedStack,
    offline_message,
    wait_until,
)

SENT = msg_pb.SENT
NODE = "node-scripted"

StackFactory = Callable[..., Awaitable[ScriptedStack]]


@pytest.fixture
async def scripted_stack() -> AsyncIterator[StackFactory]:
    """Factory: ``await scripted_stack(backend=None, **gateway_settings)``."""
    stacks: list[ScriptedStack] = []

    async def factory(backend: ScriptedBackend | None = None, **overrides: Any) -> ScriptedStack:
        stack = await ScriptedStack.start(backend, **overrides)
        stacks.append(stack)
        return stack

    yield factory
    for stack in stacks:
        await stack.stop()


def pull_backend(**runtime: Any) -> ScriptedBackend:
    """A tenant whose offline mode pulls from its hook (notify_pull)."""
    return ScriptedBackend(runtime={"offline_mode": "notify_pull", **runtime})


# -- helpers -------------------------------------------------------------------------------


async def collect(client: MicsClient, count: int) -> list[msg_pb.MessageRequest]:
    return [await client.next_delivery(timeout=10) for _ in range(count)]


def sync_of(sync: msg_pb.OfflineSync) -> tuple[int, bool, str]:
    return sync.delivered, sync.complete, sync.reason


async def send_receipt(client: MicsClient, msg_ids: list[str], cursor: str = "") -> None:
    receipt = msg_pb.DeliveryAck(msg_ids=msg_ids, offline_cursor=cursor)
    await client.send_raw(msg_pb.ClientFrame(delivery_ack=receipt).SerializeToString())


async def roundtrip(client: MicsClient) -> None:
    """A heartbeat round trip: the gateway has read every frame the client sent before."""
    before = client.stats.pongs
    ping = msg_pb.ClientFrame(heartbeat_ping=msg_pb.HeartbeatPing(timestamp_ms=1))
    await client.send_raw(ping.SerializeToString())
    await wait_until(lambda: client.stats.pongs > before)


async def settled(stack: ScriptedStack) -> None:
    """Every drain and every commit the gateway started has finished (gray box: the
    drainer's task set is the only place that knows about a commit still in flight)."""
    drainer = stack.gateway.gateway.drainer
    await wait_until(lambda: not drainer._tasks)


async def send_marker(sender: MicsClient, user: str) -> None:
    """A live message to ``user``: whatever was queued for it before arrives before it."""
    ack = await sender.send_single(user, b"marker", msg_id=f"marker-{user}")
    assert (ack.status, ack.reason) == (SENT, "")


async def next_frames(
    ws: aiohttp.ClientWebSocketResponse,
    until: Callable[[list[msg_pb.ServerFrame]], bool],
) -> list[msg_pb.ServerFrame]:
    """Read server frames from a plain WebSocket until ``until(frames)`` holds."""
    frames: list[msg_pb.ServerFrame] = []
    async with asyncio.timeout(10):
        while not until(frames):
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.BINARY, msg
            frames.append(msg_pb.ServerFrame.FromString(msg.data))
    return frames


def deliveries_in(frames: list[msg_pb.ServerFrame]) -> list[str]:
    return [f.delivery.message.msg_id for f in frames if f.WhichOneof("payload") == "delivery"]


def drain_failed(stack: ScriptedStack, reason: str = "hook_fail") -> float:
    return stack.metric("mics_offline_drain_failed_total", {"tenant": TENANT, "reason": reason})


# -- the connect drain ---------------------------------------------------------------------


async def test_backlog_is_delivered_in_order_then_synced_and_committed(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 250)
    stack = await scripted_stack(backend)
    bob = stack.client("u2")
    assert (await bob.connect()).protocol_version == "1.1"

    got = await collect(bob, 250)
    assert [m.msg_id for m in got] == ids
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (250, True, "")
    last = backend.offline.cursor_of("u2", ids[-1])
    assert bob.last_offline_cursor == last

    # The SDK's receipts confirm the pages; the last cursor is committed.
    await wait_until(lambda: backend.ack_cursors[-1:] == [last])
    assert backend.offline.undelivered("u2") == []
    cursors = [int(c) for c in backend.ack_cursors]
    assert cursors == sorted(set(cursors))
    assert all(a.user_id == "u2" and a.device_id == "d1" for a in backend.acks)

    gets = backend.gets
    assert [g.cursor for g in gets] == [
        "",
        backend.offline.cursor_of("u2", ids[99]),
        backend.offline.cursor_of("u2", ids[199]),
    ]
    assert all(g.ack_follows and g.max_messages == 100 for g in gets)
    assert all((g.user_id, g.device_id) == ("u2", "d1") for g in gets)
    offline_requests = [r for r in backend.requests if r.path in (GET_OFFLINE, ACK_OFFLINE)]
    assert all(r.signed_ok for r in offline_requests)
    assert (
        stack.metric("mics_offline_drained_from_hook_total", {"tenant": TENANT, "node": NODE})
        == 250
    )
    assert (
        stack.metric("mics_offline_drain_requests_total", {"tenant": TENANT, "trigger": "connect"})
        == 1
    )


async def test_nothing_is_committed_before_the_client_confirms(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 250)
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2", send_receipts=False)
    assert [m.msg_id for m in await collect(bob, 250)] == ids
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (250, True, "")
    await settled(stack)
    assert backend.acks == []
    assert backend.offline.undelivered("u2") == ids

    # Page 2 confirmed, page 1 not: nothing may be committed yet.
    await send_receipt(bob, ids[100:200])
    await roundtrip(bob)
    await settled(stack)
    assert backend.acks == []

    # Page 1 confirmed too: pages 1..2 are committed (only the latest cursor is needed).
    await send_receipt(bob, ids[:100])
    await wait_until(lambda: len(backend.acks) == 1)
    assert backend.ack_cursors == [backend.offline.cursor_of("u2", ids[199])]
    assert backend.offline.undelivered("u2") == ids[200:]

    # A cursor alone confirms every offline delivery up to the one carrying it.
    await send_receipt(bob, [], cursor=bob.last_offline_cursor)
    await wait_until(lambda: len(backend.acks) == 2)
    assert backend.ack_cursors[-1] == backend.offline.cursor_of("u2", ids[-1])
    assert backend.offline.undelivered("u2") == []
    assert stack.metric("mics_offline_commits_total", {"tenant": TENANT, "result": "ok"}) == 2


async def test_v1_client_pages_are_committed_once_written_and_get_no_sync(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 250)
    stack = await scripted_stack(backend)
    alice = await stack.connect("u1")
    bob = stack.client("u2", protocol_version=None)
    assert (await bob.connect()).protocol_version == ""

    assert [m.msg_id for m in await collect(bob, 250)] == ids
    last = backend.offline.cursor_of("u2", ids[-1])
    await wait_until(lambda: backend.ack_cursors[-1:] == [last])
    assert backend.offline.undelivered("u2") == []
    cursors = [int(c) for c in backend.ack_cursors]
    assert cursors == sorted(set(cursors))
    assert all(g.ack_follows for g in backend.gets)

    # No OfflineSync and no offline_cursor for a v1 connection: the next frame is live.
    await send_marker(alice, "u2")
    assert (await bob.next_delivery(timeout=5)).msg_id == "marker-u2"
    assert bob.stats.offline_syncs == 0
    assert bob.last_offline_cursor == ""
    assert bob.stats.receipt_frames == 0


async def test_v11_backlog_over_the_limit_continues_after_confirmation(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 1500)
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")

    assert [m.msg_id for m in await collect(bob, 1000)] == ids[:1000]
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (1000, False, "limit reached")
    # The SDK confirms; the gateway continues on its own with the rest.
    assert [m.msg_id for m in await collect(bob, 500)] == ids[1000:]
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (500, True, "")
    last = backend.offline.cursor_of("u2", ids[-1])
    await wait_until(lambda: backend.ack_cursors[-1:] == [last])
    assert backend.offline.undelivered("u2") == []
    assert len(backend.gets_of("u2")) == 15
    assert backend.gets_of("u2")[10].cursor == backend.offline.cursor_of("u2", ids[999])
    # A limit is not a failure.
    assert drain_failed(stack) == 0


async def test_v1_client_backlog_over_the_limit_stops_at_1000(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 1500)
    stack = await scripted_stack(backend)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2", protocol_version=None)

    assert [m.msg_id for m in await collect(bob, 1000)] == ids[:1000]
    page10 = backend.offline.cursor_of("u2", ids[999])
    await wait_until(lambda: backend.ack_cursors[-1:] == [page10])
    await settled(stack)
    assert len(backend.gets_of("u2")) == 10
    assert backend.offline.undelivered("u2") == ids[1000:]
    await send_marker(alice, "u2")
    assert (await bob.next_delivery(timeout=5)).msg_id == "marker-u2"
    assert bob.stats.offline_syncs == 0

    # The rest comes with the next connection.
    await bob.close()
    again = await stack.connect("u2", protocol_version=None)
    assert [m.msg_id for m in await collect(again, 500)] == ids[1000:]
    await wait_until(lambda: backend.offline.undelivered("u2") == [])


@pytest.mark.parametrize("v11", [True, False], ids=["v1.1", "v1"])
async def test_live_messages_during_the_drain_come_after_backlog_and_sync(
    scripted_stack: StackFactory, v11: bool
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 150, sender="u3")
    second_page = asyncio.Event()

    async def hold_second_page(request: hook_pb.GetOfflineMessagesRequest, _: int) -> None:
        if request.user_id == "u2" and request.cursor:
            await second_page.wait()

    backend.on_get = hold_second_page
    stack = await scripted_stack(backend, hook_timeout_ms=10_000)
    alice = await stack.connect("u1")
    ws = await stack.raw_ws("u2", protocol_version="1.1" if v11 else "")
    await wait_until(lambda: len(backend.gets_of("u2")) == 2 and backend.in_progress[GET_OFFLINE])

    live = ["live-1", "live-2", "live-3"]
    for msg_id in live:
        ack = await alice.send_single("u2", msg_id.encode(), msg_id=msg_id)
        assert (ack.status, ack.reason) == (SENT, "")
    second_page.set()

    frames = await next_frames(ws, lambda fs: "live-3" in deliveries_in(fs))
    kinds = [f.WhichOneof("payload") for f in frames]
    assert deliveries_in(frames) == ids + live
    if v11:
        assert kinds == ["delivery"] * 150 + ["offline_sync"] + ["delivery"] * 3
        assert sync_of(frames[150].offline_sync) == (150, True, "")
    else:
        assert kinds == ["delivery"] * 153
    await ws.close()


@pytest.mark.parametrize(
    ("runtime", "pulls"),
    [
        ({"offline_mode": "notify_pull"}, True),
        ({"offline_mode": "dual"}, True),
        ({"offline_mode": "legacy"}, False),
        ({"offline_mode": "", "offline_use_hook_pull": True}, True),
        ({"offline_mode": "", "offline_use_hook_pull": False}, False),
        ({"offline_mode": "legacy", "offline_use_hook_pull": True}, False),
    ],
)
async def test_offline_mode_decides_whether_the_connect_drain_pulls(
    scripted_stack: StackFactory, runtime: dict[str, Any], pulls: bool
) -> None:
    backend = ScriptedBackend(runtime=runtime)
    ids = backend.offline.add_many("u2", 2)
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")
    if pulls:
        assert [m.msg_id for m in await collect(bob, 2)] == ids
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (2 if pulls else 0, True, "")
    assert backend.calls[GET_OFFLINE] == (1 if pulls else 0)


# -- hook failures -------------------------------------------------------------------------


async def test_transient_page_failures_are_retried(scripted_stack: StackFactory) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 150)

    def fail_next_two(_: hook_pb.GetOfflineMessagesRequest, number: int) -> None:
        if number == 1:  # the first page answers; the second fails twice, then answers
            backend.script(GET_OFFLINE, "fail_n_times:2")

    backend.on_get = fail_next_two
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")
    assert [m.msg_id for m in await collect(bob, 150)] == ids
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (150, True, "")
    page1 = backend.offline.cursor_of("u2", ids[99])
    assert [g.cursor for g in backend.gets] == ["", page1, page1, page1]
    assert stack.hook_metric("GetOfflineMessages", "http_5xx") == 2
    assert drain_failed(stack) == 0


@pytest.mark.parametrize(
    ("behaviour", "reason", "result", "calls"),
    [
        ("status:500", "hook unavailable", "http_5xx", 3),
        ("garbage", "hook unavailable", "decode_error", 3),
        ("hang", "hook unavailable", "timeout", 3),
        ("fail:store offline", "hook failed", "ok", 1),
    ],
)
async def test_persistent_pull_failure_ends_the_drain_not_the_connection(
    scripted_stack: StackFactory, behaviour: str, reason: str, result: str, calls: int
) -> None:
    backend = pull_backend()
    backend.offline.add_many("u2", 5)
    backend.script(GET_OFFLINE, behaviour)
    stack = await scripted_stack(backend, hook_timeout_ms=300)
    bob = await stack.connect("u2")
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (0, False, reason)
    assert backend.calls[GET_OFFLINE] == calls
    assert stack.hook_metric("GetOfflineMessages", result) == calls
    assert drain_failed(stack) == 1
    assert backend.acks == []
    alice = await stack.connect("u1", protocol_version=None)
    # The connection stays open and usable.
    ack = await alice.send_single("u2", b"still here", msg_id="after-failure")
    assert (ack.status, ack.reason) == (SENT, "")
    assert (await bob.next_delivery(timeout=5)).msg_id == "after-failure"
    assert bob.is_open


async def test_failure_after_the_first_page_reports_what_was_delivered(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 150)

    def break_after_first(_: hook_pb.GetOfflineMessagesRequest, number: int) -> None:
        if number == 1:
            backend.script(GET_OFFLINE, "status:503")

    backend.on_get = break_after_first
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")
    assert [m.msg_id for m in await collect(bob, 100)] == ids[:100]
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (100, False, "hook unavailable")
    # The delivered page is still committed once confirmed.
    await wait_until(lambda: backend.ack_cursors == [backend.offline.cursor_of("u2", ids[99])])
    assert backend.offline.undelivered("u2") == ids[100:]


async def test_sign_required_without_tenant_secret_is_hook_failed(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend(hook_sign_required=True)
    backend.tenant_secret = ""
    backend.offline.add_many("u2", 3)
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (0, False, "hook failed")
    assert backend.calls[GET_OFFLINE] == 0
    assert drain_failed(stack) == 1


# -- what the pull returns -----------------------------------------------------------------


async def test_pulled_messages_for_someone_else_are_refused_and_the_page_committed(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    store = backend.offline
    store.add("u2", offline_message("u1", "u2", "good-1"))
    store.inject_wrong_tenant("u2", "bad-tenant")
    store.add("u2", offline_message("u3", "u2", "good-2"))
    # A group message without a group id.
    store.add(
        "u2",
        msg_pb.MessageRequest(
            tenant_id=TENANT, msg_type=msg_pb.GROUP_CHAT, user_id="u3", msg_id="no-group"
        ),
    )
    last = store.inject_wrong_recipient("u2", "bad-recipient")
    stack = await scripted_stack(backend)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")

    assert [m.msg_id for m in await collect(bob, 2)] == ["good-1", "good-2"]
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (2, True, "")
    # The cursor rides on the page's last pushed delivery, and commits the whole page.
    assert bob.last_offline_cursor == str(last)
    await wait_until(lambda: backend.ack_cursors == [str(last)])
    assert store.undelivered("u2") == []
    assert stack.metric("mics_offline_pull_invalid_total", {"tenant": TENANT}) == 3
    await send_marker(alice, "u2")
    assert (await bob.next_delivery(timeout=5)).msg_id == "marker-u2"


async def test_group_messages_from_the_pull_are_delivered_as_returned(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    group = offline_message("u3", "u2", "grp-1", b"to the group", group_id="g")
    single = offline_message("u1", "u2", "one-1", b"just you")
    backend.offline.add("u2", group)
    backend.offline.add("u2", single)
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")
    got = await collect(bob, 2)
    assert got == [group, single]
    assert (got[0].msg_type, got[0].group_id, got[0].to_user_id) == (msg_pb.GROUP_CHAT, "g", "")
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (2, True, "")


async def test_blank_cursor_with_has_more_stops_with_invalid_cursor(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 3)
    backend.script(GET_OFFLINE, "blank_cursor")
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")
    assert [m.msg_id for m in await collect(bob, 3)] == ids
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (3, False, "invalid cursor")
    assert backend.calls[GET_OFFLINE] == 1
    assert bob.last_offline_cursor == ""
    # Confirmed, but a page without a cursor is not committed: it returns next time.
    await wait_until(lambda: bob.stats.receipt_ids == 3)
    await roundtrip(bob)
    await settled(stack)
    assert backend.acks == []
    assert backend.offline.undelivered("u2") == ids


async def test_buffered_and_pulled_message_is_pushed_once(scripted_stack: StackFactory) -> None:
    backend = pull_backend()
    stack = await scripted_stack(backend)  # no event bus: offline messages are buffered
    alice = await stack.connect("u1")
    for msg_id in ("both-1", "buffer-only"):
        ack = await alice.send_single("u2", msg_id.encode(), msg_id=msg_id)
        assert (ack.status, ack.reason) == (SENT, "offline_buffered")
    # The business side also holds both-1 (e.g. the broker confirmed it late).
    backend.offline.add("u2", offline_message("u1", "u2", "both-1", b"both-1"))
    backend.offline.add("u2", offline_message("u1", "u2", "pull-only", b"pull-only"))

    bob = await stack.connect("u2", dedup_capacity=0)  # SDK dedup off: a duplicate shows
    got = [m.msg_id for m in await collect(bob, 3)]
    assert got == ["both-1", "pull-only", "buffer-only"]
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (3, True, "")
    await send_marker(alice, "u2")
    assert (await bob.next_delivery(timeout=5)).msg_id == "marker-u2"
    assert bob.stats.deliveries == 4


# -- commits -------------------------------------------------------------------------------


async def test_ack_404_marks_a_v1_backend_that_gets_ack_follows_false(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    backend.script(ACK_OFFLINE, "status:404")
    backend.offline.add_many("u2", 3)
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")
    await collect(bob, 3)
    await wait_until(lambda: len(backend.acks) == 1)
    assert backend.gets[0].ack_follows is True
    await wait_until(
        lambda: (
            stack.metric("mics_offline_commits_total", {"tenant": TENANT, "result": "v1_backend"})
            == 1
        )
    )
    # 404 answers a question; it is not a sick backend.
    hooks = stack.gateway.gateway.hooks
    assert hooks.breaker_state(TENANT, HookOp.ACK_OFFLINE_MESSAGES) == "closed"

    # Later pulls, on this connection and on others, say no commit follows, and none does.
    late = backend.offline.add_many("u2", 2, prefix="late")
    assert (await stack.nudge("u2")).response.connections == 1
    assert [m.msg_id for m in await collect(bob, 2)] == late
    assert backend.gets_of("u2")[-1].ack_follows is False
    backend.offline.add_many("u3", 2, prefix="carol")
    carol = await stack.connect("u3")
    await collect(carol, 2)
    assert backend.gets_of("u3")[-1].ack_follows is False
    await wait_until(lambda: bob.stats.receipt_ids == 5 and carol.stats.receipt_ids == 2)
    await roundtrip(bob)
    await roundtrip(carol)
    await settled(stack)
    assert len(backend.acks) == 1
    # Without ack_follows the (v1) backend marked on fetch.
    assert backend.offline.undelivered("u3") == []


async def test_failed_commit_means_the_messages_come_again(scripted_stack: StackFactory) -> None:
    backend = pull_backend()
    backend.script(ACK_OFFLINE, "status:500")
    ids = backend.offline.add_many("u2", 3)
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")
    await collect(bob, 3)
    await wait_until(
        lambda: (
            stack.metric("mics_offline_commits_total", {"tenant": TENANT, "result": "fail"}) == 1
        )
    )
    assert len(backend.acks) == 1  # not retried
    await bob.close()

    backend.script(ACK_OFFLINE, "ok")
    again = await stack.connect("u2", device="d1")
    assert [m.msg_id for m in await collect(again, 3)] == ids  # duplicates, never loss
    await wait_until(lambda: backend.offline.undelivered("u2") == [])


async def test_disconnect_mid_drain_redelivers_only_the_unconfirmed_rest(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 250)
    stack = await scripted_stack(backend)
    ws = await stack.raw_ws("u2", device="d1", protocol_version="1.1")

    page1 = await next_frames(ws, lambda fs: len(fs) == 100)
    assert deliveries_in(page1) == ids[:100]
    cursor = page1[-1].delivery.offline_cursor
    assert cursor == backend.offline.cursor_of("u2", ids[99])
    receipt = msg_pb.DeliveryAck(msg_ids=ids[:100], offline_cursor=cursor)
    await ws.send_bytes(msg_pb.ClientFrame(delivery_ack=receipt).SerializeToString())
    await wait_until(lambda: backend.ack_cursors == [cursor])

    # Part of page 2 arrives, then the connection drops before any receipt for it.
    partial = await next_frames(ws, lambda fs: len(fs) == 50)
    assert deliveries_in(partial) == ids[100:150]
    await ws.close()
    await wait_until(lambda: stack.metric("mics_ws_connections", {"node": NODE}) == 0)
    await settled(stack)
    assert backend.ack_cursors == [cursor]

    bob = await stack.connect("u2", device="d1")
    rest = [m.msg_id for m in await collect(bob, 150)]
    assert rest == ids[100:]  # unconfirmed ones again, confirmed ones never
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (150, True, "")
    await wait_until(lambda: backend.offline.undelivered("u2") == [])
    # Each connection pulls from the start; the backend knows what was committed.
    reconnect_gets = [g for g in backend.gets if g.meta.trace_id == bob.connect_ack.trace_id]
    assert reconnect_gets[0].cursor == ""


async def test_disconnect_during_a_pull_is_not_counted_as_a_drain_failure(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    backend.offline.add_many("u2", 150)
    backend.hold(GET_OFFLINE)
    stack = await scripted_stack(backend, hook_timeout_ms=10_000)
    ws = await stack.raw_ws("u2", protocol_version="1.1")
    await wait_until(lambda: backend.in_progress[GET_OFFLINE] == 1)
    await ws.close()
    await wait_until(lambda: stack.metric("mics_ws_connections", {"node": NODE}) == 0)
    backend.release(GET_OFFLINE)
    await wait_until(
        lambda: backend.calls[GET_OFFLINE] == 1 and not backend.in_progress[GET_OFFLINE]
    )
    await settled(stack)
    assert backend.calls[GET_OFFLINE] == 1
    # The client left; no hook failed.
    assert drain_failed(stack) == 0
    assert drain_failed(stack, "exception") == 0


async def test_v1_client_that_left_during_a_pull_loses_nothing(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 30)
    backend.hold(GET_OFFLINE)
    stack = await scripted_stack(backend, hook_timeout_ms=10_000)
    ws = await stack.raw_ws("u2", device="d1")  # a v1 connection: commit once written
    await wait_until(lambda: backend.in_progress[GET_OFFLINE] == 1)
    await ws.close()
    await wait_until(lambda: stack.metric("mics_ws_connections", {"node": NODE}) == 0)
    backend.release(GET_OFFLINE)
    await wait_until(lambda: not backend.in_progress[GET_OFFLINE])
    await settled(stack)
    # The page was never written to the gone connection: it must not be committed.
    assert backend.acks == []
    assert backend.offline.undelivered("u2") == ids

    bob = await stack.connect("u2", device="d1", protocol_version=None)
    assert [m.msg_id for m in await collect(bob, 30)] == ids
