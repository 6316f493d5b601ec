"""Offline-path benchmark: gateway memory, sender ack, backlog drain, consumer, pull hook.

    python -m bench.offline                              # all five parts, ~8 min
    python -m bench.offline --only consumer,pull         # some parts
    python -m bench.offline --only consumer --cprofile   # with a backend profile

Real parts throughout: a single-node Kafka broker (``tests.support.kafka``, jars via
``scripts/kafka-fetch``), a private PostgreSQL server (``tests.support.postgres``), the
gateway in its own process (``bench._gateway_proc``), the reference backend with its
PostgreSQL store and Kafka consumer in its own process (``bench._offline_backend``).
This process is the orchestrator and the load (MICS SDK clients, hook requests); it
starts the broker and the database once and every other process per part, and stops
what it started whatever happens.

Parts (``--only``):

1. ``rss``: gateway VmRSS growth while 100k messages go to offline users (1000 users x
   100), notify_pull (events to Kafka, the backend stores them in PostgreSQL) versus
   legacy (in-memory buffer, caps raised so that everything fits), once with the
   gateway's msg_id dedup cache at its default size and once with it off
   (``--rss-dedup``); goal: notify_pull's growth <= 5% of legacy's.
2. ``ack``: sender ack latency, offline recipient (notify_pull: the ack waits for the
   broker's confirmation) versus online recipient, interleaved in one run, per Kafka
   ``linger.ms`` (``--ack-linger-ms``); goal: p99 offline / online <= 1.5. Then the
   msg/s of one sender with 32 messages in flight, to online and to offline users.
3. ``drain``: ConnectAck to a 1000-message backlog pulled from PostgreSQL, delivered,
   confirmed with v1.1 receipts and committed (/ack-offline-messages; seen in the
   backend's ``offline_message_delivered_total{via="ack"}``), per SDK receipt
   interval; goal < 0.5 s.
4. ``consumer``: one backend consumer storing pre-produced signed OFFLINE_MESSAGE
   events into PostgreSQL, per consumer batch size; goal >= 20k msg/s. Then the
   produce -> stored latency of single events on a topic whose other partitions are
   idle, with the consumer as shipped and with its lag refresh off.
5. ``pull``: /get-offline-messages latency at a fixed request rate (open loop, latency
   from the scheduled send time), 100-message pages, mixed cursors, at 1000 req/s
   (goal p99 < 20 ms) and at 150 req/s for reference.

Before every measured run the benchmark waits for a quiet machine (``--quiet-wait``,
see ``bench.throughput.wait_quiet``); runs are repeated and all of them are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from array import array
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]
from confluent_kafka import KafkaError, Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from tests.support.kafka import KafkaBroker
from tests.support.postgres import PostgresServer, child_pids

from bench._auth import AuthServer
from bench._common import (
    Child,
    cpu_seconds,
    kill_children,
    machine_cpu_seconds,
    percentile,
    print_profile,
    raise_nofile,
    run,
    stop_all,
    wait_rss_stable,
)
from bench.throughput import wait_quiet
from mics.backend.consumer import group_id_for
from mics.backend.cursor import encode_cursor
from mics.client import ClientOptions, MicsClient
from mics.events.bus import topic_for
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_event, sign_hook_request

PARTS = ("rss", "ack", "drain", "consumer", "pull")
SECRET = "bench-offline-secret"
PROTOBUF = "application/protobuf"

RSS_GOAL = 0.05
ACK_RATIO_GOAL = 1.5
DRAIN_GOAL_S = 0.5
CONSUMER_GOAL = 20_000
PULL_P99_GOAL_MS = 20.0
STORE_LAG_GOAL_MS = 100.0


@dataclass
class Row:
    """One line of the summary table (the docs/benchmarks.md table)."""

    measure: str
    result: str
    goal: str
    met: bool | None
    command: str


@dataclass
class Infra:
    broker: KafkaBroker | None
    pg: PostgresServer | None
    databases: list[str] = field(default_factory=list)

    def kafka(self) -> str:
        assert self.broker is not None
        return self.broker.bootstrap

    def new_database(self, prefix: str) -> tuple[str, str]:
        """A fresh empty database: (SQLAlchemy URL, asyncpg DSN)."""
        assert self.pg is not None
        name = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.pg.create_database(name)
        self.databases.append(name)
        return self.pg.async_url_for(name), self.pg.dsn_for(name)

    def drop_databases(self) -> None:
        if self.pg is None or not self.pg.running:
            return
        for name in self.databases:
            with contextlib.suppress(Exception):
                self.pg.drop_database(name)
        self.databases.clear()


# -- small shared pieces ----------------------------------------------------------------------


class ModeAuthServer(AuthServer):
    """``bench._auth`` (/auth without message hooks) for one offline mode, handing the
    gateway the tenant secret its OFFLINE_MESSAGE events are signed with."""

    def __init__(self, offline_mode: str) -> None:
        super().__init__()
        self._config.offline_mode = offline_mode
        self._config.tenant_secret = SECRET


def new_client(
    ws_url: str,
    tenant: str,
    user: str,
    *,
    receipt_interval_s: float = 0.2,
    on_delivery: Callable[[msg_pb.MessageRequest], None] | None = None,
) -> MicsClient:
    options = ClientOptions(
        url=ws_url,
        tenant_id=tenant,
        token=user,
        device_id="d0",
        reconnect=False,
        heartbeat_interval_s=0,
        ack_timeout_s=30,
        receipt_interval_s=receipt_interval_s,
    )
    return MicsClient(options, on_delivery=on_delivery or (lambda _m: None))


def ack_label(ack: msg_pb.MessageAck) -> str:
    return f"{msg_pb.AckStatus.Name(ack.status)}/{ack.reason or '-'}"


async def send_all(
    senders: Sequence[MicsClient], targets: Sequence[str], body: bytes, window: int
) -> Counter[str]:
    """Send one message to every target, spread over the senders, each keeping
    ``window`` un-acked; returns the ack labels (status/reason) counted."""
    labels: Counter[str] = Counter()

    async def worker(sender: MicsClient, mine: Iterator[str]) -> None:
        for to in mine:
            labels[ack_label(await sender.send_single(to, body))] += 1

    tasks: list[Coroutine[Any, Any, None]] = []
    for i, sender in enumerate(senders):
        mine = iter(targets[i :: len(senders)])
        tasks.extend(worker(sender, mine) for _ in range(window))
    await asyncio.gather(*tasks)
    return labels


async def connect_all(clients: Sequence[MicsClient]) -> None:
    await asyncio.gather(*(c.connect() for c in clients))


async def close_all(clients: Sequence[MicsClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def scrape(port: int) -> dict[str, float]:
    """Every sample of a /metrics page: ``name{labels}`` -> value."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def metric_sum(samples: dict[str, float], name: str) -> float:
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def histogram_between(
    before: dict[str, float], after: dict[str, float], name: str
) -> tuple[float, float, list[tuple[float, float]]]:
    """Count, sum and cumulative (upper bound, count) buckets of an unlabelled
    histogram's observations between two scrapes."""

    def grown(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    buckets = []
    for key in after:
        if key.startswith(f'{name}_bucket{{le="'):
            bound = key[len(f'{name}_bucket{{le="') : -2]
            buckets.append((float(bound), grown(key)))
    return grown(f"{name}_count"), grown(f"{name}_sum"), sorted(buckets)


def bucket_quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float:
    """The upper bound of the bucket holding the q-quantile (inf past the last)."""
    for bound, cumulative in buckets:
        if cumulative >= q * count:
            return bound
    return float("inf")


async def wait_events_flushed(port: int, timeout_s: float = 60.0) -> None:
    """Until the gateway's event queue (``mics_kafka_queue_depth``) is empty."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if metric_sum(await scrape(port), "mics_kafka_queue_depth") <= 0:
            return
        await asyncio.sleep(0.05)
    print("  WARNING: gateway events still queued", flush=True)


def postgres_cpu(pg: PostgresServer | None) -> float:
    """CPU seconds of the whole PostgreSQL server: the postmaster, its live children
    (sessions, background workers) and its exited children (reaped by the postmaster:
    its cutime + cstime), so that sessions ending mid-run still count."""
    if pg is None or pg.pid is None:
        return 0.0
    total = 0.0
    with contextlib.suppress(OSError):
        with open(f"/proc/{pg.pid}/stat", encoding="ascii") as fh:
            data = fh.read()
        fields = data[data.rindex(")") + 2 :].split()
        total += (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")
    for pid in [pg.pid, *child_pids(pg.pid)]:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


class CpuMeter:
    """CPU use of named processes and of the rest of the machine over an interval."""

    def __init__(self, pids: dict[str, int], pg: PostgresServer | None = None) -> None:
        self.pids = pids
        self.pg = pg
        self._t0 = time.monotonic()
        self.wall = 0.0
        self._start = self._read()

    def _read(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, pid in self.pids.items():
            try:
                values[name] = cpu_seconds(pid)
            except OSError:
                values[name] = 0.0
        if self.pg is not None:
            values["postgres"] = postgres_cpu(self.pg)
        values["_machine"] = machine_cpu_seconds()
        return values

    def stop(self) -> dict[str, float]:
        """% of one CPU per process since construction, plus ``other``."""
        end = self._read()
        wall = self.wall = max(1e-9, time.monotonic() - self._t0)
        pct = {k: 100 * (end[k] - self._start[k]) / wall for k in end if k != "_machine"}
        machine = 100 * (end["_machine"] - self._start["_machine"]) / wall
        pct["other"] = max(0.0, machine - sum(pct.values()))
        return pct


def fmt_cpu(pct: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f}%" for k, v in pct.items())


def offline_request(tenant: str, sender: str, to: str, msg_id: str, body: bytes) -> bytes:
    """A normalized MessageRequest as the gateway puts it into OFFLINE_MESSAGE events."""
    return msg_pb.MessageRequest(
        tenant_id=tenant,
        user_id=sender,
        device_id="d0",
        msg_id=msg_id,
        msg_type=msg_pb.SINGLE_CHAT,
        to_user_id=to,
        msg_body=body,
        timestamp_ms=int(time.time() * 1000),
    ).SerializeToString()


async def seed_rows(dsn: str, tenant: str, users: int, per_user: int, body: bytes) -> None:
    """Stored, undelivered rows (COPY; user after user, so each user's ids are
    contiguous), as the consumer would have stored them. The schema must exist."""
    now = int(time.time() * 1000)
    records = []
    for u in range(users):
        user = f"u{u}"
        for i in range(per_user):
            sender, msg_id = f"s{i % 10}", f"seed-{u}-{i}"
            data = offline_request(tenant, sender, user, msg_id, body)
            records.append((tenant, user, sender, msg_id, "d0", 1, "", data, 0, now + i, False))
    conn = await asyncpg.connect(dsn)
    try:
        await conn.copy_records_to_table(
            "offline_messages",
            records=records,
            columns=[
                "tenant_id", "user_id", "from_user_id", "message_id", "device_id",
                "message_type", "group_id", "message_data", "priority", "created_at",
                "delivered",
            ],
        )  # fmt: skip
        await conn.execute("ANALYZE offline_messages")
    finally:
        await conn.close()


async def query_value(dsn: str, sql: str, *params: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *params)
    finally:
        await conn.close()


def offline_linger_setting(args: argparse.Namespace) -> dict[str, int]:
    """The gateway setting for ``--offline-linger-ms``, if given."""
    if args.offline_linger_ms is None:
        return {}
    return {"kafka_offline_linger_ms": args.offline_linger_ms}


def backend_arg(tenant: str, database_url: str, **extra: Any) -> dict[str, Any]:
    return {"database_url": database_url, "tenant": tenant, "secret": SECRET, **extra}


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# -- 1. gateway RSS with 100k pending offline messages ------------------------------------------


@dataclass
class RssRun:
    mode: str
    before_kb: int
    after_kb: int
    seconds: float
    acks: Counter[str]
    counters: dict[str, float]
    stored: float | None
    gateway_cpu_s: float = 0.0  # CPU seconds of the gateway while the messages were sent

    @property
    def growth_kb(self) -> int:
        return self.after_kb - self.before_kb


async def rss_run(mode: str, dedup: int, args: argparse.Namespace, infra: Infra) -> RssRun:
    """One fresh gateway (and, for notify_pull, backend); ``dedup``: the gateway's
    DEDUP_MAX_ENTRIES (0: its default)."""
    tenant = f"rss{mode[:2]}{uuid.uuid4().hex[:6]}"
    total = args.rss_users * args.rss_per_user
    body = b"x" * args.rss_body
    auth = ModeAuthServer(mode)
    auth_url = await auth.start()
    children: list[Child | None] = []
    clients: list[MicsClient] = []
    try:
        backend: Child | None = None
        if mode == "notify_pull":
            url, _ = infra.new_database("rss")
            backend = Child(
                "backend",
                "bench._offline_backend",
                backend_arg(tenant, url, kafka=infra.kafka()),
            )
            children.append(backend)
            await backend.start(60)
        gateway = Child(
            "gateway",
            "bench._gateway_proc",
            {
                "tenant_auth_map": {tenant: auth_url},
                "tenant_hook_secrets": {tenant: SECRET},
                "hook_queue_timeout_ms": 5000,  # /auth only, while connecting
                "hook_timeout_ms": 5000,
                "kafka_bootstrap_servers": infra.kafka(),
                **(
                    {"kafka_linger_ms": args.rss_linger_ms}
                    if args.rss_linger_ms is not None
                    else {}
                ),
                **offline_linger_setting(args),
                "offline_buffer_max_messages_per_user": 10 * args.rss_per_user,
                "offline_buffer_max_bytes_per_user": 256 * 1024 * 1024,
                "offline_buffer_max_users_per_tenant": 10 * args.rss_users,
                **({"dedup_max_entries": dedup} if dedup else {}),
            },
        )
        children.append(gateway)
        port = int((await gateway.start(60))["port"])
        ws_url = f"ws://127.0.0.1:{port}/ws"
        clients = [new_client(ws_url, tenant, f"s{i}") for i in range(args.rss_senders)]
        await connect_all(clients)
        # Warm-up: code paths, producer buffers, metric children, buffer structures.
        warm = [f"w{i % 100}" for i in range(args.rss_warmup)]
        await send_all(clients, warm, body, args.rss_window)
        await wait_events_flushed(port)

        async def gateway_rss() -> int:
            return int((await gateway.command("gc"))["rss_kb"])

        before = await wait_rss_stable(gateway_rss)
        targets = [f"u{j % args.rss_users}" for j in range(total)]
        t0 = time.monotonic()
        cpu0 = cpu_seconds(gateway.pid)
        acks = await send_all(clients, targets, body, args.rss_window)
        seconds = time.monotonic() - t0
        gateway_cpu_s = cpu_seconds(gateway.pid) - cpu0
        await wait_events_flushed(port)
        after = await wait_rss_stable(gateway_rss)
        samples = await scrape(port)
        counters = {
            name: metric_sum(samples, name)
            for name in (
                "mics_offline_notified_total",
                "mics_offline_buffered_total",
                "mics_offline_buffer_messages",
                "mics_mq_published_total",
                "mics_mq_dropped_total",
            )
        }
        stored = None
        if backend is not None:
            answer = await backend.command(
                "wait_counter", 130, name="stored", count=total + len(warm), timeout=120, poll_ms=50
            )
            stored = float(answer["value"])
        return RssRun(mode, before, after, seconds, acks, counters, stored, gateway_cpu_s)
    finally:
        await close_all(clients)
        await stop_all(list(reversed(children)))
        await auth.stop()


async def part_rss(args: argparse.Namespace, infra: Infra) -> list[Row]:
    total = args.rss_users * args.rss_per_user
    print(
        f"\n== 1. gateway RSS, {total:,} messages to {args.rss_users:,} offline users "
        f"({args.rss_body}-byte bodies, {args.rss_senders} senders x window {args.rss_window})",
        flush=True,
    )
    rows: list[Row] = []
    # The gateway's msg_id dedup cache (protocol.md 9.7) keeps every message's key for
    # 10 minutes whatever its recipient: 0 = its default size; 1 = off, which leaves
    # only what the offline path itself keeps.
    for dedup in args.rss_dedup:
        variant = "dedup cache default" if not dedup else f"DEDUP_MAX_ENTRIES={dedup}"
        runs: dict[str, list[RssRun]] = {}
        for mode in ("notify_pull", "legacy"):
            for rep in range(args.repeat_rss):
                await wait_quiet(args.quiet_wait)
                r = await rss_run(mode, dedup, args, infra)
                runs.setdefault(mode, []).append(r)
                extra = "" if r.stored is None else f", backend stored {r.stored:,.0f} rows"
                print(
                    f"  {variant}, {mode:<11} run {rep + 1}: RSS {r.before_kb / 1024:.1f} -> "
                    f"{r.after_kb / 1024:.1f} MiB = {r.growth_kb / 1024:+.1f} MiB "
                    f"({r.growth_kb * 1024 / total:.0f} B/msg); sent in {r.seconds:.1f} s "
                    f"({total / r.seconds:,.0f} msg/s; gateway CPU "
                    f"{100 * r.gateway_cpu_s / r.seconds:.0f}%, "
                    f"{1e6 * r.gateway_cpu_s / total:.0f} us/msg){extra}",
                    flush=True,
                )
                print(
                    "    acks: "
                    + ", ".join(f"{k} {v:,}" for k, v in sorted(r.acks.items()))
                    + "; gateway: "
                    + ", ".join(f"{k} {v:,.0f}" for k, v in r.counters.items())
                )
        best = {mode: min(rs, key=lambda r: r.growth_kb) for mode, rs in runs.items()}
        np_growth = best["notify_pull"].growth_kb
        legacy_growth = best["legacy"].growth_kb
        ratio = np_growth / legacy_growth if legacy_growth > 0 else float("nan")
        met = ratio <= RSS_GOAL
        print(
            f"  {variant}: notify_pull {np_growth / 1024:+.1f} MiB, legacy "
            f"{legacy_growth / 1024:+.1f} MiB; ratio {100 * ratio:.1f}% (goal <= "
            f"{100 * RSS_GOAL:.0f}%: {'OK' if met else 'MISSED'})"
        )
        rows.append(
            Row(
                f"gateway RSS growth, {total // 1000}k msgs ({args.rss_body} B) to offline "
                f"users, notify_pull vs legacy, {variant}",
                f"{np_growth / 1024:+.1f} MiB vs {legacy_growth / 1024:+.1f} MiB "
                f"= {100 * ratio:.1f}%",
                f"<= {100 * RSS_GOAL:.0f}% of legacy",
                met,
                f"python -m bench.offline --only rss --rss-dedup {dedup}",
            )
        )
    return rows


# -- 2. sender ack latency, offline vs online recipient -----------------------------------------


@dataclass
class AckRun:
    online_ms: list[float]
    offline_ms: list[float]
    labels: Counter[str]

    def p(self, which: str, q: float) -> float:
        return percentile(getattr(self, f"{which}_ms"), q)

    @property
    def count(self) -> int:
        return len(self.online_ms) + len(self.offline_ms)

    @property
    def ratio(self) -> float:
        return self.p("offline", 0.99) / self.p("online", 0.99)


async def ack_pairs(senders: Sequence[MicsClient], body: bytes, per_sender: int) -> AckRun:
    """Each sender alternates: one message to its online peer, one to its offline peer,
    each awaited (one message in flight per sender)."""
    online: list[float] = []
    offline: list[float] = []
    labels: Counter[str] = Counter()

    async def one(i: int, sender: MicsClient) -> None:
        for _ in range(per_sender):
            for peer, out in ((f"r{i}", online), (f"o{i}", offline)):
                t0 = time.perf_counter()
                ack = await sender.send_single(peer, body)
                out.append((time.perf_counter() - t0) * 1000)
                labels[f"{peer[0]}:{ack_label(ack)}"] += 1

    await asyncio.gather(*(one(i, s) for i, s in enumerate(senders)))
    return AckRun(sorted(online), sorted(offline), labels)


async def part_ack(args: argparse.Namespace, infra: Infra) -> list[Row]:
    k = args.ack_senders
    print(
        f"\n== 2. sender ack latency, notify_pull: {k} senders, each alternating online / "
        f"offline recipient, 1 message in flight per sender, {args.ack_messages:,} messages "
        "per kind per run",
        flush=True,
    )
    rows: list[Row] = []
    body = b"y" * 100
    offline_linger = args.offline_linger_ms
    for linger in args.ack_linger_ms:
        label = f"linger.ms={linger}"
        cmd = f"python -m bench.offline --only ack --ack-linger-ms {linger}"
        if offline_linger is not None:
            label += f" (offline producer {offline_linger})"
            cmd += f" --offline-linger-ms {offline_linger}"
        tenant = f"ack{linger}x{uuid.uuid4().hex[:6]}"
        auth = ModeAuthServer("notify_pull")
        auth_url = await auth.start()
        children: list[Child | None] = []
        clients: list[MicsClient] = []
        runs: list[AckRun] = []
        try:
            gateway = Child(
                "gateway",
                "bench._gateway_proc",
                {
                    "tenant_auth_map": {tenant: auth_url},
                    "tenant_hook_secrets": {tenant: SECRET},
                    "hook_queue_timeout_ms": 5000,
                    "hook_timeout_ms": 5000,
                    "kafka_bootstrap_servers": infra.kafka(),
                    "kafka_linger_ms": linger,
                    **offline_linger_setting(args),
                },
            )
            children.append(gateway)
            port = int((await gateway.start(60))["port"])
            ws_url = f"ws://127.0.0.1:{port}/ws"
            receivers = [new_client(ws_url, tenant, f"r{i}") for i in range(k)]
            senders = [new_client(ws_url, tenant, f"s{i}") for i in range(k)]
            clients = receivers + senders
            await connect_all(clients)
            await ack_pairs(senders, body, 50)  # warm-up (topic metadata, producer id)
            for rep in range(args.repeat_ack):
                await wait_quiet(args.quiet_wait)
                before = await scrape(port)
                meter = CpuMeter({"gateway": gateway.pid, "load": os.getpid()})
                r = await ack_pairs(senders, body, max(1, args.ack_messages // k))
                cpu = meter.stop()
                runs.append(r)
                n, total, buckets = histogram_between(
                    before, await scrape(port), "mics_offline_notify_wait_ms"
                )
                print(
                    f"  {label} run {rep + 1}: online p50/p99 "
                    f"{r.p('online', 0.5):.2f}/{r.p('online', 0.99):.2f} ms, offline p50/p99 "
                    f"{r.p('offline', 0.5):.2f}/{r.p('offline', 0.99):.2f} ms, "
                    f"p99 ratio {r.ratio:.2f}; CPU: {fmt_cpu(cpu)}; gateway "
                    f"{cpu['gateway'] / 100 * meter.wall * 1e6 / r.count:.0f} us/msg at "
                    f"{r.count / meter.wall:,.0f} msg/s",
                    flush=True,
                )
                if n:
                    # The part of the offline ack spent waiting for the broker, as the
                    # gateway measured it (mics_offline_notify_wait_ms).
                    print(
                        f"    of which waiting for the broker's confirmation: mean "
                        f"{total / n:.2f} ms, p50 <= {bucket_quantile(buckets, n, 0.5):g} ms, "
                        f"p99 <= {bucket_quantile(buckets, n, 0.99):g} ms (histogram buckets)",
                        flush=True,
                    )
                unexpected = {
                    key: n
                    for key, n in r.labels.items()
                    if key not in ("r:SENT/-", "o:SENT/user_offline")
                }
                if unexpected:
                    print(f"    WARNING: unexpected acks {unexpected}")
            # Unloaded: one sender, one message in flight, nothing else running through
            # the gateway. No queueing: what is left is each path's own latency.
            await wait_quiet(args.quiet_wait)
            alone = await ack_pairs(senders[:1], body, args.ack_unloaded_messages)
            print(
                f"  {label}, unloaded (one sender, one in flight): online p50/p99 "
                f"{alone.p('online', 0.5):.2f}/{alone.p('online', 0.99):.2f} ms, offline "
                f"p50/p99 {alone.p('offline', 0.5):.2f}/{alone.p('offline', 0.99):.2f} ms, "
                f"p99 ratio {alone.ratio:.2f}",
                flush=True,
            )
            single = await single_sender(senders[0], k, body, args.ack_single_messages)
        finally:
            await close_all(clients)
            await stop_all(list(reversed(children)))
            await auth.stop()
        best = min(runs, key=lambda r: r.p("offline", 0.99))
        met = best.ratio <= ACK_RATIO_GOAL
        print(
            f"  {label} best (lowest offline p99): p99 offline "
            f"{best.p('offline', 0.99):.2f} ms / online {best.p('online', 0.99):.2f} ms = "
            f"{best.ratio:.2f} (goal <= {ACK_RATIO_GOAL}: {'OK' if met else 'MISSED'}); "
            "all runs: " + ", ".join(f"{r.ratio:.2f}" for r in runs)
        )
        rows.append(
            Row(
                f"sender ack p50/p99, offline (notify_pull) vs online, {label}",
                f"offline {best.p('offline', 0.5):.2f}/{best.p('offline', 0.99):.2f} ms, "
                f"online {best.p('online', 0.5):.2f}/{best.p('online', 0.99):.2f} ms; "
                f"p99 ratio {best.ratio:.2f}",
                f"p99 ratio <= {ACK_RATIO_GOAL}",
                met,
                cmd,
            )
        )
        rows.append(
            Row(
                f"sender ack p50/p99 unloaded (one sender, one in flight), {label}",
                f"offline {alone.p('offline', 0.5):.2f}/{alone.p('offline', 0.99):.2f} ms, "
                f"online {alone.p('online', 0.5):.2f}/{alone.p('online', 0.99):.2f} ms; "
                f"p99 ratio {alone.ratio:.2f}",
                "- (finding)",
                None,
                cmd,
            )
        )
        on, off = single["online"], single["offline"]
        print(
            f"  {label}, one sender with 32 messages in flight: {on:,.0f} msg/s to "
            f"online recipients, {off:,.0f} msg/s to offline recipients"
        )
        rows.append(
            Row(
                f"one sender, 32 in flight, {label}: msg/s to online vs offline",
                f"{on:,.0f} vs {off:,.0f} msg/s",
                "- (finding)",
                None,
                cmd,
            )
        )
    return rows


async def single_sender(sender: MicsClient, k: int, body: bytes, count: int) -> dict[str, float]:
    """msg/s of one connection keeping 32 messages in flight, to online peers (r*) and to
    offline users (fresh ids). A connection's messages are processed in order (protocol
    section 9.9), and an offline message's turn lasts until the broker confirmed it."""
    rates: dict[str, float] = {}
    for kind, targets in (
        ("online", [f"r{i % k}" for i in range(10 * count)]),
        ("offline", [f"solo{i}" for i in range(count)]),
    ):
        t0 = time.monotonic()
        labels = await send_all([sender], targets, body, 32)
        rates[kind] = len(targets) / (time.monotonic() - t0)
        if sum(n for key, n in labels.items() if key.startswith("SENT")) != len(targets):
            print(f"    WARNING: single sender {kind}: {dict(labels)}")
    return rates


# -- 3. backlog drain: ConnectAck -> 1000 messages delivered and committed ----------------------


@dataclass
class DrainRun:
    delivered_s: float
    committed_s: float
    deliveries: int
    syncs: int
    pending_after: int


async def drain_run(
    ws_url: str, tenant: str, user: str, backend: Child, backlog: int, receipt_s: float,
    acked_before: float,
) -> DrainRun:  # fmt: skip
    loop = asyncio.get_running_loop()
    all_delivered = loop.create_future()
    count = 0

    def on_delivery(_m: msg_pb.MessageRequest) -> None:
        nonlocal count
        count += 1
        if count == backlog and not all_delivered.done():
            all_delivered.set_result(time.monotonic())

    client = new_client(ws_url, tenant, user, receipt_interval_s=receipt_s, on_delivery=on_delivery)
    backend.send("wait_counter", name="acked", count=acked_before + backlog, timeout=30)
    try:
        await client.connect()
        t_ack = time.monotonic()
        delivered_t = await asyncio.wait_for(all_delivered, 30)
        committed = await backend.reply(40)
        if not committed["reached"]:
            print(f"  WARNING: commit not seen: {committed}")
        await asyncio.sleep(0.05)  # late duplicates, if any, would show up in the count
    finally:
        await client.close()
    pending = int((await backend.command("pending", user=user))["pending"])
    return DrainRun(
        delivered_t - t_ack,
        float(committed["done_t"]) - t_ack,
        client.stats.deliveries,
        client.stats.offline_syncs,
        pending,
    )


async def part_drain(args: argparse.Namespace, infra: Infra) -> list[Row]:
    backlog = args.drain_backlog
    runs_per = args.repeat_drain
    settings = args.drain_receipt_ms
    print(
        f"\n== 3. backlog drain: ConnectAck -> {backlog:,} stored messages pulled "
        "(/get-offline-messages, PostgreSQL), delivered, receipted (v1.1) and committed "
        f"(/ack-offline-messages), {runs_per} runs per receipt interval",
        flush=True,
    )
    tenant = f"drain{uuid.uuid4().hex[:6]}"
    users = runs_per * len(settings)
    url, dsn = infra.new_database("drain")
    rows: list[Row] = []
    children: list[Child | None] = []
    try:
        backend = Child("backend", "bench._offline_backend", backend_arg(tenant, url, users=users))
        children.append(backend)
        await backend.start(60)
        await seed_rows(dsn, tenant, users, backlog, b"z" * 100)
        gateway = Child(
            "gateway",
            "bench._gateway_proc",
            {
                "tenant_auth_map": {tenant: backend.ready["url"]},
                "tenant_hook_secrets": {tenant: SECRET},
                "hook_sign_required": True,
                "event_bus": "none",
            },
        )
        children.append(gateway)
        port = int((await gateway.start(60))["port"])
        ws_url = f"ws://127.0.0.1:{port}/ws"
        acked = 0.0
        user_ids = iter(range(users))
        for receipt_ms in settings:
            runs: list[DrainRun] = []
            await wait_quiet(args.quiet_wait)  # once: a run takes well under a second
            for rep in range(runs_per):
                await asyncio.sleep(0.2)
                user = f"u{next(user_ids)}"
                r = await drain_run(
                    ws_url, tenant, user, backend, backlog, receipt_ms / 1000, acked
                )
                acked += backlog
                runs.append(r)
                problems = []
                if r.deliveries != backlog:
                    problems.append(f"{r.deliveries} deliveries")
                if r.pending_after:
                    problems.append(f"{r.pending_after} rows still pending")
                if r.syncs != 1:
                    problems.append(f"{r.syncs} OfflineSync frames")
                print(
                    f"  receipts every {receipt_ms} ms, run {rep + 1}: delivered "
                    f"{ms(r.delivered_s)}, committed {ms(r.committed_s)} after ConnectAck"
                    + (f"  WARNING: {', '.join(problems)}" if problems else ""),
                    flush=True,
                )
            committed = sorted(r.committed_s for r in runs)
            delivered = sorted(r.delivered_s for r in runs)
            median, worst = statistics.median(committed), committed[-1]
            met = worst < DRAIN_GOAL_S
            print(
                f"  receipts every {receipt_ms} ms: committed median {ms(median)}, worst "
                f"{ms(worst)}; delivered median {ms(statistics.median(delivered))}, worst "
                f"{ms(delivered[-1])} (goal < {DRAIN_GOAL_S} s: {'OK' if met else 'MISSED'})"
            )
            rows.append(
                Row(
                    f"ConnectAck -> {backlog:,}-msg backlog delivered + committed "
                    f"(SDK receipt interval {receipt_ms} ms)",
                    f"median {ms(median)}, worst {ms(worst)} (last delivery: median "
                    f"{ms(statistics.median(delivered))})",
                    f"< {DRAIN_GOAL_S} s",
                    met,
                    f"python -m bench.offline --only drain --drain-receipt-ms {receipt_ms}",
                )
            )
    finally:
        await stop_all(list(reversed(children)))
    return rows


# -- 4. consumer throughput into PostgreSQL -----------------------------------------------------


def produce_events(bootstrap: str, tenant: str, count: int, users: int, body: bytes) -> float:
    """Produce ``count`` signed OFFLINE_MESSAGE events (key = recipient); seconds taken."""
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "compression.type": "lz4",
            "linger.ms": 20,
            "queue.buffering.max.messages": 1_000_000,
            "queue.buffering.max.kbytes": 1_048_576,
        }
    )
    errors: list[KafkaError] = []

    def on_delivery(error: KafkaError | None, _msg: Message) -> None:
        if error is not None:
            errors.append(error)

    topic = topic_for(tenant)
    started = time.monotonic()
    now = int(time.time() * 1000)
    for i in range(count):
        to, sender, msg_id = f"u{i % users}", f"s{i % 10}", f"m{i}"
        event = hook_pb.MqEvent(
            tenant_id=tenant,
            event_type=hook_pb.OFFLINE_MESSAGE,
            msg_id=msg_id,
            user_id=sender,
            device_id="d0",
            to_user_id=to,
            event_data=offline_request(tenant, sender, to, msg_id, body),
            timestamp=now,
            node_id="bench",
        )
        sign_event(event, SECRET)
        producer.produce(
            topic, value=event.SerializeToString(), key=to.encode(), on_delivery=on_delivery
        )
        if i % 1000 == 999:
            producer.poll(0)
    if producer.flush(120) or errors:
        raise RuntimeError(f"producing failed: {len(errors)} errors, e.g. {errors[:1]}")
    return time.monotonic() - started


def create_topic(bootstrap: str, tenant: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(topic_for(tenant), num_partitions=partitions, replication_factor=1)
    for future in admin.create_topics([topic]).values():
        future.result(30)


def forget_group(bootstrap: str, group: str) -> None:
    """Delete the consumer group (its committed offsets), so the next run reads the topic
    from the start. The group must be empty: retried while the last member leaves."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for _ in range(50):
        try:
            admin.delete_consumer_groups([group], request_timeout=10)[group].result(15)
            return
        except Exception as exc:  # not found: never committed; non-empty: still leaving
            if "GROUP_ID_NOT_FOUND" in str(exc) or "does not exist" in str(exc):
                return
            time.sleep(0.2)
    raise RuntimeError(f"could not delete consumer group {group}")


def produce_one(producer: Producer, topic: str, tenant: str, index: int) -> None:
    """Produce one signed OFFLINE_MESSAGE (recipient u0) and wait for the broker."""
    msg_id = f"lat{index}"
    event = hook_pb.MqEvent(
        tenant_id=tenant,
        event_type=hook_pb.OFFLINE_MESSAGE,
        msg_id=msg_id,
        user_id="s0",
        device_id="d0",
        to_user_id="u0",
        event_data=offline_request(tenant, "s0", "u0", msg_id, b"l" * 100),
        timestamp=int(time.time() * 1000),
        node_id="bench",
    )
    sign_event(event, SECRET)
    producer.produce(topic, value=event.SerializeToString(), key=b"u0")
    if producer.flush(10):
        raise RuntimeError("event not acknowledged by the broker")


async def store_latency(
    args: argparse.Namespace, infra: Infra, settings: dict[str, Any]
) -> tuple[list[float], int]:
    """Events one at a time (one key, so one partition of many gets traffic): produced,
    then awaited until stored; (sorted produce -> stored latencies in ms, events)."""
    tenant = f"lat{uuid.uuid4().hex[:6]}"
    await asyncio.to_thread(create_topic, infra.kafka(), tenant, args.consumer_partitions)
    url, _ = infra.new_database("lat")
    backend = Child(
        "backend",
        "bench._offline_backend",
        backend_arg(tenant, url, kafka=infra.kafka(), consumer_settings=settings),
    )
    producer = Producer({"bootstrap.servers": infra.kafka(), "linger.ms": 0, "acks": "all"})
    topic = topic_for(tenant)
    latencies: list[float] = []
    try:
        await backend.start(60)
        # The first event waits for the group join and the partition assignment.
        await asyncio.to_thread(produce_one, producer, topic, tenant, 0)
        await backend.command("wait_counter", 70, name="stored", count=1, timeout=60)
        index = 1
        deadline = time.monotonic() + args.consumer_latency_s
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            await asyncio.to_thread(produce_one, producer, topic, tenant, index)
            index += 1
            answer = await backend.command(
                "wait_counter", 90, name="stored", count=index, timeout=60, poll_ms=1
            )
            latencies.append((float(answer["done_t"]) - t0) * 1000)
            await asyncio.sleep(0.05)
    finally:
        await backend.stop()
        infra.drop_databases()
    return sorted(latencies), len(latencies)


async def part_consumer_latency(args: argparse.Namespace, infra: Infra) -> list[Row]:
    rows: list[Row] = []
    for label, settings in (
        ("as shipped (lag refresh every 5 s)", {}),
        ("lag refresh off", {"lag_interval_s": 3600.0}),
    ):
        await wait_quiet(args.quiet_wait)
        lat, n = await store_latency(args, infra, settings)
        p99 = percentile(lat, 0.99)
        met = p99 < STORE_LAG_GOAL_MS
        print(
            f"  produce -> stored, one event at a time, {args.consumer_partitions} partitions "
            f"of which 1 gets traffic, {label}: p50 {percentile(lat, 0.5):.1f} ms, p99 "
            f"{p99:.1f} ms, max {lat[-1]:.1f} ms ({n} events in "
            f"{args.consumer_latency_s:.0f} s)",
            flush=True,
        )
        rows.append(
            Row(
                f"consume lag: produce -> stored, {args.consumer_partitions} partitions "
                f"(31 idle), {label}",
                f"p50 {percentile(lat, 0.5):.1f} ms, p99 {p99:.1f} ms, max {lat[-1]:.1f} ms",
                f"p99 < {STORE_LAG_GOAL_MS:.0f} ms (design 7)",
                met,
                "python -m bench.offline --only consumer",
            )
        )
    return rows


@dataclass
class ConsumerRun:
    batch: int
    rate: float
    stored: int
    complete: bool
    total_s: float
    rows: int
    backend_us_per_msg: float
    cpu: dict[str, float]


async def consumer_run(
    args: argparse.Namespace,
    infra: Infra,
    tenant: str,
    settings: dict[str, Any],
    *,
    cap_s: float = 300.0,
    profile: str = "",
) -> ConsumerRun:
    """Start a backend whose consumer finds the whole topic waiting; time it storing
    everything (or what it stored within ``cap_s``)."""
    count = args.consumer_events
    url, dsn = infra.new_database("cons")
    arg = backend_arg(tenant, url, kafka=infra.kafka(), consumer_settings=settings)
    env = None
    if profile:
        arg["profile_at_start"] = True
        env = {"BENCH_CPROFILE": profile}
    backend = Child("backend", "bench._offline_backend", arg, env=env)
    try:
        started = time.monotonic()
        await backend.start(60)
        pids = {"backend": backend.pid}
        if infra.broker is not None and infra.broker.pid is not None:
            pids["kafka"] = infra.broker.pid
        meter = CpuMeter(pids, infra.pg)
        answer = await backend.command(
            "wait_counter", cap_s + 30, name="stored", count=count, timeout=cap_s, poll_ms=5
        )
        cpu = meter.stop()
        if profile:
            await backend.command("profile_stop", 120)
    finally:
        await backend.stop()
    rows = int(await query_value(dsn, "SELECT count(*) FROM offline_messages"))
    window = float(answer["done_t"]) - float(answer["first_t"])
    stored = float(answer["value"]) - float(answer["first_value"])
    cpu_s = float(answer["done_cpu"]) - float(answer["first_cpu"])
    return ConsumerRun(
        batch=int(settings["batch_size"]),
        rate=stored / window if window > 0 and answer["first_t"] else 0.0,
        stored=int(answer["value"]),
        complete=bool(answer["reached"]),
        total_s=float(answer["done_t"]) - started,
        rows=rows,
        backend_us_per_msg=1e6 * cpu_s / stored if stored else 0.0,
        cpu=cpu,
    )


def print_consumer_run(label: str, r: ConsumerRun, count: int) -> None:
    check = ""
    if not r.complete:
        check = f"  (stopped after {r.total_s:.0f} s: {r.stored:,} of {count:,} stored)"
    elif r.rows != count:
        check = f"  WARNING: {r.rows:,} rows in the database"
    print(
        f"  {label}: {r.rate:,.0f} msg/s (first stored batch to last; {r.total_s:.1f} s from "
        f"backend start), backend {r.backend_us_per_msg:.1f} us CPU/msg; CPU: "
        f"{fmt_cpu(r.cpu)}{check}",
        flush=True,
    )


async def part_consumer(args: argparse.Namespace, infra: Infra) -> list[Row]:
    count = args.consumer_events
    tenant = f"cons{uuid.uuid4().hex[:6]}"
    print(
        f"\n== 4. consumer throughput: {count:,} signed OFFLINE_MESSAGE events "
        f"({args.consumer_users:,} recipients, 100-byte bodies, lz4, {args.consumer_partitions} "
        "partitions) stored into PostgreSQL by one backend consumer",
        flush=True,
    )
    await asyncio.to_thread(create_topic, infra.kafka(), tenant, args.consumer_partitions)
    seconds = await asyncio.to_thread(
        produce_events, infra.kafka(), tenant, count, args.consumer_users, b"c" * 100
    )
    print(f"  produced {count:,} events in {seconds:.1f} s", flush=True)
    rows: list[Row] = []
    group = group_id_for(tenant)

    async def one(settings: dict[str, Any], cap_s: float = 300.0) -> ConsumerRun:
        await asyncio.to_thread(forget_group, infra.kafka(), group)
        await wait_quiet(args.quiet_wait)
        try:
            return await consumer_run(args, infra, tenant, settings, cap_s=cap_s)
        finally:
            infra.drop_databases()

    # As shipped: default batch (500) and lag refresh every 5 s; capped, as the refresh
    # stalls the consumer (see docs/benchmarks.md).
    if args.consumer_shipped_cap > 0:
        r = await one({"batch_size": 500}, args.consumer_shipped_cap)
        print_consumer_run("as shipped (batch 500, lag refresh every 5 s)", r, count)
        rows.append(
            Row(
                "one consumer into PostgreSQL, as shipped (batch 500, lag refresh 5 s)",
                f"{r.rate:,.0f} msg/s"
                + ("" if r.complete else f" ({r.stored:,} stored in {r.total_s:.0f} s)"),
                f">= {CONSUMER_GOAL:,} msg/s",
                r.rate >= CONSUMER_GOAL,
                "python -m bench.offline --only consumer",
            )
        )
    # The batch sweep with the lag refresh deferred past the run (lag_interval_s).
    no_lag = {"lag_interval_s": 3600.0}
    for batch in args.consumer_batches:
        runs: list[ConsumerRun] = []
        for rep in range(args.repeat_consumer):
            r = await one({"batch_size": batch, **no_lag})
            runs.append(r)
            print_consumer_run(f"batch {batch:>5}, no lag refresh, run {rep + 1}", r, count)
        best = max(runs, key=lambda r: r.rate)
        met = best.rate >= CONSUMER_GOAL
        print(
            f"  batch {batch}: best {best.rate:,.0f} msg/s (goal >= {CONSUMER_GOAL:,}: "
            f"{'OK' if met else 'MISSED'}); all runs: " + ", ".join(f"{r.rate:,.0f}" for r in runs)
        )
        rows.append(
            Row(
                f"one consumer into PostgreSQL, batch_size={batch}, lag refresh off",
                f"{best.rate:,.0f} msg/s ({best.backend_us_per_msg:.0f} us backend CPU/msg)",
                f">= {CONSUMER_GOAL:,} msg/s",
                met,
                f"python -m bench.offline --only consumer --consumer-batches {batch}",
            )
        )
    if args.consumer_latency_s > 0:
        rows.extend(await part_consumer_latency(args, infra))
    if args.cprofile:
        with tempfile.TemporaryDirectory(prefix="mics-bench-prof-") as tmp:
            path = os.path.join(tmp, "consumer.prof")
            batch = args.consumer_batches[0]
            await asyncio.to_thread(forget_group, infra.kafka(), group)
            settings = {"batch_size": batch, **no_lag}
            r = await consumer_run(args, infra, tenant, settings, profile=path)
            infra.drop_databases()
            print_consumer_run(f"profiled (batch {batch}, cProfile on)", r, count)
            print_profile(path, args.profile_lines)
    return rows


# -- 5. /get-offline-messages latency at a fixed request rate -----------------------------------


@dataclass
class PullRun:
    latencies_ms: list[float]
    seconds: float
    errors: Counter[str]
    checked: int
    cpu: dict[str, float]
    server: dict[str, float]

    @property
    def qps(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)


def pull_requests(
    tenant: str, count: int, cursors: Sequence[tuple[str, str]], rng: random.Random
) -> list[bytes]:
    """Signed /get-offline-messages bodies, unique request ids, random (user, cursor)."""
    now = int(time.time() * 1000)
    run_id = uuid.uuid4().hex[:8]
    bodies = []
    for i in range(count):
        user, cursor = cursors[rng.randrange(len(cursors))]
        req = hook_pb.GetOfflineMessagesRequest(
            meta=hook_pb.HookMeta(tenant_id=tenant, request_id=f"{run_id}-{i}", timestamp_ms=now),
            user_id=user,
            device_id="d0",
            max_messages=100,
            cursor=cursor,
            ack_follows=True,
        )
        sign_hook_request(req, SECRET)
        bodies.append(req.SerializeToString())
    return bodies


async def open_loop(
    url: str, bodies: Sequence[bytes], rate: float, connections: int
) -> tuple[list[float], float, Counter[str], int]:
    """Send ``bodies`` at ``rate``/s on a fixed schedule, whatever the answers take;
    latency = answer time - *scheduled* send time (no coordinated omission)."""
    errors: Counter[str] = Counter()
    latencies = array("d")
    checked = 0
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=connections)
    headers = {"Content-Type": PROTOBUF}
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(index: int, scheduled: float) -> None:
            nonlocal checked
            try:
                async with session.post(url, data=bodies[index], headers=headers) as resp:
                    data = await resp.read()
                    status = resp.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                return
            latencies.append(loop.time() - scheduled)
            if status != 200:
                errors[f"HTTP {status}"] += 1
            elif index % 50 == 0:  # parse a sample: ok, and a full page
                answer = hook_pb.GetOfflineMessagesResponse.FromString(data)
                checked += 1
                if not answer.ok or len(answer.messages) != 100:
                    errors[f"ok={answer.ok} messages={len(answer.messages)}"] += 1

        tasks: set[asyncio.Task[None]] = set()
        start = loop.time() + 0.05
        for index in range(len(bodies)):
            scheduled = start + index / rate
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = loop.create_task(one(index, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
        seconds = loop.time() - start
    return sorted(v * 1000 for v in latencies), seconds, errors, checked


async def part_pull(args: argparse.Namespace, infra: Infra) -> list[Row]:
    users, per_user = args.pull_users, args.pull_per_user
    duration = args.pull_seconds
    offsets = (0, 25, 50, 75, 100)
    print(
        f"\n== 5. /get-offline-messages at {'/'.join(f'{r:,}' for r in args.pull_rates)} req/s "
        f"for {duration:.0f} s (open loop): {users:,} users x {per_user} stored messages, "
        f"100-message pages, cursors at offsets {'/'.join(map(str, offsets))}, ack_follows "
        "(nothing marked)",
        flush=True,
    )
    tenant = f"pull{uuid.uuid4().hex[:6]}"
    url, dsn = infra.new_database("pull")
    children: list[Child | None] = []
    rows: list[Row] = []
    try:
        env = {"BENCH_CPROFILE": args.pull_profile_path} if args.cprofile else None
        backend = Child("backend", "bench._offline_backend", backend_arg(tenant, url), env=env)
        children.append(backend)
        await backend.start(60)
        t0 = time.monotonic()
        await seed_rows(dsn, tenant, users, per_user, b"p" * 100)
        print(f"  seeded {users * per_user:,} rows in {time.monotonic() - t0:.1f} s", flush=True)
        conn = await asyncpg.connect(dsn)
        try:
            firsts = await conn.fetch(
                "SELECT user_id, min(id) AS first FROM offline_messages GROUP BY user_id"
            )
        finally:
            await conn.close()
        cursors = [
            (r["user_id"], encode_cursor(SECRET, tenant, r["user_id"], r["first"] - 1 + off)
             if off else "")
            for r in firsts
            for off in offsets
        ]  # fmt: skip
        hook_url = backend.ready["url"] + "/get-offline-messages"
        backend_port = int(backend.ready["url"].rsplit(":", 1)[1])
        rng = random.Random(1)
        # Warm-up: connection pools, statement caches, the table in the buffer cache.
        await open_loop(hook_url, pull_requests(tenant, 300, cursors, rng), 300, 64)
        for rate in args.pull_rates:
            runs: list[PullRun] = []
            for rep in range(args.repeat_pull):
                bodies = pull_requests(tenant, int(rate * duration), cursors, rng)
                await wait_quiet(args.quiet_wait)
                before = await scrape(backend_port)
                meter = CpuMeter({"backend": backend.pid, "load": os.getpid()}, infra.pg)
                lat, seconds, errors, checked = await open_loop(
                    hook_url, bodies, rate, args.pull_connections
                )
                cpu = meter.stop()
                server = server_means(before, await scrape(backend_port))
                r = PullRun(lat, seconds, errors, checked, cpu, server)
                runs.append(r)
                cpu_ms = cpu["backend"] / 100 * seconds * 1000 / max(1, len(lat))
                print(
                    f"  {rate:,} req/s run {rep + 1}: p50 {r.p(0.5):.1f} ms, p99 "
                    f"{r.p(0.99):.1f} ms, p99.9 {r.p(0.999):.1f} ms, max "
                    f"{r.latencies_ms[-1]:.1f} ms; {r.qps:,.0f} req/s achieved; backend "
                    f"{cpu_ms:.2f} ms CPU/req; CPU: {fmt_cpu(cpu)}",
                    flush=True,
                )
                print(
                    "    backend means: "
                    + ", ".join(f"{k} {v:.2f} ms" for k, v in server.items())
                    + f"; {checked} answers parsed and checked"
                    + (f"; ERRORS {dict(errors)}" if errors else "")
                )
                if r.qps < 0.9 * rate and rep + 1 < args.repeat_pull:
                    print("    saturated (the backend cannot keep up): not repeated")
                    break
            best = min(runs, key=lambda r: r.p(0.99))
            met = best.p(0.99) < PULL_P99_GOAL_MS and not best.errors
            verdict = (
                f"goal < {PULL_P99_GOAL_MS:.0f} ms: {'OK' if met else 'MISSED'}"
                if rate >= 1000
                else "reference"
            )
            print(
                f"  {rate:,} req/s best: p99 {best.p(0.99):.1f} ms, {best.qps:,.0f} req/s "
                f"achieved ({verdict}); all runs p99: "
                + ", ".join(f"{r.p(0.99):.1f}" for r in runs)
            )
            rows.append(
                Row(
                    f"/get-offline-messages at {rate:,} req/s, 100-msg pages, open loop",
                    f"p50 {best.p(0.5):.1f} ms, p99 {best.p(0.99):.1f} ms, p99.9 "
                    f"{best.p(0.999):.1f} ms; {best.qps:,.0f} req/s achieved",
                    f"p99 < {PULL_P99_GOAL_MS:.0f} ms" + ("" if rate >= 1000 else " (reference)"),
                    met if rate >= 1000 else None,
                    f"python -m bench.offline --only pull --pull-rates {rate}",
                )
            )
        if args.cprofile:
            rate = min(args.pull_rates)
            bodies = pull_requests(tenant, int(rate * duration), cursors, rng)
            await backend.command("profile_start")
            lat, seconds, errors, checked = await open_loop(
                hook_url, bodies, rate, args.pull_connections
            )
            await backend.command("profile_stop", 120)
            r = PullRun(lat, seconds, errors, checked, {}, {})
            print(
                f"  profiled run at {rate:,} req/s (cProfile on): p50 {r.p(0.5):.1f} ms, p99 "
                f"{r.p(0.99):.1f} ms, {r.qps:,.0f} req/s"
            )
            print_profile(args.pull_profile_path, args.profile_lines)
    finally:
        await stop_all(list(reversed(children)))
    return rows


def server_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean server-side times over a run, from the backend's histograms."""
    out: dict[str, float] = {}
    for label, prefix in (
        ("hook", 'mics_backend_hook_duration_ms_{}{{op="GetOfflineMessages"}}'),
        ("database", "offline_message_query_duration_ms_{}{{tenant="),
    ):
        sums = [k for k in after if k.startswith(prefix.format("sum"))]
        counts = [k for k in after if k.startswith(prefix.format("count"))]
        total = sum(after[k] - before.get(k, 0.0) for k in sums)
        n = sum(after[k] - before.get(k, 0.0) for k in counts)
        if n:
            out[label] = total / n
    return out


# -- orchestration ------------------------------------------------------------------------------

PART_FUNCS: dict[str, Callable[[argparse.Namespace, Infra], Awaitable[list[Row]]]] = {
    "rss": part_rss,
    "ack": part_ack,
    "drain": part_drain,
    "consumer": part_consumer,
    "pull": part_pull,
}
NEEDS_KAFKA = {"rss", "ack", "consumer"}
NEEDS_POSTGRES = {"rss", "drain", "consumer", "pull"}


async def amain(args: argparse.Namespace, infra: Infra) -> list[Row]:
    raise_nofile()
    rows: list[Row] = []
    for part in args.only:
        started = time.monotonic()
        try:
            rows.extend(await PART_FUNCS[part](args, infra))
        finally:
            infra.drop_databases()
        print(f"  ({part}: {time.monotonic() - started:.0f} s)", flush=True)
    return rows


def report(rows: list[Row], args: argparse.Namespace, wall_s: float) -> None:
    print()
    print(
        f"offline path — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, aiohttp {aiohttp.__version__}; whole run {wall_s:.0f} s"
    )
    print("| measure | result | goal | met | command |")
    print("|---|---|---|---|---|")
    for r in rows:
        met = "-" if r.met is None else ("yes" if r.met else "**no**")
        print(f"| {r.measure} | {r.result} | {r.goal} | {met} | `{r.command}` |")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--only",
        default=",".join(PARTS),
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help=f"comma-separated parts: {', '.join(PARTS)}",
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="seconds to wait for other processes to go quiet before each measurement",
    )
    g = parser.add_argument_group("1. rss")
    g.add_argument("--rss-users", type=int, default=1000)
    g.add_argument("--rss-per-user", type=int, default=100)
    g.add_argument("--rss-body", type=int, default=1024, help="msg_body bytes (design: 1 KB)")
    g.add_argument(
        "--rss-senders",
        type=int,
        default=200,
        help="connections sending (a connection's offline messages do not overlap)",
    )
    g.add_argument("--rss-window", type=int, default=2, help="un-acked messages per sender")
    g.add_argument("--rss-warmup", type=int, default=5000, help="messages before 'before'")
    g.add_argument("--repeat-rss", type=int, default=1)
    g.add_argument(
        "--rss-dedup",
        type=int_list,
        default=[0, 1],
        help="gateway DEDUP_MAX_ENTRIES per variant (0: default 1M; 1: cache off)",
    )
    g.add_argument(
        "--rss-linger-ms", type=int, default=None, help="gateway KAFKA_LINGER_MS (default: its own)"
    )
    g = parser.add_argument_group("2. ack")
    g.add_argument(
        "--offline-linger-ms",
        type=int,
        default=None,
        help="gateway KAFKA_OFFLINE_LINGER_MS, rss and ack: a second producer for the events "
        "the offline ack waits for (default: the gateway's own)",
    )
    g.add_argument("--ack-senders", type=int, default=10)
    g.add_argument("--ack-messages", type=int, default=3000, help="per kind and run")
    g.add_argument(
        "--ack-linger-ms",
        type=int_list,
        default=[5, 0],
        help="gateway KAFKA_LINGER_MS values, one gateway each (default 5,0)",
    )
    g.add_argument("--repeat-ack", type=int, default=3)
    g.add_argument(
        "--ack-unloaded-messages",
        type=int,
        default=1000,
        help="per kind, one sender alone (no queueing)",
    )
    g.add_argument(
        "--ack-single-messages",
        type=int,
        default=300,
        help="one sender, 32 in flight: messages to offline users (10x as many to online)",
    )
    g = parser.add_argument_group("3. drain")
    g.add_argument("--drain-backlog", type=int, default=1000)
    g.add_argument(
        "--drain-receipt-ms",
        type=int_list,
        default=[200, 50],
        help="SDK receipt_interval_s values in ms (200 = the SDK default)",
    )
    g.add_argument("--repeat-drain", type=int, default=5)
    g = parser.add_argument_group("4. consumer")
    g.add_argument("--consumer-events", type=int, default=200_000)
    g.add_argument("--consumer-users", type=int, default=1000)
    g.add_argument("--consumer-partitions", type=int, default=32)
    g.add_argument("--consumer-batches", type=int_list, default=[500, 2000, 5000])
    g.add_argument("--repeat-consumer", type=int, default=1)
    g.add_argument(
        "--consumer-shipped-cap",
        type=float,
        default=0.0,
        help="seconds for an as-shipped throughput run (lag refresh on) before the sweep; "
        "0 (default) skips it",
    )
    g.add_argument(
        "--consumer-latency-s",
        type=float,
        default=12.0,
        help="seconds of one-at-a-time produce -> stored latency, per setting; 0 skips",
    )
    g = parser.add_argument_group("5. pull")
    g.add_argument("--pull-users", type=int, default=1000)
    g.add_argument("--pull-per-user", type=int, default=200)
    g.add_argument(
        "--pull-rates",
        type=int_list,
        default=[1000, 150],
        help="request rates, req/s (1000: the goal; 150: a reference below saturation)",
    )
    g.add_argument("--pull-seconds", type=float, default=10.0)
    g.add_argument("--pull-connections", type=int, default=64, help="client connection limit")
    g.add_argument("--repeat-pull", type=int, default=2)
    g = parser.add_argument_group("infrastructure and profiling")
    g.add_argument(
        "--pg-shared-buffers",
        default="128MB",
        help="PostgreSQL shared_buffers (the test harness default is 16MB)",
    )
    g.add_argument(
        "--cprofile",
        action="store_true",
        help="consumer, pull: one extra run with cProfile in the backend; print the top",
    )
    g.add_argument("--profile-lines", type=int, default=30)
    args = parser.parse_args()
    for part in args.only:
        if part not in PARTS:
            parser.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    args.only = [p for p in PARTS if p in args.only]
    started = time.monotonic()
    rows: list[Row] = []
    broker: KafkaBroker | None = None
    pg: PostgresServer | None = None
    with tempfile.TemporaryDirectory(prefix="mics-bench-offline-") as tmp:
        args.pull_profile_path = os.path.join(tmp, "pull.prof")
        try:
            if NEEDS_KAFKA & set(args.only):
                print("starting a Kafka broker ...", flush=True)
                broker = KafkaBroker(os.path.join(tmp, "kafka"))
                broker.start()
            if NEEDS_POSTGRES & set(args.only):
                print("starting PostgreSQL ...", flush=True)
                pg = PostgresServer(settings={"shared_buffers": args.pg_shared_buffers})
                pg.start()
            infra = Infra(broker, pg)
            rows = run(lambda: amain(args, infra))
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
        finally:
            with contextlib.suppress(Exception):
                kill_children()
            if pg is not None:
                pg.close()
            if broker is not None:
                broker.close()
    if rows:
        report(rows, args, time.monotonic() - started)


if __name__ == "__main__":
    main()
