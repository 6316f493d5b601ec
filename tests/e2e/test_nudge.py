"""The offline-available nudge end to end: POST /v1/offline-available (protocol.md 9.5).

``ScriptedBackend`` plays the business backend: it stores a message for an online user
and nudges a real gateway over HTTP, signed with the tenant secret; the gateway re-pulls
from the connection's latest cursor and the message reaches the real WebSocket client.
The error answers are checked for their exact status and body. Nothing waits on a fixed
sleep: every wait is for a condition, with a deadline that only bounds a failing test.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from mics.client import MicsClient
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.scripted_backend import (
    AUTH_SECRET,
    GARBAGE,
    GET_OFFLINE,
    TENANT,
    TENANT_SECRET,
    NudgeAnswer,
    ScriptedBackend,
    ScriptedStack,
    wait_until,
)

SENT = msg_pb.SENT

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


async def collect(client: MicsClient, count: int) -> list[str]:
    return [(await client.next_delivery(timeout=10)).msg_id for _ in range(count)]


def sync_of(sync: msg_pb.OfflineSync) -> tuple[int, bool, str]:
    return sync.delivered, sync.complete, sync.reason


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def settled(stack: ScriptedStack) -> None:
    """Every drain and every commit the gateway started has finished (gray box: the
    drainer's task set is the only place that knows about a commit still in flight)."""
    drainer = stack.gateway.gateway.drainer
    await wait_until(lambda: not drainer._tasks)


def assert_answer(
    answer: NudgeAnswer, status: int, ok: bool, reason: str, connections: int
) -> None:
    assert answer.status == status
    assert answer.content_type == "application/protobuf"
    response = answer.response  # the body always parses as OfflineAvailableResponse
    assert (response.ok, response.reason, response.connections) == (ok, reason, connections)


def nudge_requests(stack: ScriptedStack, tenant: str, result: str) -> float:
    return stack.metric("mics_offline_nudges_total", {"tenant": tenant, "result": result})


# -- a nudge re-pulls ------------------------------------------------------------------------


@pytest.mark.parametrize("v11", [True, False], ids=["v1.1", "v1"])
async def test_nudge_repulls_from_the_latest_cursor(
    scripted_stack: StackFactory, v11: bool
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 3)
    stack = await scripted_stack(backend)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2", protocol_version="1.1" if v11 else None)
    assert await collect(bob, 3) == ids
    if v11:
        assert sync_of(await bob.next_offline_sync(timeout=5)) == (3, True, "")
    latest = backend.offline.cursor_of("u2", ids[-1])
    await wait_until(lambda: backend.ack_cursors[-1:] == [latest])

    # Stored after the connect drain, while bob is online: the nudge brings it.
    backend.offline.add_many("u2", 1, prefix="late")
    assert_answer(await stack.nudge("u2"), 200, True, "", 1)
    assert await collect(bob, 1) == ["late-0"]
    if v11:
        assert sync_of(await bob.next_offline_sync(timeout=5)) == (1, True, "")
    repull = backend.gets_of("u2")[-1]
    assert (repull.cursor, repull.device_id, repull.ack_follows) == (latest, "d1", True)
    late = backend.offline.cursor_of("u2", "late-0")
    await wait_until(lambda: backend.ack_cursors[-1:] == [late])
    assert backend.offline.undelivered("u2") == []
    assert (
        stack.metric("mics_offline_drain_requests_total", {"tenant": TENANT, "trigger": "nudge"})
        == 1
    )
    assert nudge_requests(stack, TENANT, "ok") == 1
    # Nothing else follows: the next frame is live.
    assert (await alice.send_single("u2", b"marker", msg_id="marker")).status == SENT
    assert await collect(bob, 1) == ["marker"]
    assert bob.stats.offline_syncs == (2 if v11 else 0)


async def test_nudge_counts_each_local_connection_of_the_user(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    stack = await scripted_stack(backend)
    # No receipts: neither device commits, so both pulls find the message.
    phone = await stack.connect("u2", "phone", send_receipts=False)
    laptop = await stack.connect("u2", "laptop", send_receipts=False)
    other = await stack.connect("u3")
    for client in (phone, laptop, other):
        assert sync_of(await client.next_offline_sync(timeout=5)) == (0, True, "")

    backend.offline.add_many("u2", 1, prefix="late")
    assert_answer(await stack.nudge("u2"), 200, True, "", 2)
    for device in (phone, laptop):
        assert await collect(device, 1) == ["late-0"]
        assert sync_of(await device.next_offline_sync(timeout=5)) == (1, True, "")
    await settled(stack)
    assert {g.device_id for g in backend.gets_of("u2")[-2:]} == {"phone", "laptop"}
    assert len(backend.gets_of("u3")) == 1  # the other user was not re-pulled
    assert other.stats.offline_syncs == 1

    # A user without a connection on this node: accepted, nothing to pull.
    assert_answer(await stack.nudge("u9"), 200, True, "", 0)


async def test_nudges_during_a_drain_coalesce_into_one_more_drain(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 2)
    backend.hold(GET_OFFLINE)
    stack = await scripted_stack(backend, hook_timeout_ms=10_000)
    bob = await stack.connect("u2")
    await wait_until(lambda: backend.in_progress[GET_OFFLINE] == 1)

    # The connect drain's page is taken; then a message is stored and nudged, three times.
    late = backend.offline.add_many("u2", 3, prefix="late")
    for _ in range(3):
        assert_answer(await stack.nudge("u2"), 200, True, "", 1)
    backend.release(GET_OFFLINE)

    assert await collect(bob, 2) == ids
    assert sync_of(await bob.next_offline_sync(timeout=5)) == (2, True, "")
    assert await collect(bob, 3) == late
    assert sync_of(await bob.next_offline_sync(timeout=5)) == (3, True, "")
    await settled(stack)
    gets = backend.gets_of("u2")
    assert [g.cursor for g in gets] == ["", backend.offline.cursor_of("u2", ids[-1])]
    assert bob.stats.offline_syncs == 2
    await wait_until(lambda: backend.offline.undelivered("u2") == [])


async def test_live_messages_during_a_nudge_drain_wait_for_it(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    stack = await scripted_stack(backend, hook_timeout_ms=10_000)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2", protocol_version=None)
    await settled(stack)

    late = backend.offline.add_many("u2", 2, prefix="late")
    backend.hold(GET_OFFLINE)
    assert_answer(await stack.nudge("u2"), 200, True, "", 1)
    await wait_until(lambda: backend.in_progress[GET_OFFLINE] == 1)
    ack = await alice.send_single("u2", b"live", msg_id="live")
    assert (ack.status, ack.reason) == (SENT, "")
    backend.release(GET_OFFLINE)
    assert await collect(bob, 3) == [*late, "live"]


async def test_nudge_for_a_legacy_tenant_counts_no_connection(
    scripted_stack: StackFactory,
) -> None:
    backend = ScriptedBackend(runtime={"offline_mode": "legacy"})
    backend.offline.add_many("u2", 2)
    stack = await scripted_stack(backend)
    bob = await stack.connect("u2")
    assert sync_of(await bob.next_offline_sync(timeout=5)) == (0, True, "")
    assert_answer(await stack.nudge("u2"), 200, True, "", 0)
    await settled(stack)
    assert backend.calls[GET_OFFLINE] == 0
    assert bob.stats.offline_syncs == 1


async def test_nudge_after_a_limited_drain_is_not_held_back_by_missing_receipts(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    ids = backend.offline.add_many("u2", 1001)
    stack = await scripted_stack(backend)
    # Receipts are optional (protocol.md 9.2): this v1.1 client sends none.
    bob = await stack.connect("u2", send_receipts=False)
    assert await collect(bob, 1000) == ids[:1000]
    assert sync_of(await bob.next_offline_sync(timeout=10)) == (1000, False, "limit reached")

    backend.offline.add_many("u2", 1, prefix="late")
    assert_answer(await stack.nudge("u2"), 200, True, "", 1)
    # The connection pulls again within seconds: the rest of the backlog and the new one.
    got = [(await bob.next_delivery(timeout=5)).msg_id for _ in range(2)]
    assert got == [ids[1000], "late-0"]
    assert sync_of(await bob.next_offline_sync(timeout=5)) == (2, True, "")


# -- signatures and secrets ----------------------------------------------------------------


async def test_nudge_accepts_the_configured_secret_and_the_latest_auth_secret(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    stack = await scripted_stack(backend)
    # Before any /auth the gateway knows only its TENANT_HOOK_SECRETS entry.
    assert_answer(await stack.nudge("u2", secret=AUTH_SECRET), 200, True, "", 0)
    assert_answer(await stack.nudge("u2", secret=TENANT_SECRET), 401, False, "invalid sign", 0)
    await stack.connect("u2")
    assert_answer(await stack.nudge("u2", secret=TENANT_SECRET), 200, True, "", 1)
    assert_answer(await stack.nudge("u2", secret=AUTH_SECRET), 200, True, "", 1)
    assert_answer(await stack.nudge("u2", secret="guessed"), 401, False, "invalid sign", 0)


def _tampered(backend: ScriptedBackend) -> bytes:
    request = backend.nudge_request("u3")
    request.user_id = "u2"  # signed for u3
    return request.SerializeToString()


def _no_request_id(backend: ScriptedBackend) -> bytes:
    return backend.nudge_request("u2", request_id="").SerializeToString()


def _non_canonical_sign(backend: ScriptedBackend) -> bytes:
    request = backend.nudge_request("u2")
    request.meta.sign = request.meta.sign.rstrip("=")
    return request.SerializeToString()


BODIES: dict[str, Callable[[ScriptedBackend], bytes]] = {
    "garbage": lambda _: GARBAGE,
    "empty": lambda _: b"",
    "no request id": _no_request_id,
    "unknown tenant": lambda b: b.nudge_request("u2", tenant_id="t-unknown").SerializeToString(),
    "blank user": lambda b: b.nudge_request(" \t").SerializeToString(),
    "empty user": lambda b: b.nudge_request("").SerializeToString(),
    "unsigned": lambda b: b.nudge_request("u2", secret="").SerializeToString(),
    "wrong secret": lambda b: b.nudge_request("u2", secret="wrong").SerializeToString(),
    "tampered": _tampered,
    "non-canonical sign": _non_canonical_sign,
    "301 s old": lambda b: b.nudge_request(
        "u2", timestamp_ms=now_ms() - 301_000
    ).SerializeToString(),
    "301 s ahead": lambda b: b.nudge_request(
        "u2", timestamp_ms=now_ms() + 301_000
    ).SerializeToString(),
}


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("garbage", 400, "invalid request"),
        ("empty", 400, "invalid request"),
        ("no request id", 400, "invalid request"),
        ("unknown tenant", 400, "invalid tenant"),
        ("blank user", 400, "missing user_id"),
        ("empty user", 400, "missing user_id"),
        ("unsigned", 401, "invalid sign"),
        ("wrong secret", 401, "invalid sign"),
        ("tampered", 401, "invalid sign"),
        ("non-canonical sign", 401, "invalid sign"),
        ("301 s old", 401, "stale request"),
        ("301 s ahead", 401, "stale request"),
    ],
)
async def test_nudge_errors(
    scripted_stack: StackFactory, case: str, status: int, reason: str
) -> None:
    backend = pull_backend()
    stack = await scripted_stack(backend)
    await stack.connect("u2")
    await settled(stack)
    answer = await backend.post_nudge(stack.gateway.url, BODIES[case](backend))
    assert_answer(answer, status, False, reason, 0)
    await settled(stack)
    assert len(backend.gets_of("u2")) == 1  # only the connect drain


async def test_nudge_within_the_freshness_window_is_accepted(
    scripted_stack: StackFactory,
) -> None:
    stack = await scripted_stack(pull_backend())
    await stack.connect("u2")
    old = now_ms() - 295_000
    assert_answer(await stack.nudge("u2", timestamp_ms=old), 200, True, "", 1)


async def test_replayed_nudge_is_stale_but_a_forgery_does_not_burn_its_id(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    stack = await scripted_stack(backend)
    await stack.connect("u2")
    real = backend.nudge_request("u2", request_id="nudge-1")
    forged = backend.nudge_request("u2", request_id="nudge-1", secret="attacker")
    url = stack.gateway.url
    assert_answer(
        await backend.post_nudge(url, forged.SerializeToString()), 401, False, "invalid sign", 0
    )
    assert_answer(await backend.post_nudge(url, real.SerializeToString()), 200, True, "", 1)
    assert_answer(
        await backend.post_nudge(url, real.SerializeToString()), 401, False, "stale request", 0
    )
    # A fresh id is fine again.
    assert_answer(await stack.nudge("u2"), 200, True, "", 1)
    assert nudge_requests(stack, TENANT, "stale") == 1
    assert nudge_requests(stack, TENANT, "invalid_sign") == 1


async def test_nudge_with_get_is_405(scripted_stack: StackFactory) -> None:
    backend = pull_backend()
    stack = await scripted_stack(backend)
    body = backend.nudge_request("u2").SerializeToString()
    answer = await backend.post_nudge(stack.gateway.url, body, method="GET")
    assert answer.status == 405


async def test_nudge_405_body_is_an_offline_available_response(
    scripted_stack: StackFactory,
) -> None:
    backend = pull_backend()
    stack = await scripted_stack(backend)
    body = backend.nudge_request("u2").SerializeToString()
    answer = await backend.post_nudge(stack.gateway.url, body, method="GET")
    assert answer.status == 405
    assert answer.content_type == "application/protobuf"
    assert answer.response.ok is False


async def test_nudge_while_draining_is_503(scripted_stack: StackFactory) -> None:
    backend = pull_backend()
    stack = await scripted_stack(backend)
    await stack.gateway.gateway.shutdown()
    assert_answer(await stack.nudge("u2"), 503, False, "server draining", 0)
    assert_answer(
        await backend.post_nudge(stack.gateway.url, GARBAGE), 503, False, "server draining", 0
    )
