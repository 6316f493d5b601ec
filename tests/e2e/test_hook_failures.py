"""Hook failures end to end: results, breaker, limiter and fail-open/closed (protocol.md 4).

A real gateway talks to ``ScriptedBackend`` over real HTTP; each test scripts how the
tenant's hooks misbehave and checks what clients see (acks, close codes, deliveries)
and what the gateway counts. Nothing waits on a fixed sleep: every wait polls a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from mics.client import ConnectRejected, MicsClient
from mics.hooks.client import HookOp
from mics.protocol import codec
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.scripted_backend import (
    AUTH,
    CHECK,
    MEMBERS,
    TENANT,
    ScriptedBackend,
    ScriptedStack,
    wait_until,
)

SENT = msg_pb.SENT
FAILED = msg_pb.FAILED

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


def checks(stack: ScriptedStack, result: str) -> float:
    return stack.metric("mics_hook_check_message_total", {"tenant": TENANT, "result": result})


def members_results(stack: ScriptedStack, result: str) -> float:
    return stack.metric("mics_hook_get_group_members_total", {"tenant": TENANT, "result": result})


async def assert_next_is_marker(
    sender: MicsClient, recipients: list[MicsClient], backend: ScriptedBackend
) -> None:
    """Nothing is queued for ``recipients`` before a fresh marker message from ``sender``.

    One sender's messages reach each recipient in order (section 9.9), so any delivery
    of an earlier message would arrive before the marker.
    """
    backend.script(CHECK, "ok")
    for recipient in recipients:
        user = recipient.options.token.removesuffix("-token")
        ack = await sender.send_single(user, b"marker")
        assert ack.status == SENT
        got = await recipient.next_delivery(timeout=5)
        assert (got.msg_id, got.msg_body) == (ack.msg_id, b"marker")


# -- /check-message ------------------------------------------------------------------------


async def test_check_message_timeout_fails_open_and_delivers(scripted_stack: StackFactory) -> None:
    stack = await scripted_stack(hook_timeout_ms=150)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    stack.backend.script(CHECK, "hang")
    ack = await alice.send_single("u2", b"slow check", msg_id="timeout-1")
    assert (ack.status, ack.reason) == (SENT, "")
    got = await bob.next_delivery(timeout=5)
    assert (got.msg_id, got.msg_body, got.user_id) == ("timeout-1", b"slow check", "u1")
    assert stack.backend.calls[CHECK] == 1
    assert stack.hook_metric("CheckMessage", "timeout") == 1
    assert stack.hook_metric("CheckMessage", "ok") == 0
    assert checks(stack, "degraded") == 1
    assert checks(stack, "allow") == 0


@pytest.mark.parametrize(
    ("behaviour", "result"),
    [("status:500", "http_5xx"), ("status:404", "http_4xx"), ("garbage", "decode_error")],
)
async def test_check_message_failure_fails_open_by_default(
    scripted_stack: StackFactory, behaviour: str, result: str
) -> None:
    stack = await scripted_stack()
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    stack.backend.script(CHECK, behaviour)
    ack = await alice.send_single("u2", b"allowed anyway", msg_id="open-1")
    assert (ack.status, ack.reason) == (SENT, "")
    assert (await bob.next_delivery(timeout=5)).msg_id == "open-1"
    assert stack.hook_metric("CheckMessage", result) == 1
    assert checks(stack, "degraded") == 1


@pytest.mark.parametrize("behaviour", ["status:500", "hang", "garbage"])
async def test_check_message_failure_with_fail_closed_tenant(
    scripted_stack: StackFactory, behaviour: str
) -> None:
    backend = ScriptedBackend(runtime={"check_message_fail_closed": True})
    stack = await scripted_stack(backend, hook_timeout_ms=150)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    backend.script(CHECK, behaviour)
    ack = await alice.send_single("u2", b"must not pass", msg_id="closed-1")
    assert (ack.status, ack.reason) == (FAILED, "hook unavailable")
    assert checks(stack, "degraded") == 1
    assert (
        stack.metric(
            "mics_messages_rejected_total", {"tenant": TENANT, "reason": "hook unavailable"}
        )
        == 1
    )
    await assert_next_is_marker(alice, [bob], backend)
    # A refused message does not consume its id (section 9.9): the retry goes through.
    retry = await alice.send_single("u2", b"retry", msg_id="closed-1")
    assert (retry.status, retry.reason) == (SENT, "")
    assert (await bob.next_delivery(timeout=5)).msg_body == b"retry"


async def test_check_message_allow_false_with_fail_closed_tenant_is_not_degraded(
    scripted_stack: StackFactory,
) -> None:
    backend = ScriptedBackend(runtime={"check_message_fail_closed": True})
    stack = await scripted_stack(backend)
    alice = await stack.connect("u1")
    backend.script(CHECK, "deny:policy says no")
    ack = await alice.send_single("u2", b"x")
    assert (ack.status, ack.reason) == (FAILED, "policy says no")
    assert (checks(stack, "deny"), checks(stack, "degraded")) == (1, 0)


async def test_check_message_sign_required_without_tenant_secret(
    scripted_stack: StackFactory,
) -> None:
    backend = ScriptedBackend(tenant_secret="", runtime={"hook_sign_required": True})
    stack = await scripted_stack(backend)
    alice = await stack.connect("u1")
    ack = await alice.send_single("u2", b"x")
    assert (ack.status, ack.reason) == (FAILED, "hook sign required")
    group = await alice.send_group("g", b"x")
    assert (group.status, group.reason) == (FAILED, "hook sign required")
    assert backend.calls[CHECK] == 0
    assert backend.calls[MEMBERS] == 0


# -- /get-group-members ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "result"),
    [
        ("status:500", "http_5xx"),
        ("status:404", "http_4xx"),
        ("hang", "timeout"),
        ("garbage", "decode_error"),
    ],
)
async def test_members_failure_fails_message_with_hook_degraded(
    scripted_stack: StackFactory, behaviour: str, result: str
) -> None:
    backend = ScriptedBackend(groups={"g": ["u1", "u2"]})
    stack = await scripted_stack(backend, hook_timeout_ms=150)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    backend.script(MEMBERS, behaviour)
    ack = await alice.send_group("g", b"to the group", msg_id="grp-1")
    assert (ack.status, ack.reason) == (FAILED, "hook degraded")
    assert ack.partial_delivery is False
    assert stack.hook_metric("GetGroupMembers", result) == 1
    assert members_results(stack, "degraded") == 1
    assert stack.metric("mics_group_members_total", {"tenant": TENANT}) == 0
    # Neither the sender's device nor the other member got anything.
    await assert_next_is_marker(bob, [alice], backend)
    await assert_next_is_marker(alice, [bob], backend)


async def test_members_with_duplicates_and_blanks_deliver_once_per_device(
    scripted_stack: StackFactory,
) -> None:
    members = ["u2", "", "u1", "u2", "  ", "u3", "u1", "u3", "u2", "\t"]
    backend = ScriptedBackend(groups={"g": members})
    stack = await scripted_stack(backend)
    # SDK delivery dedup off: a duplicate delivery must show up, not be hidden.
    alice = await stack.connect("u1", dedup_capacity=0)
    bob_a = await stack.connect("u2", "a", dedup_capacity=0)
    bob_b = await stack.connect("u2", "b", dedup_capacity=0)
    carol = await stack.connect("u3", dedup_capacity=0)
    devices = [alice, bob_a, bob_b, carol]

    ack = await alice.send_group("g", b"once each", msg_id="dup-members")
    assert (ack.status, ack.reason) == (SENT, "")
    assert (ack.offline_buffered_users, ack.offline_skipped_users) == (0, 0)
    assert stack.metric("mics_group_members_total", {"tenant": TENANT}) == 3
    assert stack.metric("mics_deliveries_total", {"tenant": TENANT, "via": "local"}) == 4

    marker = await alice.send_group("g", b"marker", msg_id="dup-marker")
    assert marker.status == SENT
    for device in devices:
        first = await device.next_delivery(timeout=5)
        second = await device.next_delivery(timeout=5)
        assert (first.msg_id, second.msg_id) == ("dup-members", "dup-marker")
        assert first.group_id == "g"
        assert first.msg_type == msg_pb.GROUP_CHAT
        assert device.stats.deliveries == 2
    assert stack.metric("mics_group_members_total", {"tenant": TENANT}) == 6
    assert backend.calls[MEMBERS] == 2


async def test_members_all_blank_is_group_members_empty(scripted_stack: StackFactory) -> None:
    backend = ScriptedBackend(groups={"g": ["", " ", ""]})
    stack = await scripted_stack(backend)
    alice = await stack.connect("u1")
    ack = await alice.send_group("g", b"x")
    assert (ack.status, ack.reason) == (FAILED, "group members empty")
    assert members_results(stack, "ok") == 1


@pytest.mark.parametrize("reason", ["no spam here", ""])
async def test_group_deny_fails_with_reason_and_cancels_members_call(
    scripted_stack: StackFactory, reason: str
) -> None:
    backend = ScriptedBackend(groups={"g": ["u1", "u2"]})
    # The members hook hangs and the gateway would wait 10 s for it: an ack well within
    # the client's 5 s ack timeout shows the deny did not wait for the members call.
    stack = await scripted_stack(backend, hook_timeout_ms=10_000)
    alice = await stack.connect("u1", ack_timeout_s=5)
    bob = await stack.connect("u2")
    backend.script(CHECK, "deny:" + reason)
    backend.script(MEMBERS, "hang")
    ack = await alice.send_group("g", b"denied", msg_id="deny-g")
    assert (ack.status, ack.reason) == (FAILED, reason)
    assert checks(stack, "deny") == 1
    await wait_until(lambda: stack.hook_metric("GetGroupMembers", "canceled") == 1)
    assert stack.hook_metric("GetGroupMembers", "timeout") == 0
    assert stack.metric("mics_group_members_total", {"tenant": TENANT}) == 0
    backend.script(MEMBERS, "ok")
    await assert_next_is_marker(alice, [bob], backend)
    # The canceled call left the members breaker alone and freed its slot.
    again = await alice.send_group("g", b"allowed now", msg_id="deny-g")
    assert (again.status, again.reason) == (SENT, "")
    assert (await bob.next_delivery(timeout=5)).msg_body == b"allowed now"


# -- /auth -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "result"),
    [
        ("status:500", "http_5xx"),
        ("status:404", "http_4xx"),
        ("hang", "timeout"),
        ("garbage", "decode_error"),
    ],
)
async def test_auth_hook_failure_closes_4001(
    scripted_stack: StackFactory, behaviour: str, result: str
) -> None:
    stack = await scripted_stack(hook_timeout_ms=150)
    stack.backend.script(AUTH, behaviour)
    with pytest.raises(ConnectRejected) as info:
        await stack.client("u1").connect()
    assert (info.value.code, info.value.reason) == (codec.CLOSE_AUTH_FAILED, "hook timeout/failure")
    assert stack.hook_metric("Auth", result) == 1
    assert stack.metric("mics_ws_connections", {"node": "node-scripted"}) == 0


async def test_auth_deny_closes_4001_with_hook_reason(scripted_stack: StackFactory) -> None:
    stack = await scripted_stack()
    stack.backend.script(AUTH, "deny:account suspended")
    with pytest.raises(ConnectRejected) as info:
        await stack.client("u1").connect()
    assert (info.value.code, info.value.reason) == (codec.CLOSE_AUTH_FAILED, "account suspended")
    # A business "no" is a successful hook call: the breaker does not count it.
    assert stack.hook_metric("Auth", "ok") == 1


async def test_auth_breaker_opens_and_closes_4001_circuit_open(
    scripted_stack: StackFactory,
) -> None:
    stack = await scripted_stack(hook_breaker_failure_threshold=2, hook_breaker_open_ms=60_000)
    stack.backend.script(AUTH, "status:500")
    reasons = []
    for _ in range(3):
        with pytest.raises(ConnectRejected) as info:
            await stack.client("u1").connect()
        assert info.value.code == codec.CLOSE_AUTH_FAILED
        reasons.append(info.value.reason)
    assert reasons == ["hook timeout/failure", "hook timeout/failure", "auth hook circuit open"]
    assert stack.backend.calls[AUTH] == 2
    assert stack.hook_metric("Auth", "circuit_open") == 1
    # Recovery of the backend does not help while the breaker is open.
    stack.backend.script(AUTH, "ok")
    with pytest.raises(ConnectRejected) as info:
        await stack.client("u1").connect()
    assert info.value.reason == "auth hook circuit open"
    assert stack.backend.calls[AUTH] == 2


async def test_auth_breaker_uses_policy_of_last_successful_auth(
    scripted_stack: StackFactory,
) -> None:
    # Node default threshold 5; the tenant's runtime config says 1.
    backend = ScriptedBackend(
        runtime={"hook_breaker_failure_threshold": 1, "hook_breaker_open_ms": 60_000}
    )
    stack = await scripted_stack(backend, hook_breaker_failure_threshold=5)
    await stack.connect("u1")
    backend.script(AUTH, "status:503")
    with pytest.raises(ConnectRejected) as first:
        await stack.client("u2").connect()
    assert first.value.reason == "hook timeout/failure"
    with pytest.raises(ConnectRejected) as second:
        await stack.client("u2").connect()
    assert second.value.reason == "auth hook circuit open"
    assert backend.calls[AUTH] == 2


# -- breaker on /check-message -------------------------------------------------------------


async def test_check_message_breaker_opens_probes_and_closes(scripted_stack: StackFactory) -> None:
    # Open time long enough that the third send surely falls inside it, short enough to
    # keep the test quick.
    open_ms = 800
    backend = ScriptedBackend(
        runtime={"hook_breaker_failure_threshold": 2, "hook_breaker_open_ms": open_ms}
    )
    stack = await scripted_stack(backend)
    hooks = stack.gateway.gateway.hooks
    alice = await stack.connect("u1")
    await stack.connect("u2")
    backend.script(CHECK, "status:500")

    for i in range(2):
        ack = await alice.send_single("u2", b"x", msg_id=f"fail-{i}")
        assert (ack.status, ack.reason) == (SENT, "")  # fails open
    assert backend.calls[CHECK] == 2
    assert hooks.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "open"

    # Open: short-circuited, the backend sees nothing; still fail-open.
    ack = await alice.send_single("u2", b"x", msg_id="short-1")
    assert ack.status == SENT
    assert backend.calls[CHECK] == 2
    assert stack.hook_metric("CheckMessage", "circuit_open") == 1
    assert checks(stack, "degraded") == 3

    async def send_until_calls(expected: int) -> None:
        n = 0
        while backend.calls[CHECK] < expected:
            n += 1
            assert (
                await alice.send_single("u2", b"p", msg_id=f"probe-{expected}-{n}")
            ).status == SENT
            if backend.calls[CHECK] < expected:
                await asyncio.sleep(0.05)
            assert n < 200, "no probe reached the backend"
        assert backend.calls[CHECK] == expected

    # After the open time exactly one probe goes through; it fails and reopens.
    await send_until_calls(3)
    assert hooks.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "open"
    ack = await alice.send_single("u2", b"x", msg_id="short-2")
    assert backend.calls[CHECK] == 3

    # The backend recovers: the next probe succeeds and closes the breaker.
    backend.script(CHECK, "ok")
    await send_until_calls(4)
    assert hooks.breaker_state(TENANT, HookOp.CHECK_MESSAGE) == "closed"
    short_circuited = stack.hook_metric("CheckMessage", "circuit_open")
    for i in range(3):
        assert (await alice.send_single("u2", b"x", msg_id=f"after-{i}")).status == SENT
    assert backend.calls[CHECK] == 7
    assert stack.hook_metric("CheckMessage", "circuit_open") == short_circuited
    assert stack.hook_metric("CheckMessage", "ok") == 4


async def test_half_open_breaker_lets_a_single_probe_through(scripted_stack: StackFactory) -> None:
    backend = ScriptedBackend(
        groups={"g": ["u1"]},
        runtime={"hook_breaker_failure_threshold": 1, "hook_breaker_open_ms": 200},
    )
    stack = await scripted_stack(backend, hook_timeout_ms=5000)
    hooks = stack.gateway.gateway.hooks
    alice = await stack.connect("u1")
    backend.script(MEMBERS, "status:500")
    assert (await alice.send_group("g", b"x")).reason == "hook degraded"
    assert backend.calls[MEMBERS] == 1
    await wait_until(lambda: hooks.breaker_state(TENANT, HookOp.GET_GROUP_MEMBERS) == "half_open")
    backend.script(MEMBERS, "hang")
    probe = asyncio.create_task(alice.send_group("g", b"probe", msg_id="probe"))
    await wait_until(lambda: backend.in_progress[MEMBERS] == 1)
    # While the probe is out, others are short-circuited.
    blocked = await alice.send_group("g", b"blocked", msg_id="blocked")
    assert (blocked.status, blocked.reason) == (FAILED, "hook circuit open")
    assert backend.calls[MEMBERS] == 2
    backend.release_hangs()  # the probe gets a 503: a failure, the breaker reopens
    assert (await probe).reason == "hook degraded"
    assert stack.hook_metric("GetGroupMembers", "http_5xx") == 2
    assert stack.hook_metric("GetGroupMembers", "circuit_open") == 1


# -- limiter -------------------------------------------------------------------------------


async def test_queue_rejection_when_the_only_slot_is_busy(scripted_stack: StackFactory) -> None:
    backend = ScriptedBackend(
        groups={"g": ["u1", "u2"]},
        runtime={"hook_max_concurrency": 1, "hook_queue_timeout_ms": 0},
    )
    stack = await scripted_stack(backend, hook_timeout_ms=10_000)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    backend.script(MEMBERS, "hang")
    first = asyncio.create_task(alice.send_group("g", b"first", msg_id="q-1"))
    await wait_until(lambda: backend.in_progress[MEMBERS] == 1)
    second = await alice.send_group("g", b"second", msg_id="q-2")
    assert (second.status, second.reason) == (FAILED, "hook queue rejected")
    assert not first.done()
    assert backend.calls[MEMBERS] == 1
    assert stack.hook_metric("GetGroupMembers", "queue_rejected") == 1
    assert (
        stack.metric(
            "mics_hook_limiter_rejected_total",
            {"tenant": TENANT, "op": "GetGroupMembers", "reason": "queue_timeout"},
        )
        == 1
    )
    # Queue rejections are not breaker failures.
    hooks = stack.gateway.gateway.hooks
    assert hooks.breaker_state(TENANT, HookOp.GET_GROUP_MEMBERS) == "closed"
    backend.release_hangs()
    assert (await first).reason == "hook degraded"
    # The slot is free again.
    backend.script(MEMBERS, "ok")
    third = await alice.send_group("g", b"third", msg_id="q-3")
    assert (third.status, third.reason) == (SENT, "")
    assert (await bob.next_delivery(timeout=5)).msg_id == "q-3"


# -- heartbeats are not stalled by slow hooks ----------------------------------------------


async def test_slow_check_does_not_delay_heartbeat_pong(scripted_stack: StackFactory) -> None:
    stack = await scripted_stack(hook_timeout_ms=1500)
    backend = stack.backend
    backend.script(CHECK, "hang")
    ws = await stack.raw_ws("u1")
    message = msg_pb.ClientFrame(
        message=msg_pb.MessageRequest(msg_id="slow-A", to_user_id="u2", msg_body=b"A")
    )
    await ws.send_bytes(message.SerializeToString())
    await wait_until(lambda: backend.in_progress[CHECK] == 1)
    ping = msg_pb.ClientFrame(heartbeat_ping=msg_pb.HeartbeatPing(timestamp_ms=1))
    await ws.send_bytes(ping.SerializeToString())

    kinds: list[str] = []
    ack: msg_pb.MessageAck | None = None
    while ack is None:
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.BINARY, msg
        frame = msg_pb.ServerFrame.FromString(msg.data)
        kind = frame.WhichOneof("payload")
        if kind == "offline_sync":
            continue
        kinds.append(kind or "")
        if kind == "heartbeat_pong":
            # Answered while A's check is still outstanding at the gateway.
            assert stack.hook_metric("CheckMessage", "timeout") == 0
        elif kind == "ack":
            ack = frame.ack
    assert kinds == ["heartbeat_pong", "ack"]
    assert (ack.msg_id, ack.status) == ("slow-A", SENT)  # fail open after the timeout
    assert stack.hook_metric("CheckMessage", "timeout") == 1
    await ws.close()


# -- signing -------------------------------------------------------------------------------


async def test_every_hook_request_is_validly_signed(scripted_stack: StackFactory) -> None:
    backend = ScriptedBackend(groups={"g": ["u1", "u2", "u2", ""]})
    stack = await scripted_stack(backend)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    assert (await alice.send_single("u2", b"one")).status == SENT
    assert (await bob.send_group("g", b"two")).status == SENT
    backend.script(CHECK, "deny:nope")
    assert (await alice.send_single("u2", b"three")).status == FAILED
    backend.script(AUTH, "deny:no")
    with pytest.raises(ConnectRejected):
        await stack.client("u3").connect()

    requests = backend.requests
    assert {r.path for r in requests} == {AUTH, CHECK, MEMBERS}
    assert len(requests) == sum(backend.calls.values()) == 7
    assert all(r.signed_ok for r in requests), [r.path for r in requests if not r.signed_ok]
    hex32 = re.compile(r"[0-9a-f]{32}")
    ids = [r.request.meta.request_id for r in requests]
    assert all(hex32.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert all(r.request.meta.tenant_id == TENANT for r in requests)
    # Hook metas carry the connection's trace id.
    assert alice.connect_ack is not None
    alice_checks = [r for r in requests if r.path == CHECK and r.request.message.user_id == "u1"]
    assert {r.request.meta.trace_id for r in alice_checks} == {alice.connect_ack.trace_id}


async def test_signature_recorder_detects_a_wrong_secret(scripted_stack: StackFactory) -> None:
    # The gateway signs /auth with a secret the backend does not share: the scripted
    # backend (which answers anyway) records the request as not validly signed.
    stack = await scripted_stack(tenant_hook_secrets={TENANT: "not-the-auth-secret"})
    alice = await stack.connect("u1")
    await alice.send_single("u2", b"x")
    assert [(r.path, r.signed_ok) for r in stack.backend.requests] == [
        (AUTH, False),
        (CHECK, True),
    ]
