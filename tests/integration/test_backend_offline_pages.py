"""/get-offline-messages answers byte for byte what the backend answered before its fast
path: the stored MessageRequest bytes are framed into the response instead of being
parsed and serialized again, and on PostgreSQL the page is read on the asyncpg
connection. The reference here is the former construction: the page read through
SQLAlchemy, each row parsed into ``resp.messages``, ``resp`` serialized."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from mics.backend import BackendServer, demo_config
from mics.backend.config import BackendConfig
from mics.backend.cursor import encode_cursor
from mics.backend.hookserver import page_size
from mics.events.bus import topic_for
from mics.protocol.ids import new_request_id
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_event, sign_hook_request
from tests.support.postgres import PostgresDatabase

SECRET = "dev-secret-demo"
TOPIC = topic_for("demo")
PROTOBUF = "application/protobuf"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'offline.db'}"
    database: PostgresDatabase = request.getfixturevalue("postgres_db")
    return database.async_url


def make_config(database_url: str, *, order_by_priority: bool = False) -> BackendConfig:
    base = demo_config()
    demo = base.tenants["demo"].model_copy(
        update={"offline_mode": "notify_pull", "offline_sender_priority": {"alice": 5}}
    )
    config = base.model_copy(
        update={
            "database_url": database_url,
            "tenants": {"demo": demo},
            "order_by_priority": order_by_priority,
        }
    )
    return BackendConfig.model_validate(config.model_dump())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def event(i: int, sender: str, to: str) -> bytes:
    body = {0: b"", 1: "ünïcödé ✓".encode(), 2: bytes(range(256)), 3: b"x" * 20_000}.get(
        i % 7, f"message {i}".encode()
    )
    req = msg_pb.MessageRequest(
        tenant_id="demo",
        user_id=sender,
        device_id="d1",
        msg_id=f"m{i:03d}",
        msg_type=msg_pb.GROUP_CHAT if i % 5 == 0 else msg_pb.SINGLE_CHAT,
        to_user_id="" if i % 5 == 0 else to,
        group_id="friends" if i % 5 == 0 else "",
        msg_body=body,
        timestamp_ms=1_700_000_000_000 + i,
    )
    ev = hook_pb.MqEvent(
        tenant_id="demo",
        event_type=hook_pb.OFFLINE_MESSAGE,
        msg_id=req.msg_id,
        user_id=sender,
        device_id="d1",
        to_user_id=to,
        event_data=req.SerializeToString(),
        timestamp=1_700_000_000_000 + (i % 3),
        node_id="n1",
    )
    sign_event(ev, SECRET)
    return ev.SerializeToString()


async def post_raw(
    http: aiohttp.ClientSession, server: BackendServer, req: hook_pb.GetOfflineMessagesRequest
) -> bytes:
    sign_hook_request(req, SECRET)
    async with http.post(
        server.url + "/get-offline-messages",
        data=req.SerializeToString(),
        headers={"Content-Type": PROTOBUF},
    ) as response:
        assert response.status == 200
        return await response.read()


async def expected_answer(
    server: BackendServer, req: hook_pb.GetOfflineMessagesRequest, after_id: int
) -> bytes:
    """What the handler answered before: SQLAlchemy read, parse, serialize."""
    repo = await server.state.store.repository()
    limit = page_size(req.max_messages)
    async with repo.engine.connect() as conn:
        rows = await repo._fetch(conn, "demo", req.user_id, after_id, limit + 1)
    has_more = len(rows) > limit
    rows = rows[:limit]
    last_id = rows[-1].id if rows else None
    if server.config.order_by_priority_for("demo"):
        rows.sort(key=lambda r: (-r.priority, r.created_at, r.id))
    resp = hook_pb.GetOfflineMessagesResponse(ok=True, has_more=has_more)
    resp.meta.tenant_id = req.meta.tenant_id
    resp.meta.request_id = req.meta.request_id
    resp.meta.timestamp_ms = req.meta.timestamp_ms
    resp.meta.trace_id = req.meta.trace_id
    for row in rows:
        resp.messages.add().ParseFromString(row.message_data)
    if last_id is None:
        resp.next_cursor = req.cursor
    else:
        resp.next_cursor = encode_cursor(SECRET, "demo", req.user_id, last_id)
    return resp.SerializeToString()


def request(user: str, cursor: str, max_messages: int) -> hook_pb.GetOfflineMessagesRequest:
    return hook_pb.GetOfflineMessagesRequest(
        meta=hook_pb.HookMeta(
            tenant_id="demo",
            request_id=new_request_id(),
            timestamp_ms=time.time_ns() // 1_000_000,
            trace_id="trace-1",
        ),
        user_id=user,
        device_id="phone",
        max_messages=max_messages,
        cursor=cursor,
        ack_follows=True,
    )


@pytest.mark.parametrize("order_by_priority", [False, True])
async def test_pages_are_byte_identical_to_parse_and_serialize(
    database_url: str, http: aiohttp.ClientSession, order_by_priority: bool
) -> None:
    config = make_config(database_url, order_by_priority=order_by_priority)
    async with BackendServer(config) as server:
        senders = ("alice", "bob", "carol")
        await server.state.ingestor.ingest(
            [(TOPIC, event(i, senders[i % 3], "bob")) for i in range(230)]
        )
        await server.state.ingestor.ingest([(TOPIC, event(999, "carol", "alice"))])
        for size in (1, 7, 100, 0, 1000):
            cursor, after_id, pages = "", 0, 0
            while True:
                req = request("bob", cursor, size)
                body = await post_raw(http, server, req)
                assert body == await expected_answer(server, req, after_id)
                resp = hook_pb.GetOfflineMessagesResponse.FromString(body)
                assert resp.ok
                pages += 1
                if not resp.messages:
                    break
                cursor = resp.next_cursor
                after_id = int(cursor.split(".")[1], 36)
            assert pages == -(-230 // page_size(size)) + 1
        # Another recipient, and one without messages: their own pages only.
        req = request("alice", "", 100)
        body = await post_raw(http, server, req)
        assert body == await expected_answer(server, req, 0)
        assert [m.msg_id for m in hook_pb.GetOfflineMessagesResponse.FromString(body).messages] == [
            "m999"
        ]
        req = request("dave", "", 100)
        assert await post_raw(http, server, req) == await expected_answer(server, req, 0)


async def test_marking_on_fetch_answers_the_same_bytes(
    database_url: str, http: aiohttp.ClientSession
) -> None:
    async with BackendServer(make_config(database_url)) as server:
        await server.state.ingestor.ingest([(TOPIC, event(i, "alice", "bob")) for i in range(12)])
        req = request("bob", "", 5)
        expected = await expected_answer(server, req, 0)
        req.ack_follows = False  # a MICS v1 gateway: marked when fetched
        body = await post_raw(http, server, req)
        reference = hook_pb.GetOfflineMessagesResponse.FromString(expected)
        assert hook_pb.GetOfflineMessagesResponse.FromString(body).messages == reference.messages
        repo = await server.state.store.repository()
        assert await repo.count_pending("demo", "bob") == 7
