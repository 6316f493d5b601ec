"""Cluster benchmark: cross-node latency and throughput, bytes between nodes per message.

    python -m bench.cluster                      # ~2.5 min, every phase
    python -m bench.cluster --phases latency     # one phase: latency, throughput, bytes

Every gateway is a real node process, ``python -m mics gateway --redis <url>``
configured by environment variables (protocol.md 11), in front of one private
``redis-server`` (``tests/support/redis.py``). Phases, each with fresh node processes:

1. ``latency``: nodes A and B; one load process (``bench._cluster_load``, open loop)
   whose senders are on A and whose receivers are half on A, half on B. A fixed
   offered load (``--rate 1000`` msg/s for ``--seconds 10`` after ``--warmup 2``),
   scheduled independently of the answers; latency = arrival - *scheduled* time (no
   coordinated omission). Cross-node (A -> B: Redis lookup, ForwardSingle) and local
   (A -> A) delivery latency come from the same run.
2. ``throughput``: nodes A and B; ``bench._load_proc``'s closed loop (``--pairs`` senders
   on A, each keeping ``--window`` messages un-acked) to receivers on B: msg/s.
3. ``bytes``: nodes A, B and C, each node's gRPC port behind a counting TCP relay in
   this process (its ``PUBLIC_ENDPOINT`` points at the relay, so every peer's calls to
   it pass through). Group messages from a member on A to groups whose members are on
   1, 2 or 3 nodes; bytes each way per message as seen on the wire (HTTP/2 frames:
   headers, DATA, trailers, and any PING/WINDOW_UPDATE), next to the serialized size of
   the ForwardBatch/ForwardSingle requests the sender made.

Auth: phases 1-2 use ``bench._auth`` (hooks off: no ``/check-message``, like
``bench.throughput``'s hooks-off); phase 3 needs ``/get-group-members`` and uses the
reference backend (``mics.backend``, in this process), with signed hooks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from typing import IO, Any

import aiohttp
from tests.support.process import die_with_parent, free_port
from tests.support.redis import RedisServer

from bench._auth import AuthServer
from bench._common import (
    Child,
    cpu_seconds,
    kill_children,
    machine_cpu_seconds,
    percentile,
    raise_nofile,
    run,
    stop_all,
)
from bench.throughput import load_array, wait_quiet
from mics.backend.app import BackendServer
from mics.backend.config import BackendConfig, TenantConfig, UserConfig
from mics.client import ClientOptions, MicsClient
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.pb import mics_node_pb2 as node_pb

TENANT = "bench"
SECRET = "bench-secret"
PHASES = ("latency", "throughput", "bytes")
CROSS_P99_GOAL_MS = 5.0
LOCAL_P99_GOAL_MS = 2.0


# -- gateway node processes ------------------------------------------------------------------


class Node:
    """One ``python -m mics gateway --redis ...`` process.

    Configured like a deployment, by environment variables. Linux sends it SIGTERM
    should this process die without stopping it (``PR_SET_PDEATHSIG``), so no node
    outlives the benchmark.
    """

    def __init__(self, name: str, redis_url: str, env: dict[str, str], log_dir: str) -> None:
        self.name = name
        self.redis_url = redis_url
        self.port = free_port()
        self.grpc_port = free_port()
        self.public_grpc_port = self.grpc_port  # a relay's port, when one is in between
        self.extra_env = env
        self.log_path = os.path.join(log_dir, f"node-{name}.log")
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _open_log(self) -> IO[bytes]:
        return open(self.log_path, "ab")

    async def start(self) -> None:
        env = {
            **os.environ,
            "NODE_ID": self.name,
            "HOST": "127.0.0.1",
            "GRPC_HOST": "127.0.0.1",
            "GRPC_PORT": str(self.grpc_port),
            "PUBLIC_ENDPOINT": f"http://127.0.0.1:{self.public_grpc_port}",
            "LOG_LEVEL": "WARNING",
            # Only /auth goes to a hook while connecting: never refuse one in a burst.
            "HOOK_TIMEOUT_MS": "5000",
            "HOOK_QUEUE_TIMEOUT_MS": "5000",
            **self.extra_env,
        }
        with self._open_log() as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mics", "gateway",
                "--port", str(self.port), "--redis", self.redis_url,
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=die_with_parent(signal.SIGTERM),
            )  # fmt: skip
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"node {self.name} exited; see {self.log_path}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{self.port}/readyz") as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {self.name} not ready; see {self.log_path}")
                await asyncio.sleep(0.05)

    async def metrics(self) -> dict[str, float]:
        """Every sample of ``/metrics``: ``name{labels}`` -> value."""
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{self.port}/metrics") as resp,
        ):
            text = await resp.text()
        samples: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    async def stop(self) -> None:
        """SIGTERM (graceful drain), SIGKILL after 15 s."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def sample(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


@dataclass
class Cluster:
    """Node processes sharing one Redis; stopped together."""

    redis_url: str
    env: dict[str, str]
    log_dir: str
    nodes: list[Node] = field(default_factory=list)

    def add(self, name: str) -> Node:
        node = Node(name, self.redis_url, self.env, self.log_dir)
        self.nodes.append(node)
        return node

    async def start(self) -> None:
        await asyncio.gather(*(node.start() for node in self.nodes))

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes), return_exceptions=True)


def cpu_sampler(pids: dict[str, int]) -> Any:
    """CPU % of each process (of one CPU) and of the rest of the machine, since now."""
    start = {name: cpu_seconds(pid) for name, pid in pids.items()}
    machine0 = machine_cpu_seconds()
    t0 = time.monotonic()

    def read() -> tuple[dict[str, float], float]:
        wall = time.monotonic() - t0
        cpu = {n: 100.0 * (cpu_seconds(p) - start[n]) / wall for n, p in pids.items()}
        machine = 100.0 * (machine_cpu_seconds() - machine0) / wall
        cpu["other"] = max(0.0, machine - sum(cpu.values()))
        return cpu, wall

    return read


def forward_calls(metrics_a: dict[str, float], forwards: float) -> dict[str, float]:
    """A's forward RPCs by kind, and how many forwards each ForwardMany carried on
    average (``forwards`` = single-recipient forwards B received; retries ignored)."""
    single = sample(metrics_a, "mics_grpc_forward_calls_total", rpc="ForwardSingle")
    many = sample(metrics_a, "mics_grpc_forward_calls_total", rpc="ForwardMany")
    return {
        "ForwardSingle": single,
        "ForwardMany": many,
        "per ForwardMany": (forwards - single) / many if many else 0.0,
        "forwards per call": forwards / (single + many) if single + many else 0.0,
    }


def fmt_calls(calls: dict[str, float]) -> str:
    return (
        f"{calls['ForwardSingle']:,.0f} ForwardSingle, {calls['ForwardMany']:,.0f} ForwardMany "
        f"({calls['per ForwardMany']:.1f} forwards each); "
        f"{calls['forwards per call']:.2f} forwards per call"
    )


def fmt_cpu(cpu: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.0f}%" for name, value in cpu.items())


def ms(values: array[int] | list[int], q: float) -> float:
    return percentile(values, q) / 1e6


# -- phase 1: latency at a fixed offered load --------------------------------------------------


async def phase_latency(
    args: argparse.Namespace, redis: RedisServer, auth_url: str, tmp: str
) -> dict[str, Any]:
    cluster = Cluster(redis.url, {"TENANT_AUTH_MAP": json.dumps({TENANT: auth_url})}, tmp)
    a, b = cluster.add("A"), cluster.add("B")
    pairs = list(range(args.open_pairs))
    nodes = {f"s{i}": "A" for i in pairs}
    nodes.update({f"r{i}": ("A" if i % 2 == 0 else "B") for i in pairs})
    load: Child | None = None
    try:
        await cluster.start()
        load = Child(
            "open-load",
            "bench._cluster_load",
            {
                "loop": "open",
                "ports": {"A": a.port, "B": b.port},
                "nodes": nodes,
                "pairs": pairs,
                "sender_node": "A",
                "rate": args.rate,
                "seconds": args.seconds,
                "warmup_s": args.warmup,
                "body": args.body,
                "time_limit": 30,
                "out_dir": tmp,
                "name": "open",
            },
        )
        await load.start(60)
        await wait_quiet(args.quiet_wait)
        read_cpu = cpu_sampler(
            {"node A": a.pid, "node B": b.pid, "load": load.pid, "redis": redis.pid or 0}
        )
        answer = await load.command("go", args.warmup + args.seconds + 60)
        cpu, wall = read_cpu()
        metrics_a, metrics_b = await a.metrics(), await b.metrics()
    finally:
        await stop_all([load])
        await cluster.stop()
    files = answer["files"]
    result: dict[str, Any] = {"answer": answer, "cpu": cpu}
    # CPU per message over the whole run (warm-up included, like the counters): A
    # handles every message, B only the cross-node ones.
    local = sample(metrics_a, "mics_deliveries_total", via="local")
    cross = sample(metrics_b, "mics_deliveries_total", via="grpc_in_single")
    result["us_per_msg"] = {
        "A per message": cpu["node A"] / 100.0 * wall * 1e6 / max(1.0, local + cross),
        "B per cross-node message": cpu["node B"] / 100.0 * wall * 1e6 / max(1.0, cross),
    }
    result["calls"] = forward_calls(metrics_a, cross)
    for name in ("cross", "local"):
        delivery = sorted(load_array(files[f"{name}_delivery"]))
        acks = sorted(load_array(files[f"{name}_ack"]))
        result[name] = {
            "count": len(delivery),
            "p50": ms(delivery, 0.50),
            "p99": ms(delivery, 0.99),
            "p999": ms(delivery, 0.999),
            "max": ms(delivery, 1.0),
            "ack_p50": ms(acks, 0.50),
            "ack_p99": ms(acks, 0.99),
        }
    lateness = sorted(load_array(files["lateness"]))
    result["lateness"] = {q: ms(lateness, v) for q, v in (("p50", 0.5), ("p99", 0.99), ("max", 1))}
    # The paths really taken, by the nodes' own counters (warm-up included).
    result["via"] = {
        "A local": sample(metrics_a, "mics_deliveries_total", via="local"),
        "B grpc_in_single": sample(metrics_b, "mics_deliveries_total", via="grpc_in_single"),
        "A forward failed": sample(metrics_a, "mics_grpc_forward_failed_total"),
    }
    return result


def print_latency(r: dict[str, Any], args: argparse.Namespace) -> None:
    a = r["answer"]
    share = f"{args.open_pairs // 2 + args.open_pairs % 2} local + {args.open_pairs // 2} cross"
    print(
        f"\nlatency: open loop, {args.rate:,.0f} msg/s offered for {args.seconds:.0f} s "
        f"(after {args.warmup:.0f} s warm-up), {args.open_pairs} senders on A ({share} "
        f"receivers), {args.body}-byte bodies; latency from the scheduled send time"
    )
    header = (
        f"{'path':<11} {'msgs':>6} {'dlv p50':>8} {'dlv p99':>8} {'p99.9':>8} {'max':>8} "
        f"{'ack p50':>8} {'ack p99':>8}  goal"
    )
    print(header)
    print("-" * len(header))
    for name, goal in (("cross", CROSS_P99_GOAL_MS), ("local", LOCAL_P99_GOAL_MS)):
        x = r[name]
        verdict = "OK" if x["p99"] <= goal else "MISSED"
        label = "cross-node" if name == "cross" else "local"
        print(
            f"{label:<11} {x['count']:>6} {x['p50']:>6.2f}ms {x['p99']:>6.2f}ms "
            f"{x['p999']:>6.2f}ms {x['max']:>6.2f}ms {x['ack_p50']:>6.2f}ms "
            f"{x['ack_p99']:>6.2f}ms  p99 <= {goal:.0f} ms: {verdict}"
        )
    late = r["lateness"]
    print(
        f"load generator send lateness (included above): p50 {late['p50']:.3f} ms, "
        f"p99 {late['p99']:.3f} ms, max {late['max']:.3f} ms"
    )
    print(f"CPU: {fmt_cpu(r['cpu'])}")
    per_msg = ", ".join(f"{k} {v:.0f} us" for k, v in r["us_per_msg"].items())
    print(f"CPU per message (whole run): {per_msg}")
    via = ", ".join(f"{k} {v:.0f}" for k, v in r["via"].items())
    print(f"node counters (incl. warm-up): {via}")
    print(f"forward calls A -> B: {fmt_calls(r['calls'])}")
    problems = []
    if not a["completed"]:
        problems.append("time limit: partial run")
    if a["failed"] or a["not_live"]:
        problems.append(f"{a['failed']} FAILED acks, {a['not_live']} not delivered live")
    if a["out_of_order"] or a["unexpected"]:
        problems.append(f"{a['out_of_order']} out of order, {a['unexpected']} unexpected")
    delivered = sum(a["delivered"].values())
    if delivered != a["scheduled"] or a["acked"] != a["scheduled"]:
        problems.append(f"scheduled {a['scheduled']}, acked {a['acked']}, delivered {delivered}")
    if problems:
        print("WARNING: " + "; ".join(problems))


# -- phase 2: cross-node throughput, closed loop ----------------------------------------------


async def phase_throughput(
    args: argparse.Namespace, redis: RedisServer, auth_url: str, tmp: str
) -> dict[str, Any]:
    cluster = Cluster(redis.url, {"TENANT_AUTH_MAP": json.dumps({TENANT: auth_url})}, tmp)
    a, b = cluster.add("A"), cluster.add("B")
    # Other user names than phase 1: message ids restart at 0 for every sender.
    pairs = list(range(1000, 1000 + args.pairs))
    nodes = {f"s{i}": "A" for i in pairs}
    nodes.update({f"r{i}": "B" for i in pairs})
    per_sender = args.messages // args.pairs
    load: Child | None = None
    try:
        await cluster.start()
        load = Child(
            "closed-load",
            "bench._cluster_load",
            {
                "loop": "closed",
                "ports": {"A": a.port, "B": b.port},
                "nodes": nodes,
                "pairs": pairs,
                "per_sender": per_sender,
                "window": args.window,
                "body": args.body,
                "time_limit": args.time_limit,
                "out_dir": tmp,
                "name": "closed",
            },
        )
        await load.start(60)
        await wait_quiet(args.quiet_wait)
        read_cpu = cpu_sampler(
            {"node A": a.pid, "node B": b.pid, "load": load.pid, "redis": redis.pid or 0}
        )
        answer = await load.command("go", args.time_limit + 60)
        cpu, wall = read_cpu()
        metrics_a, metrics_b = await a.metrics(), await b.metrics()
    finally:
        await stop_all([load])
        await cluster.stop()
    seconds = (answer["last_recv_ns"] - answer["first_send_ns"]) / 1e9
    delivered = answer["delivered"]
    dels = sorted(load_array(answer["delivery_file"]))
    acks = sorted(load_array(answer["ack_file"]))
    us_per_msg = {
        node: cpu[node] / 100.0 * wall * 1e6 / delivered if delivered else 0.0
        for node in ("node A", "node B")
    }
    return {
        "answer": answer,
        "expected": per_sender * args.pairs,
        "msg_per_s": delivered / seconds if seconds > 0 else 0.0,
        "seconds": seconds,
        "dlv_p50": ms(dels, 0.5),
        "dlv_p99": ms(dels, 0.99),
        "ack_p50": ms(acks, 0.5),
        "ack_p99": ms(acks, 0.99),
        "cpu": cpu,
        "us_per_msg": us_per_msg,
        "via": {
            "B grpc_in_single": sample(metrics_b, "mics_deliveries_total", via="grpc_in_single"),
            "A forward failed": sample(metrics_a, "mics_grpc_forward_failed_total"),
            "A offline buffered": sample(metrics_a, "mics_offline_buffered_total"),
        },
        "calls": forward_calls(
            metrics_a, sample(metrics_b, "mics_deliveries_total", via="grpc_in_single")
        ),
    }


def print_throughput(r: dict[str, Any], args: argparse.Namespace) -> None:
    a = r["answer"]
    print(
        f"\nthroughput: closed loop, {args.pairs} senders on A -> receivers on B, window "
        f"{args.window}/sender, {r['expected']:,} messages"
    )
    print(
        f"cross-node: {r['msg_per_s']:,.0f} msg/s ({a['delivered']:,} delivered in "
        f"{r['seconds']:.1f} s); delivery p50/p99 {r['dlv_p50']:.1f}/{r['dlv_p99']:.1f} ms, "
        f"ack p50/p99 {r['ack_p50']:.1f}/{r['ack_p99']:.1f} ms (queueing included)"
    )
    us = r["us_per_msg"]
    per_msg = f"A {us['node A']:.0f} us, B {us['node B']:.0f} us"
    print(f"CPU: {fmt_cpu(r['cpu'])}; CPU per message: {per_msg}")
    via = ", ".join(f"{k} {v:.0f}" for k, v in r["via"].items())
    print(f"node counters: {via}")
    print(f"forward calls A -> B: {fmt_calls(r['calls'])}")
    problems = []
    if not a["completed"]:
        problems.append("time limit: partial run")
    if a["failed"] or a["out_of_order"] or a["unexpected"]:
        problems.append(
            f"{a['failed']} FAILED, {a['out_of_order']} out of order, {a['unexpected']} unexpected"
        )
    if a["acked"] != a["sent"] or a["delivered"] != a["sent"]:
        problems.append(f"sent {a['sent']}, acked {a['acked']}, delivered {a['delivered']}")
    if problems:
        print("WARNING: " + "; ".join(problems))


# -- phase 3: bytes between nodes per group message --------------------------------------------


class CountingRelay:
    """A TCP relay in front of one node's gRPC port, counting the bytes each way.

    What it counts is the TCP payload: every HTTP/2 frame of the gRPC calls made to
    the node (headers, DATA with the protobuf, trailers, SETTINGS, PING, WINDOW_UPDATE),
    not the TCP/IP headers.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.counts = {"to_node": 0, "from_node": 0}
        self.connections = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pump(reader, up_writer, "to_node"), self._pump(up_reader, writer, "from_node")
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        try:
            while data := await reader.read(65536):
                self.counts[direction] += len(data)
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    def snapshot(self) -> tuple[int, int]:
        return self.counts["to_node"], self.counts["from_node"]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@dataclass(frozen=True)
class BytesCase:
    hosting: int  # nodes hosting members (the sender's node A first)
    per_node: int  # members on each of them (on A: the sender and per_node - 1 others)

    @property
    def group(self) -> str:
        return f"grp-{self.hosting}x{self.per_node}"

    def members(self, node_names: list[str]) -> dict[str, list[str]]:
        """Node name -> the members connected there."""
        return {
            node: [f"g{self.hosting}x{self.per_node}-{node}{j}" for j in range(self.per_node)]
            for node in node_names[: self.hosting]
        }


def parse_cases(text: str) -> list[BytesCase]:
    cases = []
    for item in text.split(","):
        hosting, _, per_node = item.strip().partition("x")
        cases.append(BytesCase(int(hosting), int(per_node)))
    return cases


async def phase_bytes(args: argparse.Namespace, redis: RedisServer, tmp: str) -> dict[str, Any]:
    names = ["A", "B", "C"]
    cases = parse_cases(args.bytes_cases)
    groups = {
        case.group: [user for users in case.members(names).values() for user in users]
        for case in cases
    }
    users = [user for members in groups.values() for user in members]
    backend = BackendServer(
        BackendConfig(
            host="127.0.0.1",
            port=0,
            tenants={
                TENANT: TenantConfig(
                    secret=SECRET,
                    heartbeat_timeout_seconds=3600,
                    offline_mode="legacy",
                    users={user: UserConfig(tokens=[user]) for user in users},
                    groups=groups,
                )
            },
        )
    )
    await backend.start()
    env = {
        "TENANT_AUTH_MAP": json.dumps({TENANT: backend.url}),
        "TENANT_HOOK_SECRETS": json.dumps({TENANT: SECRET}),
        "HOOK_SIGN_REQUIRED": "true",
    }
    cluster = Cluster(redis.url, env, tmp)
    relays: dict[str, CountingRelay] = {}
    clients: list[MicsClient] = []
    rows: list[dict[str, Any]] = []
    try:
        for name in names:
            node = cluster.add(name)
            relay = relays[name] = CountingRelay(node.grpc_port)
            await relay.start()
            node.public_grpc_port = relay.port
        await cluster.start()
        by_name = {node.name: node for node in cluster.nodes}
        for case in cases:
            rows.append(await measure_case(args, case, by_name, relays, clients, redis))
            for client in clients:
                await client.close()
            clients.clear()
    finally:
        for client in clients:
            with contextlib.suppress(Exception):
                await client.close()
        await cluster.stop()
        for relay in relays.values():
            await relay.stop()
        await backend.stop()
    return {"rows": rows}


async def measure_case(
    args: argparse.Namespace,
    case: BytesCase,
    nodes: dict[str, Node],
    relays: dict[str, CountingRelay],
    clients: list[MicsClient],
    redis: RedisServer,
) -> dict[str, Any]:
    members = case.members(list(nodes))

    async def connect(node: str, user: str) -> MicsClient:
        client = MicsClient(
            ClientOptions(
                url=nodes[node].ws_url,
                tenant_id=TENANT,
                token=user,
                device_id="d0",
                protocol_version=None,  # v1: no receipts, no offline_sync frames
                reconnect=False,
                heartbeat_interval_s=0,
                ack_timeout_s=10,
            )
        )
        await client.connect()
        clients.append(client)
        return client

    connected = await asyncio.gather(
        *(connect(node, user) for node, users in members.items() for user in users)
    )
    sender = connected[0]  # the first member on A
    body = b"x" * args.body
    last: dict[str, msg_pb.MessageRequest] = {}

    async def send(count: int, prefix: str) -> None:
        for i in range(count):
            ack = await sender.send_group(case.group, body, msg_id=f"{prefix}-{i}")
            if ack.status != msg_pb.SENT or ack.partial_delivery:
                raise RuntimeError(f"group message not fully delivered: {ack}")
        for client in connected:
            for _ in range(count):
                message = await client.next_delivery(timeout=10)
                last[client.options.token] = message

    await send(args.bytes_warmup, f"warm{case.group}")  # channels up, HPACK tables warm
    await asyncio.sleep(0.5)
    before = {name: relay.snapshot() for name, relay in relays.items()}
    calls_before = await nodes["A"].metrics()
    redis_before = redis_net(redis)
    await send(args.bytes_messages, f"m{case.group}")
    await asyncio.sleep(0.5)  # let trailing HTTP/2 frames (PING, WINDOW_UPDATE) pass
    after = {name: relay.snapshot() for name, relay in relays.items()}
    calls_after = await nodes["A"].metrics()
    redis_after = redis_net(redis)
    n = args.bytes_messages
    to_node = sum(after[x][0] - before[x][0] for x in relays) / n
    from_node = sum(after[x][1] - before[x][1] for x in relays) / n
    calls = sum(
        sample(calls_after, "mics_grpc_forward_duration_ms_count", via=via)
        - sample(calls_before, "mics_grpc_forward_duration_ms_count", via=via)
        for via in ("grpc_single", "grpc_batch")
    )
    # What the sender serialized: one request per remote node hosting members.
    payload = 0
    for node, users in members.items():
        if node == "A":
            continue
        message = last[users[0]]
        if len(users) == 1:
            request: Any = node_pb.ForwardSingleRequest(
                tenant_id=TENANT, to_user_id=users[0], message=message
            )
        else:
            request = node_pb.ForwardBatchRequest(
                tenant_id=TENANT, to_user_ids=users, message=message
            )
        payload += request.ByteSize()
    return {
        "hosting": case.hosting,
        "per_node": case.per_node,
        "members": sum(len(u) for u in members.values()),
        "calls_per_msg": calls / n,
        "to_node": to_node,
        "from_node": from_node,
        "payload": payload,
        "message": last[members["A"][0]].ByteSize(),
        "redis_in": (redis_after[0] - redis_before[0]) / n,
        "redis_out": (redis_after[1] - redis_before[1]) / n,
    }


def redis_net(redis: RedisServer) -> tuple[int, int]:
    """Redis's total_net_input_bytes and total_net_output_bytes (INFO stats)."""
    with contextlib.closing(redis.client()) as client:
        info = client.info("stats")
    return int(info["total_net_input_bytes"]), int(info["total_net_output_bytes"])


def print_bytes(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nbytes between nodes per group message: 3 nodes A, B, C, sender on A, "
        f"{args.body}-byte bodies, {args.bytes_messages} messages per row (after "
        f"{args.bytes_warmup} warm-up); wire = TCP payload through the relays in front of "
        f"the nodes' gRPC ports"
    )
    header = (
        f"{'nodes w/ members':>16} {'members':>8} {'calls/msg':>9} {'requests B':>10} "
        f"{'responses B':>11} {'wire total':>10} {'serialized':>10} {'overhead/call':>13} "
        f"{'redis B':>8}"
    )
    print(header)
    print("-" * len(header))
    for row in r["rows"]:
        wire = row["to_node"] + row["from_node"]
        calls = row["calls_per_msg"]
        overhead = (wire - row["payload"]) / calls if calls else 0.0
        print(
            f"{row['hosting']:>16} {row['members']:>8} {calls:>9.2f} {row['to_node']:>10.0f} "
            f"{row['from_node']:>11.0f} {wire:>10.0f} {row['payload']:>10} "
            + (f"{overhead:>13.0f}" if calls else f"{'-':>13}")
            + f" {row['redis_in'] + row['redis_out']:>8.0f}"
        )
    if r["rows"]:
        print(
            f"(the forwarded MessageRequest itself: {r['rows'][0]['message']} bytes; "
            "'redis B' = Redis traffic in + out per message, all nodes, for comparison)"
        )


# -- main -----------------------------------------------------------------------------------


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (src/ modified)" if dirty else "")


def print_node_logs(log_dir: str) -> None:
    """The end of every node's log (stdout and stderr), after a failure."""
    for name in sorted(os.listdir(log_dir)):
        path = os.path.join(log_dir, name)
        if name.startswith("node-") and os.path.getsize(path):
            with open(path, encoding="utf-8", errors="replace") as fh:
                print(f"--- {name} ---\n{fh.read()[-3000:]}", file=sys.stderr)


async def amain(args: argparse.Namespace) -> None:
    raise_nofile()
    print(
        f"cluster — {time.strftime('%Y-%m-%d')}, commit {git_commit()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}; node processes: "
        "python -m mics gateway --redis (uvloop)",
        flush=True,
    )
    redis = RedisServer()
    auth = AuthServer()
    try:
        redis.start()
        auth_url = await auth.start()
        with tempfile.TemporaryDirectory(prefix="mics-bench-cluster-") as tmp:
            try:
                if "latency" in args.phases:
                    print("latency phase ...", flush=True)
                    print_latency(await phase_latency(args, redis, auth_url, tmp), args)
                    redis.flushall()
                if "throughput" in args.phases:
                    print("\nthroughput phase ...", flush=True)
                    print_throughput(await phase_throughput(args, redis, auth_url, tmp), args)
                    redis.flushall()
                if "bytes" in args.phases:
                    print("\nbytes phase ...", flush=True)
                    print_bytes(await phase_bytes(args, redis, tmp), args)
            except Exception:
                print_node_logs(tmp)
                raise
    finally:
        await auth.stop()
        redis.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="latency: offered msg/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="latency: measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="latency: unrecorded seconds")
    parser.add_argument(
        "--open-pairs",
        type=int,
        default=20,
        help="latency: senders on A; receivers alternate A (local) and B (cross-node)",
    )
    parser.add_argument("--pairs", type=int, default=50, help="throughput: A->B pairs")
    parser.add_argument("--window", type=int, default=16, help="throughput: un-acked/sender")
    parser.add_argument("--messages", type=int, default=60_000, help="throughput: total")
    parser.add_argument("--time-limit", type=float, default=60.0, help="throughput: seconds")
    parser.add_argument("--body", type=int, default=100, help="msg_body bytes (>= 24)")
    parser.add_argument(
        "--bytes-cases",
        default="1x5,2x5,3x5,3x50",
        help="bytes: HxM = members on H nodes (A first), M on each",
    )
    parser.add_argument("--bytes-messages", type=int, default=200)
    parser.add_argument("--bytes-warmup", type=int, default=20)
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=30.0,
        help="seconds to wait for other processes to go quiet before a measurement",
    )
    args = parser.parse_args()
    for phase in args.phases:
        if phase not in PHASES:
            parser.error(f"unknown phase {phase!r}; choose from {', '.join(PHASES)}")
    if args.body < 24:
        parser.error("--body must be at least 24 bytes (the stamp)")
    try:
        run(lambda: amain(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
    finally:
        with contextlib.suppress(Exception):
            kill_children()


if __name__ == "__main__":
    main()
