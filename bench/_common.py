"""Shared helpers of the benchmarks: limits, /proc readings, child processes, control.

Every benchmark is an orchestrator process that starts servers and load generators as
child processes (``python -m bench._xxx``). A child talks to its orchestrator over
its standard streams, one JSON object per line:

- the orchestrator writes commands to the child's stdin: ``{"cmd": "gc"}``;
- the child answers on stdout with a line starting with ``@@ `` followed by JSON
  (other stdout lines are passed through, prefixed with the child's name);
- EOF on stdin means "quit": a child never outlives an orchestrator that died.

The orchestrator keeps every child it started in :data:`_CHILDREN` and kills what is
still running on exit (``kill_children``), whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import cProfile
import gc
import json
import os
import pstats
import resource
import signal
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

REPLY_PREFIX = "@@ "
# Start of every benchmark message body: MAGIC, send time (ns, <q), sequence number (<q).
BODY_MAGIC = b"MiCsBeNc"
BODY_STAMP_LEN = len(BODY_MAGIC) + 16
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- process facts ------------------------------------------------------------------------


def raise_nofile(target: int = 65_536) -> int:
    """Raise RLIMIT_NOFILE to ``target`` (also the hard limit when allowed); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= target:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(hard, target)))
        return target
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kb(pid: int | None = None) -> int:
    """VmRSS of ``pid`` (default: this process) in KiB, from /proc/<pid>/status."""
    path = f"/proc/{pid or 'self'}/status"
    with open(path, encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS in {path}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads) in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        data = fh.read()
    fields = data[data.rindex(")") + 2 :].split()
    # Fields after the command: state(3) ... utime(14) stime(15), 1-based in proc(5).
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def machine_cpu_seconds() -> float:
    """CPU seconds all processes of the machine used (every CPU), from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as fh:
        fields = fh.readline().split()[1:]
    values = [int(v) for v in fields]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return (sum(values[:8]) - idle) / _CLK_TCK


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def install_uvloop() -> None:
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    """Run ``main`` on uvloop (every benchmark process uses it)."""
    import uvloop

    return uvloop.run(main())  # type: ignore[arg-type]


# -- the orchestrator's side --------------------------------------------------------------

_CHILDREN: list[Child] = []
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ChildError(RuntimeError):
    pass


class Child:
    """A child process speaking the line protocol of this module."""

    def __init__(self, name: str, module: str, arg: Any = None, env: dict[str, str] | None = None):
        self.name = name
        self.module = module
        self.arg = arg
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self._replies: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self.ready: dict[str, Any] = {}  # the READY answer (port, pid, url ...)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, wait_s: float = 30.0) -> dict[str, Any]:
        """Start the child and wait for its first reply (its READY message)."""
        argv = [sys.executable, "-m", self.module]
        if self.arg is not None:
            argv.append(json.dumps(self.arg))
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.env:
            env.update(self.env)
        self.proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=_REPO_ROOT,
            limit=64 * 1024 * 1024,
        )
        _CHILDREN.append(self)
        self._pump = asyncio.get_running_loop().create_task(self._read_stdout())
        self.ready = await self.reply(wait_s)
        return self.ready

    async def _read_stdout(self) -> None:
        assert self.proc is not None
        assert self.proc.stdout is not None
        try:
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    break
                text = line.decode("utf-8", "replace").rstrip("\n")
                if text.startswith(REPLY_PREFIX):
                    self._replies.put_nowait(json.loads(text[len(REPLY_PREFIX) :]))
                else:
                    print(f"[{self.name}] {text}", file=sys.stderr, flush=True)
        finally:
            self._replies.put_nowait(None)

    async def reply(self, wait_s: float = 30.0) -> dict[str, Any]:
        try:
            msg = await asyncio.wait_for(self._replies.get(), wait_s)
        except TimeoutError:
            raise ChildError(f"{self.name}: no answer within {wait_s:.0f} s") from None
        if msg is None:
            self._replies.put_nowait(None)  # keep reporting the exit to later callers
            code = self.proc.returncode if self.proc else None
            raise ChildError(f"{self.name}: exited (code {code}) without answering")
        if "error" in msg:
            raise ChildError(f"{self.name}: {msg['error']}")
        return msg

    async def command(self, cmd: str, wait_s: float = 30.0, **kwargs: Any) -> dict[str, Any]:
        self.send(cmd, **kwargs)
        return await self.reply(wait_s)

    def send(self, cmd: str, **kwargs: Any) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **kwargs}) + "\n").encode())

    async def stop(self, wait_s: float = 15.0) -> None:
        """Ask the child to quit (EOF on stdin), then terminate, then kill."""
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            with contextlib.suppress(Exception):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), wait_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
        if self._pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pump, 5)
        if self in _CHILDREN:
            _CHILDREN.remove(self)


def kill_children() -> None:
    """Kill every child still running (last resort, synchronous)."""
    for child in list(_CHILDREN):
        proc = child.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        _CHILDREN.remove(child)


async def stop_all(children: Sequence[Child | None]) -> None:
    for child in children:
        if child is not None:
            with contextlib.suppress(Exception):
                await child.stop()


async def wait_rss_stable(
    read: Callable[[], Awaitable[int]], *, tolerance_kb: int = 64, polls: int = 3
) -> int:
    """Poll an RSS reading until ``polls`` consecutive readings agree within tolerance.

    The settle condition is "memory stopped moving", not a fixed sleep; polls are
    spaced 100 ms apart and give up after 10 s (returning the last reading).
    """
    deadline = time.monotonic() + 10.0
    last = await read()
    stable = 0
    while time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = await read()
        stable = stable + 1 if abs(value - last) <= tolerance_kb else 0
        last = value
        if stable >= polls:
            break
    return last


# -- the child's side -----------------------------------------------------------------------

Handler = Callable[[dict[str, Any]], Any]


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(REPLY_PREFIX + json.dumps(obj) + "\n")
    sys.stdout.flush()


def child_arg() -> Any:
    return json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}


class Profiler:
    """cProfile switched on and off by commands; enabled by BENCH_CPROFILE=<path>."""

    def __init__(self) -> None:
        self.path = os.environ.get("BENCH_CPROFILE", "")
        self._prof: cProfile.Profile | None = None

    def start(self, _: dict[str, Any]) -> dict[str, Any]:
        if not self.path:
            return {"profiling": False}
        self._prof = cProfile.Profile()
        self._prof.enable()
        return {"profiling": True}

    def stop(self, _: dict[str, Any]) -> dict[str, Any]:
        prof, self._prof = self._prof, None
        if prof is None:
            return {"profile": ""}
        prof.disable()
        prof.dump_stats(self.path)
        return {"profile": self.path}


class TraceMalloc:
    def __init__(self) -> None:
        self._base: tracemalloc.Snapshot | None = None

    def base(self, _: dict[str, Any]) -> dict[str, Any]:
        if not tracemalloc.is_tracing():
            return {"tracing": False}
        self._base = tracemalloc.take_snapshot()
        return {"tracing": True}

    def diff(self, req: dict[str, Any]) -> dict[str, Any]:
        if not tracemalloc.is_tracing() or self._base is None:
            return {"lines": []}
        snap = tracemalloc.take_snapshot()
        filters = [
            tracemalloc.Filter(False, tracemalloc.__file__),
            tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        ]
        snap = snap.filter_traces(filters)
        base = self._base.filter_traces(filters)
        group = req.get("group", "lineno")
        stats = snap.compare_to(base, group)
        lines = []
        for stat in stats[: int(req.get("limit", 20))]:
            frame = stat.traceback[0]
            lines.append(
                {
                    "where": f"{_short(frame.filename)}:{frame.lineno}",
                    "size_diff": stat.size_diff,
                    "count_diff": stat.count_diff,
                }
            )
        total = sum(s.size_diff for s in stats)
        return {"lines": lines, "total_diff": total}


def _short(path: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3"):
        i = path.find(marker)
        if i >= 0:
            return path[i + len(marker) :]
    return path


def common_handlers() -> dict[str, Handler]:
    profiler = Profiler()
    tm = TraceMalloc()

    def do_gc(_: dict[str, Any]) -> dict[str, Any]:
        gc.collect()
        return {"rss_kb": rss_kb()}

    return {
        "rss": lambda _: {"rss_kb": rss_kb()},
        "gc": do_gc,
        "profile_start": profiler.start,
        "profile_stop": profiler.stop,
        "tm_base": tm.base,
        "tm_diff": tm.diff,
    }


async def control_loop(handlers: dict[str, Handler]) -> None:
    """Serve commands from stdin until EOF or ``quit``.

    Each command runs as a task, so that EOF (the orchestrator went away) is noticed
    even while a long command such as the load's ``go`` runs: pending commands are then
    cancelled and the process winds down.
    """
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=16 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    pending: set[asyncio.Task[None]] = set()

    async def serve(request: dict[str, Any]) -> None:
        try:
            result = handlers[request.pop("cmd")](request)
            if asyncio.iscoroutine(result):
                result = await result
            reply(result if isinstance(result, dict) else {"result": result})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # report, keep serving
            reply({"error": f"{type(exc).__name__}: {exc}"})

    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            try:
                request = json.loads(line)
            except ValueError as exc:
                reply({"error": f"bad command: {exc}"})
                continue
            if request.get("cmd") == "quit":
                reply({"quit": True})
                return
            task = loop.create_task(serve(request))
            pending.add(task)
            task.add_done_callback(pending.discard)
    finally:
        for task in list(pending):
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def print_profile(path: str, limit: int = 25) -> None:
    """Print the top functions of a cProfile dump by own time and by cumulative time."""
    stats = pstats.Stats(path)
    stats.strip_dirs()
    print(f"\n-- cProfile of the server process (own time, top {limit}) --")
    stats.sort_stats("tottime").print_stats(limit)
    print(f"-- cProfile (cumulative, top {limit}) --")
    stats.sort_stats("cumulative").print_stats(limit)
