"""`mics dev` as a newcomer runs it: a real process, real ports, Ctrl-C stops it."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from mics.client import ClientOptions, MicsClient
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.support.process import free_port


async def test_mics_dev_runs_the_system_and_stops_on_ctrl_c() -> None:
    port, backend_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mics",
        "dev",
        "--port",
        str(port),
        "--backend-port",
        str(backend_port),
        "--data-dir",
        "",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        banner: list[str] = []
        while not any("token=bob-token" in line for line in banner):
            line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
            assert line, "mics dev exited before printing its banner"
            banner.append(line.decode())
        url = next(w for line in banner for w in line.split() if w.startswith("ws://"))
        base = url.split("?")[0]
        clients = []
        for user in ("alice", "bob"):
            client = MicsClient(
                ClientOptions(
                    url=base,
                    tenant_id="demo",
                    token=f"{user}-token",
                    device_id="t",
                    reconnect=False,
                )
            )
            await client.connect()
            clients.append(client)
        alice, bob = clients
        ack = await alice.send_single("bob", b"hello from the dev stack")
        assert ack.status == msg_pb.SENT
        got = await bob.next_delivery(timeout=10)
        assert got.msg_body == b"hello from the dev stack"
        # The offline path end to end: carol is offline, the backend stores the message
        # from the in-process event bus, and carol's connect pulls it.
        ack = await alice.send_single("carol", b"stored for carol", msg_id="dev-offline-1")
        assert (ack.status, ack.reason) == (msg_pb.SENT, "user_offline")
        carol = MicsClient(
            ClientOptions(
                url=base, tenant_id="demo", token="carol-token", device_id="t", reconnect=False
            )
        )
        await carol.connect()
        clients.append(carol)
        backlog = await carol.next_delivery(timeout=10)
        assert (backlog.msg_id, backlog.user_id, backlog.msg_body) == (
            "dev-offline-1",
            "alice",
            b"stored for carol",
        )
        sync = await carol.next_offline_sync(timeout=10)
        assert (sync.delivered, sync.complete) == (1, True)
        for client in clients:
            await client.close()
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), timeout=30)
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
