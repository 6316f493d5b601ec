"""Chaos run of the offline path on real Kafka and PostgreSQL.

10,000 messages: 100 sender users stay online and send; 200 recipient users connect and
disconnect at random (a seeded RNG picks the schedule), a quarter of their connections
closing a few milliseconds after connect, in the middle of the offline drain; the
backend is restarted once, in the middle of the run. At the end every recipient
connects and drains. The checker then proves:

* zero loss: every message acked SENT reached its recipient (for a group message, every
  recipient member), through whichever path (live, Kafka + PostgreSQL + pull, the
  gateway's fallback buffer);
* zero visible duplicates: no SDK handed the same (sender, msg_id) to the app twice
  (the SDK drops redeliveries; the run counts how many it dropped);
* nothing made up: every delivery is a message that was sent, to a member it was for.

Messages acked FAILED (group messages while the backend restarts and the members hook
fails, ...) are retried by their sender with the same msg_id, as a client would; they
are counted. The run prints a summary.

The 300 SDK clients run in a child process with their own event loop, as clients run
elsewhere in production: one Python event loop for clients, gateway and backend would
be the bottleneck, and its latency (not the system's) would decide the outcome. The
stack (gateway, backend, consumer) runs in the test process, which restarts the
backend when the child reports that half of the messages were acked.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import aiohttp
import pytest

from mics.client import ClientOptions, ConnectError, MicsClient, MicsClientError
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.offline_stack import Key, OfflineStack, StackFactory, offline_stacks, token_of
from tests.support.kafka import KafkaBroker
from tests.support.postgres import PostgresDatabase

SEED = 20_240_917
MESSAGES = 10_000
SENDERS = [f"s{i:03d}" for i in range(100)]
RECIPIENTS = [f"r{i:03d}" for i in range(200)]
# 20 groups of 5 senders and 10 recipients.
GROUPS = {
    f"g{k:02d}": SENDERS[5 * k : 5 * k + 5] + RECIPIENTS[10 * k : 10 * k + 10] for k in range(20)
}
GROUP_SHARE = 0.1
MID_DRAIN_SHARE = 0.25
# Each sender sends one message every PACE_S: 100 senders, 200 messages/s.
PACE_S = 0.5
MAX_ATTEMPTS = 200
CHILD_TIMEOUT_S = 100.0
SETTLE_S = 30.0


@pytest.fixture
async def make_stack(
    kafka_broker: KafkaBroker, postgres_db: PostgresDatabase
) -> AsyncIterator[StackFactory]:
    async with offline_stacks(kafka_broker, postgres_db) as factory:
        yield factory


# -- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Planned:
    sender: str
    msg_id: str
    to_user: str  # single chat
    group: str  # group chat

    @property
    def key(self) -> Key:
        return self.sender, self.msg_id

    @property
    def recipients(self) -> list[str]:
        if self.group:
            return [u for u in GROUPS[self.group] if u.startswith("r")]
        return [self.to_user]


def plan(seed: int, count: int) -> dict[str, list[Planned]]:
    """The messages of each sender, in sending order (90% single, 10% group)."""
    rng = random.Random(seed)
    group_of = {s: g for g, members in GROUPS.items() for s in members if s.startswith("s")}
    per_sender: dict[str, list[Planned]] = {s: [] for s in SENDERS}
    for n in range(count):
        sender = SENDERS[n % len(SENDERS)]
        msg_id = f"{sender}-{len(per_sender[sender]):04d}"
        if rng.random() < GROUP_SHARE:
            per_sender[sender].append(Planned(sender, msg_id, "", group_of[sender]))
        else:
            per_sender[sender].append(Planned(sender, msg_id, rng.choice(RECIPIENTS), ""))
    return per_sender


# -- the client process --------------------------------------------------------------------


@dataclass
class ClientRun:
    """What the client process observed (sent back to the test process, pickled)."""

    # key -> (ack reason, monotonic time of the (last) send, monotonic time of its ack)
    acked: dict[Key, tuple[str, float, float]] = field(default_factory=dict)
    failed_acks: Counter[str] = field(default_factory=Counter)
    retried: set[Key] = field(default_factory=set)
    # recipient -> the SDK's output, as (sender, msg_id), in order
    got: dict[str, list[Key]] = field(default_factory=dict)
    # recipient -> [(connect called, close returned)] (monotonic; the OS-wide clock)
    windows: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    connects: int = 0
    connect_failures: int = 0
    mid_drain: int = 0
    final_reconnects: int = 0
    # OfflineSync (complete, reason) seen in the final drain
    final_syncs: Counter[str] = field(default_factory=Counter)
    suppressed: int = 0
    restart_at: int = 0
    sending_s: float = 0.0


class Clients:
    def __init__(self, ws_url: str, tenant: str, http: aiohttp.ClientSession) -> None:
        self.ws_url = ws_url
        self.tenant = tenant
        self.http = http
        self.run = ClientRun()
        self.sent = 0
        self._opened: dict[str, float] = {}

    def client(self, user: str, device: str, **options: Any) -> MicsClient:
        opts = ClientOptions(
            url=self.ws_url,
            tenant_id=self.tenant,
            token=token_of(user),
            device_id=device,
            reconnect=False,
            heartbeat_interval_s=0,
            ack_timeout_s=15,
            **options,
        )
        on_delivery = None
        if user in self.run.got:
            out = self.run.got[user]

            def on_delivery(message: msg_pb.MessageRequest) -> None:
                out.append((message.user_id, message.msg_id))

        return MicsClient(opts, session=self.http, on_delivery=on_delivery)

    async def connect(self, client: MicsClient, user: str) -> bool:
        opened = time.monotonic()
        try:
            await client.connect()
        except ConnectError:  # the backend is restarting: /auth fails
            self.run.connect_failures += 1
            self.run.windows[user].append((opened, time.monotonic()))
            return False
        self.run.connects += 1
        self._opened[user] = opened
        return True

    async def close(self, client: MicsClient, user: str) -> None:
        await client.close()
        self.run.windows[user].append((self._opened.pop(user), time.monotonic()))

    async def send_all(self, client: MicsClient, messages: list[Planned]) -> None:
        """Paced, in order; a FAILED ack (or none) is retried with the same msg_id."""
        loop = asyncio.get_running_loop()
        start = loop.time() + random.Random(messages[0].sender).uniform(0, PACE_S)
        for n, message in enumerate(messages):
            pause = start + n * PACE_S - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            body = f"chaos {message.msg_id}".encode()
            for attempt in range(MAX_ATTEMPTS):
                if attempt:
                    self.run.retried.add(message.key)
                    await asyncio.sleep(min(0.05 * attempt, 0.5))
                began = time.monotonic()
                try:
                    if message.group:
                        ack = await client.send_group(message.group, body, msg_id=message.msg_id)
                    else:
                        ack = await client.send_single(message.to_user, body, msg_id=message.msg_id)
                except MicsClientError as exc:  # no ack: its fate is unknown, send again
                    self.run.failed_acks[type(exc).__name__] += 1
                    continue
                if ack.status == msg_pb.SENT:
                    self.run.acked[message.key] = (ack.reason, began, time.monotonic())
                    self.sent += 1
                    break
                self.run.failed_acks[ack.reason] += 1
            else:
                raise AssertionError(f"{message.key} never acked SENT")

    async def churn(
        self, client: MicsClient, user: str, rng: random.Random, stop: asyncio.Event
    ) -> None:
        """Connect and disconnect at random until ``stop``; some closes come mid-drain."""
        await asyncio.sleep(rng.uniform(0, 2.0))
        while not stop.is_set():
            if not await self.connect(client, user):
                await asyncio.sleep(rng.uniform(0.05, 0.3))
                continue
            syncs = client.stats.offline_syncs
            if rng.random() < MID_DRAIN_SHARE:
                await asyncio.sleep(rng.uniform(0.0, 0.02))
            else:
                await asyncio.sleep(rng.uniform(1.0, 6.0))
            if client.stats.offline_syncs == syncs:
                self.run.mid_drain += 1
            await self.close(client, user)
            await asyncio.sleep(rng.uniform(1.0, 5.0))

    async def stay(
        self, client: MicsClient, user: str, done: asyncio.Event, drained: asyncio.Event
    ) -> None:
        """Connect and stay until ``done``. Like an app that wants its backlog: after an
        incomplete OfflineSync (a failed page leaves the rest for the next drain,
        protocol.md 9.4) it reconnects. ``drained`` is set after the first complete one."""
        while not done.is_set():
            if not await self.connect(client, user):
                self.run.final_reconnects += 1
                await asyncio.sleep(0.2)
                continue
            while not done.is_set() and client.is_open:
                try:
                    sync = await client.next_offline_sync(timeout=0.5)
                except TimeoutError:
                    continue
                self.run.final_syncs[sync.reason or "complete"] += 1
                if sync.complete:
                    drained.set()
                elif sync.reason != "limit reached":  # that one continues by itself
                    break
            if not done.is_set():
                self.run.final_reconnects += 1
                await self.close(client, user)
                await asyncio.sleep(random.uniform(0.5, 1.0))  # back off, as apps do


async def _client_main(ws_url: str, tenant: str, count: int, conn: Connection) -> None:
    per_sender = plan(SEED, count)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients = Clients(ws_url, tenant, http)
    run = clients.run
    run.got = {r: [] for r in RECIPIENTS}
    run.windows = {r: [] for r in RECIPIENTS}
    senders = {s: clients.client(s, "send") for s in SENDERS}
    inboxes = {r: clients.client(r, "recv") for r in RECIPIENTS}
    try:
        for i in range(0, len(SENDERS), 20):  # connect the senders in small waves
            await asyncio.gather(*(senders[s].connect() for s in SENDERS[i : i + 20]))
        conn.send(("connected",))
        started = time.monotonic()
        stop = asyncio.Event()
        churners = [
            asyncio.create_task(clients.churn(inboxes[r], r, random.Random(SEED + i), stop))
            for i, r in enumerate(RECIPIENTS)
        ]
        sending = [
            asyncio.create_task(clients.send_all(senders[s], per_sender[s])) for s in SENDERS
        ]
        half_reported = False
        while not all(t.done() for t in sending):
            if not half_reported and clients.sent >= count // 2:
                run.restart_at = clients.sent
                conn.send(("half",))
                half_reported = True
            await asyncio.sleep(0.05)
        await asyncio.gather(*sending)
        run.sending_s = time.monotonic() - started
        stop.set()
        await asyncio.gather(*churners)

        # Everyone comes back (in waves) and stays until the test process says the
        # offline path is idle; then whatever is still on its way has a moment to land.
        done = asyncio.Event()
        drained = {r: asyncio.Event() for r in RECIPIENTS}
        staying = []
        for i in range(0, len(RECIPIENTS), 20):
            wave = RECIPIENTS[i : i + 20]
            staying += [
                asyncio.create_task(clients.stay(inboxes[r], r, done, drained[r])) for r in wave
            ]
            await asyncio.gather(*(drained[r].wait() for r in wave))
        conn.send(("drained",))
        await asyncio.to_thread(conn.recv)
        last, stable_since = -1, time.monotonic()
        while time.monotonic() - stable_since < 1.0:
            now = sum(len(v) for v in run.got.values())
            if now != last:
                last, stable_since = now, time.monotonic()
            await asyncio.sleep(0.1)
        done.set()
        await asyncio.gather(*staying)
        run.suppressed = sum(c.stats.duplicate_deliveries for c in inboxes.values())
        for user in RECIPIENTS:
            await clients.close(inboxes[user], user)
        conn.send(("result", run))
    finally:
        for client in [*senders.values(), *inboxes.values()]:
            await client.close()
        await http.close()


def client_process(ws_url: str, tenant: str, count: int, conn: Connection) -> None:
    """Entry point of the client process: runs every client, reports to ``conn``."""
    try:
        asyncio.run(_client_main(ws_url, tenant, count, conn))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


# -- the test process ----------------------------------------------------------------------


async def receive(conn: Connection, expected: str, within_s: float) -> tuple[Any, ...]:
    ready = await asyncio.to_thread(conn.poll, within_s)
    assert ready, f"the client process sent no {expected!r} within {within_s} s"
    message: tuple[Any, ...] = conn.recv()
    if message[0] == "error":
        raise AssertionError(f"the client process failed:\n{message[1]}")
    assert message[0] == expected, message
    return message


async def offline_path_idle(stack: OfflineStack) -> None:
    """Every event produced and consumed, no drain or commit running; for 2 s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_S
    idle_since: float | None = None
    drainer = stack.gateway.gateway.drainer
    while True:
        lag = await stack.consumer_lag()
        events = stack.gateway.gateway.events.depth(stack.tenant)  # type: ignore[attr-defined]
        idle = lag == 0 and events == 0 and not drainer._tasks
        if not idle:
            idle_since = None
        elif idle_since is None:
            idle_since = loop.time()
        elif loop.time() - idle_since >= 2.0:
            return
        if loop.time() > deadline:
            raise AssertionError(
                f"the offline path did not settle within {SETTLE_S} s: consumer lag {lag}, "
                f"events queued {events}, drains and commits running {len(drainer._tasks)}"
            )
        await asyncio.sleep(0.1)


# About 70 s on an idle 2-core machine; the limit is for a machine shared with others.
@pytest.mark.timeout(300)
async def test_chaos_no_loss_no_visible_duplicates(make_stack: StackFactory) -> None:
    started = time.monotonic()
    planned = [m for messages in plan(SEED, MESSAGES).values() for m in messages]
    stack = await make_stack(
        users=SENDERS + RECIPIENTS,
        groups=GROUPS,
        # The backend restarts once: let the hook breaker probe again soon.
        hook_breaker_open_ms=300,
        # Production default: a slow broker confirmation falls back to the buffer.
        offline_notify_wait_ms=200,
        # 300 clients share the hooks: queue for a while instead of refusing (the
        # production 10 ms queue timeout assumes a backend on its own machine).
        hook_max_concurrency=128,
        hook_queue_timeout_ms=2000,
    )
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    child = context.Process(
        target=client_process,
        args=(stack.gateway.ws_url, stack.tenant, MESSAGES, theirs),
        name="chaos-clients",
    )
    child.start()
    try:
        await receive(ours, "connected", 30)
        await stack.wait_producer_ready()
        await receive(ours, "half", CHILD_TIMEOUT_S)
        await stack.restart_backend(down_s=0.3)
        await receive(ours, "drained", CHILD_TIMEOUT_S)
        await offline_path_idle(stack)
        ours.send(("collect",))
        _, run = await receive(ours, "result", 30)
    finally:
        await asyncio.to_thread(child.join, 10)
        if child.is_alive():
            child.kill()
    assert isinstance(run, ClientRun)
    rows = await stack.rows_delivered()
    dropped = stack.gw_metric("mics_kafka_push_failed_total", tenant=stack.tenant)
    assert dropped == 0, f"{dropped} events never reached the broker"
    check = check_run(planned, run, rows)
    print(summary(planned, run, rows, check, stack, time.monotonic() - started))
    assert not check.duplicates, f"visible duplicates: {check.duplicates}"
    assert not check.phantoms, f"deliveries nobody sent: {check.phantoms[:20]}"
    assert not check.unexplained, f"{len(check.unexplained)} lost: {check.unexplained[:20]}"
    assert not check.lost_live, (
        f"{len(check.lost_live)} live deliveries lost at a disconnect {check.lost_live[:5]}"
    )


# -- the checker ---------------------------------------------------------------------------


@dataclass
class Check:
    duplicates: dict[str, list[Key]] = field(default_factory=dict)
    phantoms: list[tuple[str, Key]] = field(default_factory=list)
    # Live deliveries (no offline row) missing at a recipient that had a
    # connection open while the message was delivered.
    lost_live: list[str] = field(default_factory=list)
    unexplained: list[str] = field(default_factory=list)
    # Rows still undelivered whose message the recipient has (a failed commit: they
    # come again on the next pull, and the SDK drops them).
    uncommitted: int = 0


def check_run(
    planned: list[Planned], run: ClientRun, rows: dict[tuple[str, str, str], bool]
) -> Check:
    check = Check()
    got = {user: Counter(keys) for user, keys in run.got.items()}
    for user, counts in got.items():
        repeated = [k for k, n in counts.items() if n > 1]
        if repeated:
            check.duplicates[user] = repeated
    intended = {m.key: set(m.recipients) for m in planned}
    check.phantoms = [(u, k) for u, c in got.items() for k in c if u not in intended.get(k, set())]
    for message in planned:
        if message.key not in run.acked:
            continue
        reason, sent_at, acked_at = run.acked[message.key]
        for user in message.recipients:
            row = rows.get((user, *message.key))
            if message.key in got[user]:
                check.uncommitted += row is False
                continue
            what = f"{user} <- {message.key} ({'group' if message.group else 'single'} {reason!r})"
            # No row: never notified (the run checks that no event was dropped), so it
            # was delivered live, to this member, or (a single chat) to this recipient.
            live = (message.group or reason == "") and row is None
            connected = any(a <= acked_at and sent_at <= b for a, b in run.windows[user])
            if live and connected:
                check.lost_live.append(what)
            else:
                check.unexplained.append(f"{what}, row {row}, connected {connected}")
    return check


def summary(
    planned: list[Planned],
    run: ClientRun,
    rows: dict[tuple[str, str, str], bool],
    check: Check,
    stack: OfflineStack,
    elapsed_s: float,
) -> str:
    acked = [m for m in planned if m.key in run.acked]
    reasons = Counter(
        ("group " if m.group else "single ") + (run.acked[m.key][0] or '""') for m in acked
    )
    drains = {
        t: stack.gw_metric("mics_offline_drain_requests_total", tenant=stack.tenant, trigger=t)
        for t in ("connect", "nudge")
    }
    lost = len(check.lost_live) + len(check.unexplained)
    hook_failures: Counter[str] = Counter()
    for metric in stack.gateway.gateway.metrics_registry.registry.collect():
        if metric.name != "mics_hook_requests":
            continue
        for sample in metric.samples:
            labels = sample.labels
            if sample.name.endswith("_total") and labels.get("result") != "ok" and sample.value:
                hook_failures[f"{labels['op']} {labels['result']}"] += int(sample.value)
    return (
        "\nchaos summary:"
        f"\n  messages {len(planned)} ({sum(bool(m.group) for m in planned)} group) from "
        f"{len(SENDERS)} senders to {len(RECIPIENTS)} recipients; acked SENT {len(acked)}"
        f"\n  ack reasons {dict(reasons)}"
        f"\n  FAILED acks retried with the same msg_id: {sum(run.failed_acks.values())} "
        f"{dict(run.failed_acks)} over {len(run.retried)} messages"
        f"\n  recipient connects {run.connects} (closed before their drain finished "
        f"{run.mid_drain}), refused while the backend was down {run.connect_failures}, "
        f"reconnects in the final drain {run.final_reconnects} {dict(run.final_syncs)}"
        f"\n  backend restarted after {run.restart_at} acked messages; sending took "
        f"{run.sending_s:.1f} s; drains {drains['connect']:.0f} on connect, "
        f"{drains['nudge']:.0f} on nudge; offline rows {len(rows)} "
        f"({check.uncommitted} delivered but left uncommitted)"
        f"\n  hook failures (the restart, the breaker) {dict(hook_failures)}"
        f"\n  expected deliveries {sum(len(m.recipients) for m in acked)}, delivered "
        f"{sum(len(v) for v in run.got.values())}, duplicates suppressed by the SDK "
        f"{run.suppressed}"
        f"\n  visible duplicates {sum(len(d) for d in check.duplicates.values())}, phantoms "
        f"{len(check.phantoms)}, lost {lost}: live deliveries at a disconnect "
        f"{len(check.lost_live)}, other {len(check.unexplained)}"
        f"\n  elapsed {elapsed_s:.1f} s"
    )
