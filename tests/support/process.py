"""A server run by the tests as a child process: what the real-service harnesses share.

:class:`ServiceProcess` is the base of :class:`tests.support.kafka.KafkaBroker`,
:class:`tests.support.postgres.PostgresServer` and :class:`tests.support.redis.RedisServer`.
It owns a work directory (a fresh temporary one unless given; those left by earlier runs
that were killed are removed) and runs the server in the foreground as a direct child,
in its own session, with stdout and stderr in a log file in that directory. Port and
directory are chosen once, in the constructor, and kept across ``stop()``/``kill()`` and
``start()``, so clients reconnect to the same address after a restart.

Lifecycle, the same for every server: ``start()`` (the first start moves to another port
if its port was taken in the meantime, where the subclass can tell), ``stop()`` (the
server's shutdown signal, SIGKILL after a timeout), ``kill()`` (a crash: SIGKILL, no
shutdown), ``restart()``, ``close()`` (also removes a directory it created) and the
context manager. The server is stopped at interpreter exit, and by the kernel if pytest
is killed outright (:func:`die_with_parent`).

A subclass says what to run and when it is ready: ``_command()`` and ``_probe()``; and,
where its server differs, ``_prepare()``, ``_popen_options()``, ``_stop_signals()`` and
``_kill_process()``, plus the class attributes below.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, ClassVar, Self

REPO = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO / "scripts" / "install-services"
OWNER_FILE = "owner.pid"

log = logging.getLogger(__name__)

_handed_out: set[int] = set()


class ServiceProcessError(RuntimeError):
    """A server could not be found, prepared, started or stopped."""


# --- helpers -----------------------------------------------------------------------------


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the kernel's ephemeral range.

    Outgoing connections take their local ports from the ephemeral range, so a port
    below it cannot be grabbed by a client while a server is down for a restart. Never
    the same port twice in one process.
    """
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    candidates = range(max(1024, low - 12000), low) if low > 3024 else range(20000, 30000)
    for _ in range(200):
        port = random.choice(candidates)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        fallback: int = sock.getsockname()[1]
        return fallback


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send ``sig`` to the child when pytest dies.

    Covers a run killed outright (no finally, no atexit). Only from the main thread: the
    signal fires when the *thread* that forked exits, and a worker thread
    (``asyncio.to_thread``) would take the server down with it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(sig), 0, 0, 0)

    return preexec


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[stat.rfind(")") + 2 :].split(" ", 1)[0] not in ("Z", "X")


def remove_stale_workdirs(prefix: str) -> None:
    """Delete work directories left by earlier runs that were killed (owner pid gone)."""
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            owner = int((path / OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if owner != os.getpid() and not pid_alive(owner):
            shutil.rmtree(path, ignore_errors=True)


def run_tool(
    command: Sequence[str | Path],
    error: type[Exception] = ServiceProcessError,
    *,
    timeout: float,
    what: str | None = None,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end, no stdin, its output captured as text; raise ``error``
    (naming ``what``, by default the command) if it cannot run or times out. The exit
    status is the caller's to judge. ``kwargs`` go to ``subprocess.run`` (``env``...).
    """
    try:
        return subprocess.run(
            [str(arg) for arg in command],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{what or command[0]} failed: {exc}") from exc


def run_install_services(error: type[Exception] = ServiceProcessError) -> None:
    """Run ``scripts/install-services`` (silent and instant when all is installed)."""
    done = run_tool(["bash", INSTALL_SCRIPT], error, timeout=900, what=str(INSTALL_SCRIPT))
    if done.returncode != 0:
        raise error(
            f"{INSTALL_SCRIPT} exited with {done.returncode}:\n"
            f"{done.stdout.strip()}\n{done.stderr.strip()}"
        )


# --- the base class ----------------------------------------------------------------------


class ServiceProcess:
    """One server process in a private work directory, on a port of its own."""

    name: ClassVar[str] = "server"
    """How messages name the server."""
    error: ClassVar[type[Exception]] = ServiceProcessError
    """What lifecycle failures raise."""
    workdir_prefix: ClassVar[str] = "mics-service-"
    log_name: ClassVar[str] = "server.log"
    stop_timeout: ClassVar[float] = 10.0
    """``stop()``'s default: seconds to shut down before SIGKILL."""
    at_exit_timeout: ClassVar[float | None] = None
    """``stop()``'s timeout at interpreter exit (``None``: ``stop_timeout``)."""
    death_signal: ClassVar[signal.Signals] = signal.SIGTERM
    """What Linux sends the server if pytest dies."""
    probe_interval: ClassVar[float] = 0.01
    """Seconds between two ``_probe()`` calls while starting."""
    port_taken_messages: ClassVar[tuple[str, ...]] = ()
    """Failures of the first start (in the error text) that mean: try another port."""
    log_tail_lines: ClassVar[int] = 40

    def __init__(self, workdir: Path | str | None, *, ready_timeout: float) -> None:
        self._owns_workdir = workdir is None
        if workdir is None:
            remove_stale_workdirs(self.workdir_prefix)
            workdir = tempfile.mkdtemp(prefix=self.workdir_prefix)
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / OWNER_FILE).write_text(f"{os.getpid()}\n")
        self.log_file = self.workdir / self.log_name
        self.port = free_port()
        self.ready_timeout = ready_timeout
        self.starts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._atexit_registered = False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The server process's pid while it runs."""
        return self._proc.pid if self.running and self._proc else None

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until it is ready, or raise with the end of its log."""
        if self.running:
            raise self.error(f"{self.name} already running (pid {self.pid})")
        self._prepare()
        attempts = 3 if self.starts == 0 and self.port_taken_messages else 1
        for attempt in range(attempts):
            self._spawn()
            try:
                self.wait_ready(self.ready_timeout)
                return
            except BaseException as exc:
                self.kill()
                port_taken = isinstance(exc, self.error) and any(
                    message in str(exc) for message in self.port_taken_messages
                )
                if port_taken and attempt + 1 < attempts:
                    self.port = free_port()
                    continue
                raise

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: the server's shutdown signal(s), then ``kill()`` if it is still
        up after ``timeout`` seconds (default: the class's ``stop_timeout``).
        """
        proc = self._proc
        if proc is None:
            return
        wait_s = self.stop_timeout if timeout is None else timeout
        for sig, sig_wait_s in self._stop_signals(wait_s):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(sig_wait_s)
        if proc.poll() is None:
            log.warning(
                "%s pid %s did not stop within %.0f s: killing it", self.name, proc.pid, wait_s
            )
            self.kill()
            return
        self._reap()

    def kill(self) -> None:
        """Crash the server: no shutdown at all. ``start()`` runs it again on the same
        port and directory."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._kill_process(proc)
        self._reap()

    def restart(self, timeout: float | None = None) -> None:
        """Stop (if running) and start again on the same port and directory."""
        self.stop(timeout)
        self.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop the server; remove its directory if this object created it."""
        self.stop(timeout)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def serve(self) -> Iterator[Self]:
        """Start, yield the running server, always close it: a fixture's body is
        ``yield from Server().serve()``."""
        try:
            self.start()
            yield self
        finally:
            self.close()

    # --- readiness and diagnostics ---------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Block until ``_probe()`` says ready, or raise with the end of the server log."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise self.error(
                    f"{self.name} exited with code {code} while starting\n{self._tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self.error(
                    f"{self.name} on 127.0.0.1:{self.port} not ready after {timeout:.0f} s "
                    f"({last})\n{self._tail()}"
                )
            problem = self._probe(proc.pid, remaining)
            if problem is None:
                return
            last = problem
            time.sleep(self.probe_interval)

    def log_tail(self, lines: int | None = None) -> str:
        """The last lines of the server's log (default: the class's ``log_tail_lines``)."""
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        count = self.log_tail_lines if lines is None else lines
        return "\n".join(text.splitlines()[-count:])

    def _tail(self) -> str:
        return f"--- last lines of {self.log_file} ---\n{self.log_tail()}"

    # --- for subclasses --------------------------------------------------------------

    def _prepare(self) -> None:
        """Before each start: find binaries, write configuration, initialise data."""

    def _command(self) -> list[str]:
        """The server's command line (called for each spawn: it may use ``self.port``)."""
        raise NotImplementedError

    def _popen_options(self) -> dict[str, Any]:
        """More ``subprocess.Popen`` keyword arguments (``env``, ``user``...)."""
        return {}

    def _probe(self, pid: int, remaining: float) -> str | None:
        """``None`` once the server (``pid``) is ready, else why not yet; ``remaining``
        is how many seconds ``wait_ready`` has left."""
        raise NotImplementedError

    def _stop_signals(self, timeout: float) -> tuple[tuple[signal.Signals, float], ...]:
        """The signals ``stop()`` sends in turn, each with seconds to wait after it."""
        return ((signal.SIGTERM, timeout),)

    def _kill_process(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the running server and wait until it is gone."""
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()

    # --- internals -------------------------------------------------------------------

    def _spawn(self) -> None:
        self.starts += 1
        self._log_fh = self.log_file.open("ab")
        self._log_fh.write(f"=== start #{self.starts} on port {self.port} ===\n".encode())
        self._log_fh.flush()
        self._proc = subprocess.Popen(
            self._command(),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches pytest only; it stops the server
            preexec_fn=die_with_parent(self.death_signal),  # after setuid: survives it
            **self._popen_options(),
        )
        if not self._atexit_registered:
            atexit.register(self._at_exit)
            self._atexit_registered = True

    def _reap(self) -> None:
        self._proc = None
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):
            self.close(self.at_exit_timeout)
