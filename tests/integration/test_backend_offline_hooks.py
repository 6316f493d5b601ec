"""Offline hooks over real HTTP: /get-offline-messages and /ack-offline-messages with
signed protobuf against a BackendServer on a free port, messages stored through the
in-process subscriber (the same path as the Kafka consumer)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from google.protobuf.message import Message

from mics.backend import BackendConfig, BackendServer, demo_config
from mics.backend.cursor import encode_cursor
from mics.events.bus import topic_for
from mics.protocol.ids import new_request_id
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_event, sign_hook_request

SECRET = "dev-secret-demo"
PROTOBUF = "application/protobuf"
TOPIC = topic_for("demo")

R = TypeVar("R", bound=Message)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def make_config(tmp_path: Path, **overrides: Any) -> BackendConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = demo_config()
    tenant_overrides = overrides.pop("tenant", {})
    demo = base.tenants["demo"].model_copy(
        update={"offline_mode": "notify_pull", **tenant_overrides}
    )
    updated = base.model_copy(
        update={
            "database_url": f"sqlite+aiosqlite:///{tmp_path / 'offline.db'}",
            "tenants": {"demo": demo},
            **overrides,
        }
    )
    return BackendConfig.model_validate(updated.model_dump())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[BackendServer]:
    async with BackendServer(make_config(tmp_path)) as srv:
        yield srv


def message(
    mid: str, *, sender: str = "alice", to: str = "bob", body: bytes = b"hi"
) -> msg_pb.MessageRequest:
    return msg_pb.MessageRequest(
        tenant_id="demo",
        user_id=sender,
        device_id="d1",
        msg_id=mid,
        msg_type=msg_pb.SINGLE_CHAT,
        to_user_id=to,
        msg_body=body,
        timestamp_ms=123,
    )


def event_bytes(req: msg_pb.MessageRequest, recipient: str = "bob") -> bytes:
    event = hook_pb.MqEvent(
        tenant_id="demo",
        event_type=hook_pb.OFFLINE_MESSAGE,
        msg_id=req.msg_id,
        user_id=req.user_id,
        device_id=req.device_id,
        to_user_id=recipient,
        event_data=req.SerializeToString(),
        timestamp=now_ms(),
        node_id="n1",
    )
    sign_event(event, SECRET)
    return event.SerializeToString()


async def store(
    server: BackendServer, *mids: str, to: str = "bob", **kw: Any
) -> list[msg_pb.MessageRequest]:
    """Store messages ``mids`` for ``to`` through the in-process subscriber."""
    sent = []
    for mid in mids:
        req = message(mid, to=to, **kw)
        await server.event_subscriber(TOPIC, to.encode(), event_bytes(req, to))
        sent.append(req)
    return sent


async def store_many(server: BackendServer, count: int, to: str = "bob") -> None:
    """One transaction (like one consumed batch)."""
    records = [(TOPIC, event_bytes(message(f"bulk{i:05d}", to=to), to)) for i in range(count)]
    await server.state.ingestor.ingest(records)


def meta(*, ts: int | None = None, request_id: str | None = None) -> hook_pb.HookMeta:
    return hook_pb.HookMeta(
        tenant_id="demo",
        request_id=request_id or new_request_id(),
        timestamp_ms=now_ms() if ts is None else ts,
        trace_id="tr",
    )


async def post(
    http: aiohttp.ClientSession,
    server: BackendServer,
    path: str,
    req: Message,
    resp_type: type[R],
    *,
    secret: str | None = SECRET,
) -> tuple[int, R]:
    if secret is not None:
        sign_hook_request(req, secret)  # type: ignore[arg-type]
    async with http.post(
        server.url + path, data=req.SerializeToString(), headers={"Content-Type": PROTOBUF}
    ) as response:
        body = await response.read()
        resp = resp_type()
        if response.status != 500:  # aiohttp's own text page
            resp.ParseFromString(body)
        return response.status, resp


Pull = Callable[..., Awaitable[hook_pb.GetOfflineMessagesResponse]]
Ack = Callable[..., Awaitable[hook_pb.AckOfflineMessagesResponse]]


@pytest.fixture
def pull(http: aiohttp.ClientSession, server: BackendServer) -> Pull:
    async def do(
        cursor: str = "",
        *,
        user: str = "bob",
        max_messages: int = 100,
        ack_follows: bool = True,
        target: BackendServer | None = None,
    ) -> hook_pb.GetOfflineMessagesResponse:
        req = hook_pb.GetOfflineMessagesRequest(
            meta=meta(),
            user_id=user,
            device_id="phone",
            max_messages=max_messages,
            cursor=cursor,
            ack_follows=ack_follows,
        )
        status, resp = await post(
            http, target or server, "/get-offline-messages", req, hook_pb.GetOfflineMessagesResponse
        )
        assert status == 200
        return resp

    return do


@pytest.fixture
def ack(http: aiohttp.ClientSession, server: BackendServer) -> Ack:
    async def do(cursor: str, *, user: str = "bob") -> hook_pb.AckOfflineMessagesResponse:
        req = hook_pb.AckOfflineMessagesRequest(
            meta=meta(), user_id=user, device_id="phone", cursor=cursor
        )
        status, resp = await post(
            http, server, "/ack-offline-messages", req, hook_pb.AckOfflineMessagesResponse
        )
        assert status == 200  # never 404, also for "no": ok=false is a business answer
        return resp

    return do


def mids(resp: hook_pb.GetOfflineMessagesResponse) -> list[str]:
    return [m.msg_id for m in resp.messages]


# -- get-offline-messages ----------------------------------------------------------------


async def test_empty_backlog(pull: Pull) -> None:
    resp = await pull()
    assert resp.ok
    assert not resp.messages
    assert not resp.has_more
    assert resp.next_cursor == ""
    assert resp.meta.tenant_id == "demo"
    assert resp.meta.trace_id == "tr"


async def test_pages_cursors_and_messages_as_stored(server: BackendServer, pull: Pull) -> None:
    sent = await store(server, "m0", "m1", "m2", "m3", "m4")
    first = await pull(max_messages=2)
    assert first.ok
    assert first.has_more
    assert mids(first) == ["m0", "m1"]
    # Exactly the normalized MessageRequest that was stored.
    assert list(first.messages) == sent[:2]
    assert first.next_cursor.startswith("c1.")
    # ack_follows=true: nothing was marked, the same pull returns the same page.
    assert mids(await pull(max_messages=2)) == ["m0", "m1"]
    second = await pull(first.next_cursor, max_messages=2)
    assert mids(second) == ["m2", "m3"]
    assert second.has_more
    last = await pull(second.next_cursor, max_messages=2)
    assert mids(last) == ["m4"]
    assert not last.has_more
    assert last.next_cursor  # non-empty with every non-empty page, also the last
    # Past the end: empty page echoing the cursor.
    empty = await pull(last.next_cursor, max_messages=2)
    assert empty.ok
    assert not empty.messages
    assert not empty.has_more
    assert empty.next_cursor == last.next_cursor
    # A message stored after the cursor was issued is returned from it.
    await store(server, "late")
    assert mids(await pull(last.next_cursor)) == ["late"]


async def test_max_messages_is_clamped(server: BackendServer, pull: Pull) -> None:
    await store_many(server, 1001)
    for asked, got in ((0, 100), (-5, 100), (1, 1), (5000, 1000), (1000, 1000)):
        resp = await pull(max_messages=asked)
        assert len(resp.messages) == got, asked
        assert resp.has_more


async def test_invalid_cursor_and_missing_user(server: BackendServer, pull: Pull) -> None:
    await store(server, "m0")
    other_users = encode_cursor(SECRET, "demo", "carol", 1)
    for cursor in ("garbage", "c1.1.AAAAAAAAAAA", other_users):
        resp = await pull(cursor)
        assert not resp.ok
        assert resp.reason == "invalid cursor"
        assert not resp.messages
    resp = await pull(user="")
    assert not resp.ok
    assert resp.reason == "missing user_id"


async def test_v1_gateway_without_ack_follows_marks_on_fetch(
    server: BackendServer, pull: Pull
) -> None:
    await store(server, "m0", "m1", "m2")
    first = await pull(max_messages=2, ack_follows=False)
    assert mids(first) == ["m0", "m1"]
    assert first.has_more
    # Marked: a new connection (cursor "") gets only the rest.
    assert mids(await pull(ack_follows=False)) == ["m2"]
    assert mids(await pull()) == []
    assert (
        server.state.metrics.registry.sample(
            "offline_message_delivered_total", {"tenant": "demo", "via": "fetch"}
        )
        == 3
    )


@pytest.mark.parametrize(
    ("overrides", "marks"),
    [
        ({"mark_on_fetch": True}, True),
        ({"mark_on_fetch": True, "tenant": {"mark_on_fetch": False}}, False),
        ({"tenant": {"mark_on_fetch": True}}, True),
        ({}, False),
    ],
    ids=["global", "tenant-off", "tenant-on", "default"],
)
async def test_mark_on_fetch_switch(
    tmp_path: Path, pull: Pull, overrides: dict[str, Any], marks: bool
) -> None:
    async with BackendServer(make_config(tmp_path / "s", **overrides)) as srv:
        await store(srv, "m0", "m1")
        assert mids(await pull(target=srv, ack_follows=True)) == ["m0", "m1"]
        assert mids(await pull(target=srv, ack_follows=True)) == ([] if marks else ["m0", "m1"])


async def test_order_by_priority_sorts_within_the_page(tmp_path: Path, pull: Pull) -> None:
    config = make_config(
        tmp_path / "p", tenant={"order_by_priority": True, "offline_sender_priority": {"carol": 5}}
    )
    async with BackendServer(config) as srv:
        await store(srv, "a1")
        await store(srv, "c1", sender="carol")
        await store(srv, "a2")
        page = await pull(target=srv, max_messages=3)
        assert mids(page) == ["c1", "a1", "a2"]


# -- ack-offline-messages ----------------------------------------------------------------


async def test_ack_marks_up_to_the_cursor_and_is_idempotent(
    server: BackendServer, pull: Pull, ack: Ack
) -> None:
    await store(server, "m0", "m1", "m2")
    await store(server, "c0", to="carol")
    page = await pull(max_messages=2)
    resp = await ack(page.next_cursor)
    assert resp.ok
    assert resp.reason == ""
    assert resp.meta.tenant_id == "demo"
    assert mids(await pull()) == ["m2"]
    assert (await ack(page.next_cursor)).ok  # again: nothing changes, still ok
    assert mids(await pull()) == ["m2"]
    assert mids(await pull(user="carol")) == ["c0"]  # other users untouched
    assert (
        server.state.metrics.registry.sample(
            "offline_message_delivered_total", {"tenant": "demo", "via": "ack"}
        )
        == 2
    )
    # A later cursor covers earlier pages.
    rest = await pull(page.next_cursor)
    assert (await ack(rest.next_cursor)).ok
    assert mids(await pull()) == []


async def test_ack_of_an_unknown_cursor(server: BackendServer, pull: Pull, ack: Ack) -> None:
    await store(server, "m0")
    page = await pull()
    for cursor in ("", "nonsense", "c1.zzzzzzzz.AAAAAAAAAAA", page.next_cursor + "x"):
        resp = await ack(cursor)
        assert not resp.ok
        assert resp.reason == "invalid cursor"
    # bob's cursor does not commit carol's messages.
    await store(server, "c0", to="carol")
    resp = await ack(page.next_cursor, user="carol")
    assert not resp.ok
    assert resp.reason == "invalid cursor"
    assert mids(await pull(user="carol")) == ["c0"]
    assert mids(await pull()) == ["m0"]


async def test_page_not_acked_returns_on_the_next_pull(
    server: BackendServer, pull: Pull, ack: Ack
) -> None:
    """The loss window of offline-design.md 8.1: a socket dropped mid-push must not lose
    the page; only the ack commits it."""
    await store(server, "m0", "m1")
    lost = await pull()
    assert mids(lost) == ["m0", "m1"]  # ... the connection drops before the client confirms
    again = await pull()
    assert mids(again) == ["m0", "m1"]
    assert (await ack(again.next_cursor)).ok
    assert mids(await pull()) == []


# -- admission ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/get-offline-messages", "/ack-offline-messages"])
async def test_bad_signature_stale_and_replay_are_rejected(
    http: aiohttp.ClientSession, server: BackendServer, path: str
) -> None:
    await store(server, "m0")
    page_cursor = encode_cursor(SECRET, "demo", "bob", 1)

    def request(**meta_kw: Any) -> Message:
        if path == "/get-offline-messages":
            return hook_pb.GetOfflineMessagesRequest(
                meta=meta(**meta_kw), user_id="bob", max_messages=10, ack_follows=True
            )
        return hook_pb.AckOfflineMessagesRequest(
            meta=meta(**meta_kw), user_id="bob", cursor=page_cursor
        )

    resp_type: Any = (
        hook_pb.GetOfflineMessagesResponse
        if path == "/get-offline-messages"
        else hook_pb.AckOfflineMessagesResponse
    )
    status, resp = await post(http, server, path, request(), resp_type, secret="wrong")
    assert (status, resp.ok, resp.reason) == (401, False, "invalid sign")
    status, resp = await post(http, server, path, request(), resp_type, secret=None)
    assert (status, resp.reason) == (401, "invalid sign")  # signing required
    status, resp = await post(http, server, path, request(ts=now_ms() - 301_000), resp_type)
    assert (status, resp.reason) == (401, "stale request")

    fresh = request()
    sign_hook_request(fresh, SECRET)  # type: ignore[arg-type]
    status, resp = await post(http, server, path, fresh, resp_type, secret=None)
    assert status == 200
    assert resp.ok
    status, resp = await post(http, server, path, fresh, resp_type, secret=None)
    assert (status, resp.reason) == (401, "replayed request")
    # Nothing was marked by the rejected acks; the accepted one did.
    repo = await server.state.store.repository()
    assert await repo.count_pending("demo", "bob") == (1 if path == "/get-offline-messages" else 0)


async def test_database_failure_is_a_500_never_a_404(
    http: aiohttp.ClientSession, server: BackendServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken() -> Any:
        raise ConnectionError("database down")

    monkeypatch.setattr(server.state.store, "repository", broken)
    cursor = encode_cursor(SECRET, "demo", "bob", 1)
    ack_req = hook_pb.AckOfflineMessagesRequest(meta=meta(), user_id="bob", cursor=cursor)
    status, _ = await post(
        http, server, "/ack-offline-messages", ack_req, hook_pb.AckOfflineMessagesResponse
    )
    assert status == 500
    get_req = hook_pb.GetOfflineMessagesRequest(meta=meta(), user_id="bob")
    status, _ = await post(
        http, server, "/get-offline-messages", get_req, hook_pb.GetOfflineMessagesResponse
    )
    assert status == 500


async def test_query_metrics(
    http: aiohttp.ClientSession, server: BackendServer, pull: Pull
) -> None:
    await store(server, "m0", "m1", "m2")
    await pull(max_messages=2)
    await pull(user="nobody")
    async with http.get(server.url + "/metrics") as response:
        text = await response.text()
    assert 'offline_message_query_total{tenant="demo"} 2.0' in text
    assert 'offline_message_query_duration_ms_count{tenant="demo"} 2.0' in text
    assert 'offline_message_query_count_sum{tenant="demo"} 2.0' in text
    assert 'offline_message_stored_total{tenant="demo"} 3.0' in text
    assert (
        'mics_backend_hook_requests_total{op="GetOfflineMessages",result="ok",tenant="demo"} 2.0'
        in text
    )


async def test_auth_tells_v1_gateways_to_pull(
    http: aiohttp.ClientSession, server: BackendServer
) -> None:
    req = hook_pb.AuthRequest(meta=meta(), token="alice-token", device_id="d1")
    status, resp = await post(http, server, "/auth", req, hook_pb.AuthResponse)
    assert status == 200
    assert resp.ok
    assert resp.config.offline_mode == "notify_pull"
    assert resp.config.HasField("offline_use_hook_pull")
    assert resp.config.offline_use_hook_pull


async def test_store_opens_lazily_without_a_configured_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, http: aiohttp.ClientSession
) -> None:
    """database_url = "": the default file in the working directory, created only when
    the offline path is used."""
    monkeypatch.chdir(tmp_path)
    config = make_config(tmp_path).model_copy(update={"database_url": ""})
    async with BackendServer(config) as srv:
        assert not srv.state.store.is_open
        # Pulls and acks before anything was stored answer from "no file": nothing.
        req = hook_pb.GetOfflineMessagesRequest(meta=meta(), user_id="bob", ack_follows=True)
        status, resp = await post(
            http, srv, "/get-offline-messages", req, hook_pb.GetOfflineMessagesResponse
        )
        assert status == 200
        assert resp.ok
        assert not resp.messages
        ack_req = hook_pb.AckOfflineMessagesRequest(
            meta=meta(), user_id="bob", cursor=encode_cursor(SECRET, "demo", "bob", 1)
        )
        status, ack_resp = await post(
            http, srv, "/ack-offline-messages", ack_req, hook_pb.AckOfflineMessagesResponse
        )
        assert status == 200
        assert ack_resp.ok
        assert not (tmp_path / "mics-offline.db").exists()
        await store(srv, "m0")
        assert (tmp_path / "mics-offline.db").exists()
        req = hook_pb.GetOfflineMessagesRequest(meta=meta(), user_id="bob", ack_follows=True)
        status, resp = await post(
            http, srv, "/get-offline-messages", req, hook_pb.GetOfflineMessagesResponse
        )
        assert status == 200
        assert [m.msg_id for m in resp.messages] == ["m0"]
