"""Memory per idle WebSocket connection: the gateway versus a bare aiohttp server.

    python -m bench.idle_connections                       # N = 5000 and 10000
    python -m bench.idle_connections --counts 2000 --servers gateway
    python -m bench.idle_connections --tracemalloc         # where the gateway's bytes go

For each server kind and each N, a fresh server process is started
(``bench._gateway_proc`` or ``bench._echo_proc``), then this process (the load):

1. opens and closes a warm-up batch of connections (one-time allocations: code paths,
   hook client pool, metric children) and waits until the server counts 0 open;
2. asks the server for ``gc.collect()`` and reads its VmRSS until it is stable: *before*;
3. opens N authenticated connections, at most ``--concurrency`` at a time, each one
   counted only once its first server frame arrived (ConnectAck code 1000 for the
   gateway), and waits until the server itself counts N open sessions;
4. gc, stable VmRSS again: *after*. KB per connection = (after - before) / N.

Gateway auth goes to ``bench._auth.AuthServer`` in this process (hooks off, heartbeat
timeout 3600 s, so idle connections need no heartbeat_ping). Connections stay idle but
each has a reader, so WebSocket pings from the server are answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from bench._auth import AuthServer
from bench._common import (
    Child,
    kill_children,
    raise_nofile,
    run,
    stop_all,
    wait_rss_stable,
)
from mics.protocol.pb import mics_message_pb2 as msg_pb

TENANT = "bench"
WARMUP = 200
GOAL_KB = 16.0


@dataclass
class Result:
    server: str
    n: int
    opened: int
    failed: int
    rss_before_kb: int
    rss_after_kb: int
    kb_per_conn: float
    connect_s: float


class Load:
    """The client side: aiohttp sessions over one or more 127.0.0.x source addresses."""

    def __init__(self, base_url: str, kind: str, source_addrs: int) -> None:
        self.base_url = base_url
        self.kind = kind
        self.sessions = [
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=0, local_addr=(f"127.0.0.{i + 1}", 0) if source_addrs > 1 else None
                )
            )
            for i in range(source_addrs)
        ]
        self.sockets: list[aiohttp.ClientWebSocketResponse] = []
        self.readers: list[asyncio.Task[None]] = []
        self.failures: list[str] = []

    def url(self, i: int) -> str:
        return f"{self.base_url}?tenantId={TENANT}&token=u{i}&deviceId=d0"

    async def _one(self, i: int, sem: asyncio.Semaphore) -> None:
        async with sem:
            for attempt in range(3):
                try:
                    ws = await self.sessions[i % len(self.sessions)].ws_connect(
                        self.url(i), autoping=True, compress=0, max_msg_size=0
                    )
                    msg = await ws.receive(timeout=30)
                    if msg.type is not aiohttp.WSMsgType.BINARY:
                        await ws.close()
                        raise RuntimeError(f"first frame {msg.type.name} {msg.data!r:.80}")
                    if self.kind == "gateway":
                        ack = msg_pb.ServerFrame.FromString(msg.data)
                        if (
                            ack.WhichOneof("payload") != "connect_ack"
                            or ack.connect_ack.code != 1000
                        ):
                            await ws.close()
                            raise RuntimeError(f"not a ConnectAck: {ack}")
                    self.sockets.append(ws)
                    self.readers.append(asyncio.get_running_loop().create_task(_drain(ws)))
                    return
                except Exception as exc:
                    if attempt == 2:
                        self.failures.append(f"{type(exc).__name__}: {exc}")

    async def open(self, start: int, count: int, concurrency: int) -> None:
        sem = asyncio.Semaphore(concurrency)
        await asyncio.gather(*(self._one(i, sem) for i in range(start, start + count)))

    async def close_sockets(self) -> None:
        sockets, self.sockets = self.sockets, []
        await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
        readers, self.readers = self.readers, []
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    async def abort(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)
        self.readers, self.sockets = [], []
        for session in self.sessions:
            with contextlib.suppress(Exception):
                await session.close()


async def _drain(ws: aiohttp.ClientWebSocketResponse) -> None:
    with contextlib.suppress(Exception):
        async for _ in ws:
            pass


async def wait_count(server: Child, want: int, wait_s: float = 60.0) -> int:
    deadline = time.monotonic() + wait_s
    while True:
        count = (await server.command("count"))["count"]
        if count == want or time.monotonic() > deadline:
            return int(count)
        await asyncio.sleep(0.05)


async def start_server(
    kind: str, auth_url: str, tracemalloc: bool, extra: dict[str, Any] | None = None
) -> Child:
    env = {"PYTHONTRACEMALLOC": "1"} if tracemalloc else None
    if kind == "gateway":
        settings = {
            "tenant_auth_map": {TENANT: auth_url},
            # The connect storm puts up to --concurrency /auth calls in flight against a
            # concurrency limit of 32: let them queue instead of failing after 10 ms.
            "hook_queue_timeout_ms": 5000,
            "hook_timeout_ms": 5000,
        }
        settings.update(extra or {})
        child = Child("gateway", "bench._gateway_proc", settings, env=env)
    else:
        child = Child("raw-aiohttp", "bench._echo_proc", {"mode": "echo"}, env=env)
    await child.start()
    return child


async def measure(
    kind: str,
    n: int,
    auth_url: str,
    concurrency: int,
    source_addrs: int,
    tracemalloc: bool,
    tm_lines: int = 25,
    extra: dict[str, Any] | None = None,
) -> Result:
    server = await start_server(kind, auth_url, tracemalloc, extra)
    load: Load | None = None
    try:
        load = Load(f"ws://127.0.0.1:{server.ready['port']}/ws", kind, source_addrs)
        await load.open(10_000_000, WARMUP, concurrency)
        await load.close_sockets()
        await wait_count(server, 0)
        if tracemalloc:
            await server.command("gc")
            await server.command("tm_base")

        async def server_rss() -> int:
            return int((await server.command("gc"))["rss_kb"])

        before = await wait_rss_stable(server_rss)
        started = time.monotonic()
        await load.open(0, n, concurrency)
        connect_s = time.monotonic() - started
        opened = len(load.sockets)
        counted = await wait_count(server, opened)
        if counted != opened:
            print(f"  warning: server counts {counted} open, client {opened}", file=sys.stderr)
        after = await wait_rss_stable(server_rss)
        if load.failures:
            print(
                f"  {len(load.failures)} connections failed, first: {load.failures[0]}",
                file=sys.stderr,
            )
        if tracemalloc:
            diff = await server.command("tm_diff", 120, limit=tm_lines)
            print(f"\n-- tracemalloc: {kind} growth for {opened} idle connections --")
            print(
                f"total {diff['total_diff'] / 1024:.0f} KiB = "
                f"{diff['total_diff'] / max(1, opened):.0f} B/conn (Python heap only)"
            )
            for line in diff["lines"]:
                print(
                    f"  {line['size_diff'] / max(1, opened):8.0f} B/conn "
                    f"{line['count_diff'] / max(1, opened):6.2f} obj/conn  {line['where']}"
                )
        return Result(
            server=kind,
            n=n,
            opened=opened,
            failed=len(load.failures),
            rss_before_kb=before,
            rss_after_kb=after,
            kb_per_conn=(after - before) / max(1, opened),
            connect_s=connect_s,
        )
    finally:
        # Server first: the client sockets then just see a reset, no close handshakes.
        await stop_all([server])
        if load is not None:
            await load.abort()


async def amain(args: argparse.Namespace) -> list[Result]:
    limit = raise_nofile(max(65_536, 2 * max(args.counts) + 1024))
    if limit < max(args.counts) + 1024:
        print(
            f"RLIMIT_NOFILE is {limit}: too low for {max(args.counts)} connections", file=sys.stderr
        )
    auth = AuthServer()
    auth_url = await auth.start()
    results: list[Result] = []
    try:
        for kind in args.servers:
            for n in args.counts:
                addrs = args.source_addrs or max(1, math.ceil((n + WARMUP) / 20_000))
                print(f"{kind}: opening {n} connections ...", flush=True)
                result = await measure(
                    kind,
                    n,
                    auth_url,
                    args.concurrency,
                    addrs,
                    args.tracemalloc,
                    args.tm_lines,
                    dict(args.gateway_set),
                )
                print(
                    f"  {result.opened} open, RSS {result.rss_before_kb / 1024:.1f} -> "
                    f"{result.rss_after_kb / 1024:.1f} MiB, {result.kb_per_conn:.2f} KB/conn, "
                    f"connected in {result.connect_s:.1f} s",
                    flush=True,
                )
                results.append(result)
    finally:
        await auth.stop()
    return results


def report(results: list[Result], args: argparse.Namespace) -> None:
    print()
    print(
        f"idle connections — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}, uvloop"
    )
    header = (
        f"{'server':<12} {'N':>6} {'open':>6} {'RSS before':>11} {'RSS after':>10} "
        f"{'KB/conn':>8} {'connect':>8} {'conn/s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.server:<12} {r.n:>6} {r.opened:>6} {r.rss_before_kb / 1024:>9.1f}Mi "
            f"{r.rss_after_kb / 1024:>8.1f}Mi {r.kb_per_conn:>8.2f} {r.connect_s:>7.1f}s "
            f"{r.opened / r.connect_s if r.connect_s else 0:>7.0f}"
        )
    raw = {r.n: r.kb_per_conn for r in results if r.server == "raw-aiohttp"}
    for r in results:
        if r.server == "gateway":
            verdict = "OK" if r.kb_per_conn <= GOAL_KB else "OVER GOAL"
            extra = ""
            if r.n in raw:
                extra = (
                    f", raw aiohttp {raw[r.n]:.2f} -> gateway overhead "
                    f"{r.kb_per_conn - raw[r.n]:.2f} KB/conn"
                )
            print(
                f"gateway N={r.n}: {r.kb_per_conn:.2f} KB/conn (goal <= {GOAL_KB:.0f}: "
                f"{verdict}){extra}"
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([asdict(r) for r in results], fh, indent=2)


def _setting(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--counts", default="5000,10000", type=lambda s: [int(x) for x in s.split(",")]
    )
    parser.add_argument(
        "--servers", default="raw-aiohttp,gateway", type=lambda s: [x.strip() for x in s.split(",")]
    )
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument(
        "--source-addrs",
        type=int,
        default=0,
        help="127.0.0.1..127.0.0.K as client addresses (0: 1 per 20k conns)",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="print the allocation sites per connection (RSS is inflated)",
    )
    parser.add_argument(
        "--tm-lines", type=int, default=25, help="allocation sites to print with --tracemalloc"
    )
    parser.add_argument(
        "--gateway-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        type=_setting,
        help="extra GatewaySettings field for the gateway, e.g. ws_keepalive_interval_seconds=0",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    for kind in args.servers:
        if kind not in ("gateway", "raw-aiohttp"):
            parser.error(f"unknown server {kind!r}")
    try:
        results = run(lambda: amain(args))
    finally:
        kill_children()
    report(results, args)


if __name__ == "__main__":
    main()
