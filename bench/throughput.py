"""1:1 messaging throughput and latency: the gateway versus the raw aiohttp WebSocket stack.

    python -m bench.throughput                                  # all four scenarios
    python -m bench.throughput --scenarios hooks-off --cprofile # with a gateway profile
    python -m bench.throughput --load-procs 2 --client aiohttp  # other load layouts

Scenarios (each with fresh server processes; K pairs, each sender keeping ``--window``
messages outstanding, ``--messages`` in total, 100-byte bodies):

- ``raw-echo``: ``bench._echo_proc`` echo mode, the raw rate of aiohttp's WebSocket
  server with the same client load (the echo is the "ack" and the "delivery");
- ``raw-relay``: ``bench._echo_proc`` relay mode, a hand-written 1:1 relay on bare
  aiohttp (1 frame in, 2 frames out, like the gateway) with no protocol work;
- ``hooks-off``: a gateway whose tenant /auth (``bench._auth``) returns
  ``hook_base_url=""``: no /check-message, messages processed inline;
- ``check-message``: a gateway in front of the reference backend (``mics.backend``, its
  own process), which checks every message (signed hooks).

Processes: this orchestrator (also the /auth server of ``hooks-off``; idle during the
measurement), one server process, the backend process for ``check-message``, and
``--load-procs`` load processes (``bench._load_proc``). Every process runs uvloop. CPU
use of each process over the run is read from /proc and printed, so a saturated load
generator is visible.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp

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
)

TENANT = "bench"
SECRET = "bench-secret"
SCENARIOS = ("raw-echo", "raw-relay", "hooks-off", "check-message")
RATIO_GOAL = 0.35


@dataclass
class Result:
    scenario: str
    completed: bool
    expected: int
    sent: int
    acked: int
    failed: int
    delivered: int
    out_of_order: int
    unexpected: int
    seconds: float
    msg_per_s: float
    ack_p50_ms: float
    ack_p99_ms: float
    delivery_p50_ms: float
    delivery_p99_ms: float
    cpu_pct: dict[str, float] = field(default_factory=dict)
    gateway_counters: dict[str, float] = field(default_factory=dict)
    runs_msg_per_s: list[int] = field(default_factory=list)
    wall_s: float = 0.0  # "go" to the last answer: the interval of cpu_pct


def gateway_settings(scenario: str, auth_url: str, args: argparse.Namespace) -> dict[str, Any]:
    if scenario == "hooks-off":
        return {
            "tenant_auth_map": {TENANT: auth_url},
            "hook_queue_timeout_ms": 5000,  # only /auth, only while connecting
            "hook_timeout_ms": 5000,
        }
    settings: dict[str, Any] = {
        "tenant_auth_map": {TENANT: auth_url},
        "tenant_hook_secrets": {TENANT: SECRET},
        "hook_sign_required": True,
    }
    if args.hook_timeout_ms:
        settings["hook_timeout_ms"] = args.hook_timeout_ms
    return settings


async def scrape(port: int) -> dict[str, float]:
    """The gateway counters that tell whether messages really took the measured path."""
    wanted = (
        "mics_hook_requests_total",
        "mics_hook_check_message_total",
        "mics_messages_failed_total",
        "mics_messages_rejected_total",
        "mics_ws_slow_consumer_closed_total",
        "mics_deliveries_total",
        "mics_hook_duration_ms_sum",
        "mics_hook_duration_ms_count",
    )
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        text = await resp.text()
    counters: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            name, _, value = line.rpartition(" ")
            if float(value):
                counters[name] = float(value)
    return counters


class PySpy:
    """``py-spy record`` of one process for the duration of the measurement."""

    def __init__(self, binary: str, pid: int, out: str) -> None:
        self.binary, self.pid, self.out = binary, pid, out
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.binary, "record", "--pid", str(self.pid), "--rate", "250", "--format", "raw",
            "--output", self.out,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def report(self, limit: int = 25) -> None:
        if not os.path.exists(self.out):
            print("py-spy wrote nothing (is ptrace allowed?)")
            return
        own: Counter[str] = Counter()
        own_lines: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        with open(self.out, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                stack, _, count_text = line.rstrip("\n").rpartition(" ")
                if not stack:
                    continue
                count = int(count_text)
                frames = stack.split(";")
                total += count
                own[_frame_name(frames[-1], lines=False)] += count
                own_lines[_frame_name(frames[-1], lines=True)] += count
                for name in {_frame_name(f, lines=False) for f in frames}:
                    inclusive[name] += count
        if not total:
            print("py-spy recorded no samples")
            return
        print(f"\n-- py-spy: server process, {total} samples; own time by function --")
        for name, count in own.most_common(limit):
            print(f"  {100 * count / total:5.1f}%  {name}")
        print("-- py-spy: own time by line --")
        for name, count in own_lines.most_common(limit // 2):
            print(f"  {100 * count / total:5.1f}%  {name}")
        print("-- py-spy: inclusive time by function --")
        for name, count in inclusive.most_common(limit + 6):
            print(f"  {100 * count / total:5.1f}%  {name}")


def _frame_name(frame: str, *, lines: bool) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)", or "func (file.py)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        i = where.find(marker)
        if i >= 0:
            where = where[i + len(marker) :]
            break
    if not lines:
        where = where.rpartition(":")[0] or where
    return f"{name} ({where})" if where else name


def load_array(path: str) -> array[int]:
    values = array("q")
    with open(path, "rb") as fh:
        values.frombytes(fh.read())
    return values


async def run_scenario(scenario: str, args: argparse.Namespace, auth_url: str, tmp: str) -> Result:
    children: list[Child | None] = []
    backend: Child | None = None
    pyspy: PySpy | None = None
    prof_path = os.path.join(tmp, f"{scenario}.prof")
    profile_env = {"BENCH_CPROFILE": prof_path} if args.cprofile else None
    try:
        if scenario.startswith("raw-"):
            mode = scenario[4:]
            server = Child(scenario, "bench._echo_proc", {"mode": mode}, env=profile_env)
        else:
            mode = "gateway"
            hook_url = auth_url
            if scenario == "check-message":
                backend = Child(
                    "backend",
                    "bench._backend_proc",
                    {
                        "pairs": args.pairs,
                        "secret": SECRET,
                        "hook_queue_timeout_ms": (
                            args.check_queue_timeout_ms
                            if args.check_queue_timeout_ms >= 0
                            else None
                        ),
                        "hook_max_concurrency": args.check_concurrency,
                    },
                )
                children.append(backend)
                hook_url = (await backend.start())["url"]
            server = Child(
                "gateway",
                "bench._gateway_proc",
                gateway_settings(scenario, hook_url, args),
                env=profile_env,
            )
        children.append(server)
        port = int((await server.start())["port"])
        messages = args.check_messages if scenario == "check-message" else args.messages
        per_sender = messages // args.pairs
        loads = [
            Child(
                f"load{j}",
                "bench._load_proc",
                {
                    "port": port,
                    "pairs": list(range(j, args.pairs, args.load_procs)),
                    "mode": mode,
                    "client": args.client,
                    "per_sender": per_sender,
                    "window": args.window,
                    "body": args.body,
                    "time_limit": args.time_limit,
                    "out_dir": tmp,
                    "name": f"{scenario}-load{j}",
                },
            )
            for j in range(args.load_procs)
        ]
        children.extend(loads)
        await asyncio.gather(*(load.start(60) for load in loads))

        pids = {"server": server.pid}
        if backend is not None:
            pids["backend"] = backend.pid
        pids.update({load.name: load.pid for load in loads})
        pids["orchestrator"] = os.getpid()
        profiling = bool(args.cprofile or args.py_spy)
        if profiling and args.cprofile:
            await server.command("profile_start")
        if profiling and args.py_spy:
            pyspy = PySpy(args.py_spy, server.pid, os.path.join(tmp, f"{scenario}.pyspy"))
            await pyspy.start()
        cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
        machine0 = machine_cpu_seconds()
        t0 = time.monotonic()
        for load in loads:
            load.send("go")
        answers = await asyncio.gather(*(load.reply(args.time_limit + 60) for load in loads))
        wall = time.monotonic() - t0
        cpu = {name: 100.0 * (cpu_seconds(pid) - cpu0[name]) / wall for name, pid in pids.items()}
        # Everything else on the machine (other users' jobs, kernel threads): noise.
        machine = 100.0 * (machine_cpu_seconds() - machine0) / wall
        cpu["other"] = max(0.0, machine - sum(cpu.values()))
        if pyspy is not None:
            await pyspy.stop()
        profile_path = ""
        if profiling and args.cprofile:
            profile_path = (await server.command("profile_stop", 120))["profile"]
        counters = await scrape(port) if mode == "gateway" else {}
    finally:
        if pyspy is not None:
            await pyspy.stop()
        await stop_all(list(reversed(children)))

    ack_lat = array("q")
    del_lat = array("q")
    for answer in answers:
        ack_lat.extend(load_array(answer["ack_file"]))
        del_lat.extend(load_array(answer["delivery_file"]))
    acks = sorted(ack_lat)
    dels = sorted(del_lat)
    start = min(a["first_send_ns"] for a in answers if a["first_send_ns"])
    end = max(a["last_recv_ns"] for a in answers)
    seconds = (end - start) / 1e9 if end > start else float("nan")
    delivered = sum(a["delivered"] for a in answers)
    result = Result(
        scenario=scenario,
        completed=all(a["completed"] for a in answers),
        expected=per_sender * args.pairs,
        sent=sum(a["sent"] for a in answers),
        acked=sum(a["acked"] for a in answers),
        failed=sum(a["failed"] for a in answers),
        delivered=delivered,
        out_of_order=sum(a["out_of_order"] for a in answers),
        unexpected=sum(a["unexpected"] for a in answers),
        seconds=seconds,
        msg_per_s=delivered / seconds if seconds else 0.0,
        ack_p50_ms=percentile(acks, 0.50) / 1e6,
        ack_p99_ms=percentile(acks, 0.99) / 1e6,
        delivery_p50_ms=percentile(dels, 0.50) / 1e6,
        delivery_p99_ms=percentile(dels, 0.99) / 1e6,
        cpu_pct=cpu,
        gateway_counters=counters,
        wall_s=wall,
    )
    if pyspy is not None:
        pyspy.report()
    if profile_path:
        print_profile(profile_path)
    return result


def print_result(r: Result) -> None:
    cpu = ", ".join(f"{k} {v:.0f}%" for k, v in r.cpu_pct.items())
    state = "" if r.completed else "  (TIME LIMIT: partial)"
    print(
        f"  {r.delivered} delivered in {r.seconds:.1f} s = {r.msg_per_s:,.0f} msg/s; "
        f"ack p50/p99 {r.ack_p50_ms:.1f}/{r.ack_p99_ms:.1f} ms, delivery p50/p99 "
        f"{r.delivery_p50_ms:.1f}/{r.delivery_p99_ms:.1f} ms{state}"
    )
    print(f"  CPU: {cpu}")
    problems = []
    if r.failed:
        problems.append(f"{r.failed} acks FAILED")
    if r.out_of_order:
        problems.append(f"{r.out_of_order} deliveries out of order")
    if r.unexpected:
        problems.append(f"{r.unexpected} unexpected frames")
    if r.acked != r.sent or r.delivered != r.sent:
        problems.append(f"sent {r.sent}, acked {r.acked}, delivered {r.delivered}")
    degraded = sum(
        v for k, v in r.gateway_counters.items()
        if k.startswith("mics_hook_check_message_total") and 'result="allow"' not in k
    )  # fmt: skip
    if degraded:
        problems.append(f"{degraded:.0f} messages not allowed by a real /check-message answer "
                        "(degraded = failed open: timeout, queue or breaker)")  # fmt: skip
    if problems:
        print("  WARNING: " + "; ".join(problems))
    for name, value in r.gateway_counters.items():
        print(f"    {name} {value:.0f}")


def server_us_per_msg(r: Result) -> float:
    """Server CPU time per delivered message: comparable even when it is not saturated."""
    cpu_us = r.cpu_pct.get("server", 0.0) / 100.0 * r.wall_s * 1e6
    return cpu_us / r.delivered if r.delivered else 0.0


def report(results: list[Result], args: argparse.Namespace) -> None:
    print()
    print(
        f"throughput — {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}, aiohttp {aiohttp.__version__}, uvloop; "
        f"{args.pairs} pairs, window {args.window}/sender, {args.body}-byte bodies, "
        f"{args.load_procs} load process(es), {args.client} client"
    )
    header = (
        f"{'scenario':<14} {'msg/s':>9} {'ack p50':>8} {'ack p99':>8} {'dlv p50':>8} "
        f"{'dlv p99':>8} {'srv us/msg':>10} {'server CPU':>10} {'load CPU':>9} {'backend':>8} "
        f"{'other':>6} {'done':>5}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        load_cpu = sum(v for k, v in r.cpu_pct.items() if k.startswith("load"))
        backend = r.cpu_pct.get("backend")
        echo = r.scenario == "raw-echo"
        print(
            f"{r.scenario:<14} {r.msg_per_s:>9,.0f} {r.ack_p50_ms:>6.1f}ms {r.ack_p99_ms:>6.1f}ms "
            + (f"{'-':>8} {'-':>8} " if echo else
               f"{r.delivery_p50_ms:>6.1f}ms {r.delivery_p99_ms:>6.1f}ms ")
            + f"{server_us_per_msg(r):>10.1f} "
            + f"{r.cpu_pct.get('server', 0):>9.0f}% {load_cpu:>8.0f}% "
            + (f"{backend:>7.0f}%" if backend is not None else f"{'-':>8}")
            + f" {r.cpu_pct.get('other', 0):>5.0f}%"
            + f" {'yes' if r.completed else 'NO':>5}"
        )  # fmt: skip
    if any(len(r.runs_msg_per_s) > 1 for r in results):
        print("best of " + str(args.repeat) + " runs by msg/s; all runs: " + "; ".join(
            f"{r.scenario} " + "/".join(f"{v:,}" for v in r.runs_msg_per_s) for r in results
        ))  # fmt: skip
    by_name = {r.scenario: r for r in results}
    gateway = by_name.get("hooks-off")
    for raw_name in ("raw-echo", "raw-relay"):
        raw = by_name.get(raw_name)
        if gateway and raw and raw.msg_per_s:
            ratio = gateway.msg_per_s / raw.msg_per_s
            goal = f" (goal >= {RATIO_GOAL}: {'OK' if ratio >= RATIO_GOAL else 'BELOW'})"
            print(
                f"gateway hooks-off / {raw_name}: {ratio:.2f}"
                + (goal if raw_name == "raw-echo" else "")
            )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(
                {"args": {k: v for k, v in vars(args).items() if k != "json"},
                 "results": [asdict(r) for r in results]},
                fh, indent=2,
            )  # fmt: skip


async def amain(args: argparse.Namespace) -> list[Result]:
    raise_nofile()
    auth = AuthServer()
    auth_url = await auth.start()
    results: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="mics-bench-") as tmp:
            for scenario in args.scenarios:
                runs: list[Result] = []
                for rep in range(args.repeat):
                    await wait_quiet(args.quiet_wait)
                    messages = args.check_messages if scenario == "check-message" else args.messages
                    print(f"{scenario} (run {rep + 1}/{args.repeat}): {messages} messages ...",
                          flush=True)  # fmt: skip
                    result = await run_scenario(scenario, args, auth_url, tmp)
                    print_result(result)
                    runs.append(result)
                best = max(runs, key=lambda r: r.msg_per_s)
                best.runs_msg_per_s = [round(r.msg_per_s) for r in runs]
                results.append(best)
    finally:
        await auth.stop()
    return results


async def wait_quiet(max_wait: float, threshold_pct: float = 25.0) -> None:
    """Wait until the rest of the machine uses < threshold (% of one CPU) for 1 s.

    Other jobs on a 2-CPU machine (test suites of other sessions, builds) take CPU from
    the processes measured; waiting for a quiet second keeps runs comparable. Gives up
    after ``max_wait`` seconds and says so.
    """
    own = os.getpid()
    deadline = time.monotonic() + max_wait
    while True:
        machine0, mine0 = machine_cpu_seconds(), cpu_seconds(own)
        await asyncio.sleep(1.0)
        other = 100.0 * ((machine_cpu_seconds() - machine0) - (cpu_seconds(own) - mine0))
        if other < threshold_pct:
            return
        if time.monotonic() > deadline:
            print(f"  note: the machine stayed busy ({other:.0f}% of a CPU used by other "
                  "processes); measuring anyway", flush=True)  # fmt: skip
            return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
    )
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--messages", type=int, default=200_000, help="total, all senders")
    parser.add_argument(
        "--check-messages",
        type=int,
        default=50_000,
        help="total for check-message (about 10x slower per message)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per scenario; the table shows the fastest"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait for other processes to go quiet before a run",
    )
    parser.add_argument("--window", type=int, default=16, help="outstanding messages/sender")
    parser.add_argument("--body", type=int, default=100, help="msg_body bytes (>= 24)")
    parser.add_argument("--load-procs", type=int, default=1)
    parser.add_argument("--client", choices=("raw", "aiohttp"), default="raw")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=60.0,
        help="seconds per scenario before reporting a partial run",
    )
    parser.add_argument(
        "--hook-timeout-ms",
        type=int,
        default=1000,
        help="check-message: gateway HOOK_TIMEOUT_MS (0: the default, 150)",
    )
    parser.add_argument(
        "--check-queue-timeout-ms",
        type=int,
        default=2000,
        help="check-message: hook_queue_timeout_ms in the tenant config "
        "(-1: unset, the gateway's HOOK_QUEUE_TIMEOUT_MS, 10)",
    )
    parser.add_argument(
        "--check-concurrency",
        type=int,
        default=None,
        help="check-message: hook_max_concurrency in the tenant config "
        "(default: unset, the gateway's HOOK_MAX_CONCURRENCY, 32)",
    )
    parser.add_argument(
        "--cprofile",
        action="store_true",
        help="cProfile the server process during the run (slows it down)",
    )
    parser.add_argument(
        "--py-spy",
        nargs="?",
        const=shutil.which("py-spy") or "py-spy",
        help="sample the server process with py-spy (path to the binary)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    for scenario in args.scenarios:
        if scenario not in SCENARIOS:
            parser.error(f"unknown scenario {scenario!r}; choose from {', '.join(SCENARIOS)}")
    if args.body < 24:
        parser.error("--body must be at least 24 bytes (the stamp)")
    try:
        results = run(lambda: amain(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        results = []
    finally:
        with contextlib.suppress(Exception):
            kill_children()
    if results:
        report(results, args)


if __name__ == "__main__":
    main()
