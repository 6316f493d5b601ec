"""The raw aiohttp WebSocket server: the baseline the gateway is compared with.

    python -m bench._echo_proc '{"mode": "echo"}'

Same WebSocketResponse options as the gateway (autoping, 30 s heartbeat, no
compression, the same max message size), uvloop, one process. On connect it sends one
small binary frame (the load waits for it as it waits for ConnectAck), then:

- ``echo``: every binary message is sent back to its sender;
- ``relay``: the minimal hand-written equivalent of a 1:1 chat relay: a message from
  ``token=s<i>`` is written to ``token=r<i>``, and the sender gets a short "ack" (the
  24-byte stamp of the body). No protobuf, no auth, no bookkeeping: the floor of what
  aiohttp costs for the gateway's frame pattern (1 in, 2 out).

Commands: those of ``bench._common`` plus ``count`` (open WebSockets).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from aiohttp import WSMsgType, web

from bench._common import (
    BODY_MAGIC,
    BODY_STAMP_LEN,
    child_arg,
    common_handlers,
    control_loop,
    raise_nofile,
    reply,
    run,
)

FRAME_LIMIT = 1_048_576 + 65_536  # the gateway's default frame limit
HELLO = b"\x0a\x02ok"


async def main() -> None:
    raise_nofile()
    arg: dict[str, Any] = child_arg()
    mode = arg.get("mode", "echo")
    logging.getLogger("aiohttp").setLevel(logging.ERROR)
    peers: dict[str, web.WebSocketResponse] = {}
    open_count = 0

    async def handle(request: web.Request) -> web.StreamResponse:
        nonlocal open_count
        ws = web.WebSocketResponse(
            autoping=True, heartbeat=30, max_msg_size=2 * FRAME_LIMIT, compress=False, timeout=2.0
        )
        await ws.prepare(request)
        user = request.query.get("token", "")
        if mode == "relay":
            peers[user] = ws
        open_count += 1
        try:
            await ws.send_bytes(HELLO)
            if mode == "relay":
                target_name = "r" + user[1:] if user.startswith("s") else ""
                async for msg in ws:
                    if msg.type is not WSMsgType.BINARY:
                        continue
                    data = msg.data
                    target = peers.get(target_name)
                    if target is not None:
                        await target.send_bytes(data)
                    i = data.find(BODY_MAGIC)
                    await ws.send_bytes(data[i : i + BODY_STAMP_LEN])
            else:
                async for msg in ws:
                    if msg.type is WSMsgType.BINARY:
                        await ws.send_bytes(msg.data)
        finally:
            open_count -= 1
            if peers.get(user) is ws:
                del peers[user]
        return ws

    app = web.Application()
    app.router.add_get("/ws", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=4096)
    await site.start()
    port = runner.addresses[0][1]
    handlers = common_handlers()
    handlers["count"] = lambda _: {"count": open_count}
    reply({"port": port, "pid": os.getpid()})
    try:
        await control_loop(handlers)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    run(main)
