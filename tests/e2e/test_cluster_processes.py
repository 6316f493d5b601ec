"""Gateway nodes as real processes: kill -9 one under traffic and lose nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis

from mics.backend.app import BackendServer
from mics.backend.config import BackendConfig
from mics.client import ClientOptions, ConnectionLost, MicsClient
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.conftest import SECRET, TENANT, tenant_config
from tests.support.process import free_port


class NodeProcess:
    def __init__(self, name: str, backend_url: str, redis_url: str) -> None:
        self.name = name
        self.port = free_port()
        self.grpc_port = free_port()
        self.env = {
            **os.environ,
            "NODE_ID": name,
            "HOST": "127.0.0.1",
            "GRPC_HOST": "127.0.0.1",
            "GRPC_PORT": str(self.grpc_port),
            "PUBLIC_ENDPOINT": f"http://127.0.0.1:{self.grpc_port}",
            "TENANT_AUTH_MAP": json.dumps({TENANT: backend_url}),
            "TENANT_HOOK_SECRETS": json.dumps({TENANT: SECRET}),
            "HOOK_SIGN_REQUIRED": "true",
            "HOOK_TIMEOUT_MS": "2000",
            "NODE_TTL_SECONDS": "2",
            "NODE_REFRESH_SECONDS": "0.5",
            "NODE_SNAPSHOT_SECONDS": "0.5",
            "NODE_CLEANUP_SECONDS": "0.5",
            "ROUTE_RENEW_INTERVAL_SECONDS": "0.5",
            "LOG_LEVEL": "WARNING",
        }
        self.redis_url = redis_url
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mics",
            "gateway",
            "--port",
            str(self.port),
            "--redis",
            self.redis_url,
            env=self.env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        async with aiohttp.ClientSession() as http:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while True:
                assert self.proc.returncode is None, f"{self.name} exited"
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                assert loop.time() < deadline, f"{self.name} never became ready"
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.fixture
async def backend() -> AsyncIterator[BackendServer]:
    server = BackendServer(
        BackendConfig(host="127.0.0.1", port=0, tenants={TENANT: tenant_config()})
    )
    await server.start()
    yield server
    await server.stop()


def client(node: NodeProcess, user: str, device: str = "d1") -> MicsClient:
    return MicsClient(
        ClientOptions(
            url=node.ws_url,
            tenant_id=TENANT,
            token=f"{user}-token",
            device_id=device,
            reconnect=False,
            heartbeat_interval_s=0,
            ack_timeout_s=5,
        )
    )


async def test_kill_9_of_a_node_under_traffic_loses_nothing(
    backend: BackendServer, redis_url: str
) -> None:
    n1 = NodeProcess("p1", backend.url, redis_url)
    n2 = NodeProcess("p2", backend.url, redis_url)
    await n1.start()
    await n2.start()
    clients: list[MicsClient] = []
    try:
        sender = client(n1, "u1")
        await sender.connect()
        clients.append(sender)
        victims = []
        for user in ("u2", "u3"):
            c = client(n2, user)
            await c.connect()
            clients.append(c)
            victims.append(c)
        sent: list[str] = []
        for i in range(20):
            ack = await sender.send_single("u2" if i % 2 else "u3", b"before", msg_id=f"k-{i}")
            assert ack.status == msg_pb.SENT
            sent.append(f"k-{i}")
        received: dict[str, list[str]] = {"u2": [], "u3": []}
        for victim, user in zip(victims, ("u2", "u3"), strict=True):
            for _ in range(10):
                received[user].append((await victim.next_delivery(timeout=5)).msg_id)
        await n2.kill()
        # Traffic continues while p2 is dead: forwards fail, messages take the offline path.
        for i in range(20, 40):
            ack = await sender.send_single("u2" if i % 2 else "u3", b"during", msg_id=f"k-{i}")
            assert ack.status == msg_pb.SENT, ack
            sent.append(f"k-{i}")
        for victim in victims:
            with pytest.raises((ConnectionLost, TimeoutError)):
                await victim.next_delivery(timeout=2)
        # Users reconnect to the surviving node and get what was sent meanwhile.
        for user in ("u2", "u3"):
            again = client(n1, user, "d2")
            await again.connect()
            clients.append(again)
            while len(received[user]) < 20:
                received[user].append((await again.next_delivery(timeout=10)).msg_id)
        everything = sorted(received["u2"] + received["u3"])
        assert everything == sorted(sent), "zero loss, no duplicates"
        # p1 cleaned p2's routes from Redis within twice the node TTL.
        r = aioredis.Redis.from_url(redis_url)
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while await r.exists("nodes:p2:routes") or await r.hget(f"{TENANT}:online:u2", "d1"):
                assert loop.time() < deadline, "the dead node's routes were not cleaned"
                await asyncio.sleep(0.1)
        finally:
            await r.aclose()
    finally:
        for c in clients:
            await c.close()
        await n1.stop()
        await n2.stop()
