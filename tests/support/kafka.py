"""A real Apache Kafka broker for tests: KRaft, one node, no ZooKeeper, no Docker.

``scripts/kafka-fetch`` puts the broker's jars (resolved by Maven, pinned version) in
``.cache/``; :class:`KafkaBroker` formats a private log directory and runs
``java -cp 'libs/*' kafka.Kafka server.properties`` as one combined broker+controller
process on free loopback ports, with its log in a file next to the data, never on the
pytest console.

Use the session fixture ``kafka_broker``: make it visible once, in ``tests/conftest.py``
(``from tests.support.kafka import kafka_broker  # noqa: F401``), then ask for it::

    from tests.support.kafka import KafkaBroker

    def test_something(kafka_broker: KafkaBroker) -> None:
        producer = Producer({"bootstrap.servers": kafka_broker.bootstrap})

The first use runs ``scripts/kafka-fetch`` (about 15 s on a machine whose Maven cache is
empty, instant afterwards) and starts the broker (about 3 s); the broker is stopped at the
end of the session, and also if the run is interrupted or killed.

Fault tests may ``stop()``/``kill()`` and ``start()`` (or ``restart()``) the broker: the
ports and the log directory stay the same, so clients reconnect to the same address and
find the data they wrote. They must leave it running. A test that wants a broker of its
own (other properties, or to keep it down) builds one with :func:`broker_fixture`.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

REPO = Path(__file__).resolve().parents[2]
FETCH_SCRIPT = REPO / "scripts" / "kafka-fetch"

READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx512m",
    "-XX:+UseSerialGC",
    "-XX:TieredStopAtLevel=1",  # C1 only: starts ~0.5 s faster; tests move little data
    "-XX:-UsePerfData",
    "-Djava.awt.headless=true",
    "-Djava.net.preferIPv4Stack=true",
)
TOOL_JVM_OPTIONS = ("-Xmx256m", *JVM_OPTIONS[2:])

_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
# The full configuration dump on every start; server.properties is next to the log.
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""

log = logging.getLogger(__name__)


class KafkaBrokerError(RuntimeError):
    """The broker could not be fetched, formatted, started or stopped."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def new_cluster_id() -> str:
    """A random Kafka cluster id: 16 bytes, URL-safe base64 without padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")
        if not cluster_id.startswith("-"):  # Kafka avoids these too: they read as options
            return cluster_id


def fetch_kafka() -> Path:
    """Run ``scripts/kafka-fetch`` (instant once its stamp exists); return the libs dir."""
    try:
        done = subprocess.run(
            ["bash", str(FETCH_SCRIPT)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise KafkaBrokerError(f"{FETCH_SCRIPT} failed: {exc}") from exc
    if done.stderr:
        sys.stderr.write(done.stderr)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise KafkaBrokerError(
            f"{FETCH_SCRIPT} exited with {done.returncode}; its output:\n"
            f"{done.stderr.strip()}\n{done.stdout.strip()}"
        )
    libs = Path(lines[-1])
    if not any(libs.glob("kafka_2.13-*.jar")):
        raise KafkaBrokerError(f"{FETCH_SCRIPT} named {libs}, which holds no Kafka jar")
    return libs


def _java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return str(Path(java_home) / "bin" / "java")
    java = shutil.which("java")
    if java is None:
        raise KafkaBrokerError("java not found on PATH: the Kafka tests need Java >= 17")
    return java


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when its parent thread dies.

    Covers a test run killed outright (no finally, no atexit). Only used from the main
    thread: the signal fires when the *thread* that forked exits, and a worker thread
    (``asyncio.to_thread``) would take the broker down with it.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not (
        threading.main_thread()
    ):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)

    return preexec


class KafkaBroker:
    """One single-node KRaft broker (combined broker + controller) in a private directory.

    The listener and controller ports are picked once, in the constructor, and kept for
    the broker's life, across ``stop()``/``start()``; so is the log directory.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        properties: Mapping[str, str | int] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mics-kafka-")).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.controller_port = free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        self.data_dir = self.workdir / "data"
        self.config_file = self.workdir / "server.properties"
        self.log4j_file = self.workdir / "log4j2.properties"
        self.log_file = self.workdir / "broker.log"
        self.ready_timeout = ready_timeout
        self.cluster_id = new_cluster_id()
        self._overrides = {k: str(v) for k, v in (properties or {}).items()}
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fh: IO[bytes] | None = None
        self._atexit_registered = False
        self.starts = 0

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` value for clients: ``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    def server_properties(self) -> dict[str, str]:
        p, c = self.port, self.controller_port
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{c}",
            "listeners": f"PLAINTEXT://127.0.0.1:{p},CONTROLLER://127.0.0.1:{c}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{p}",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "controller.listener.names": "CONTROLLER",
            "log.dirs": str(self.data_dir),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # After a kill the restarted broker may register only once the old
            # incarnation's session expired (default 9 s).
            "broker.session.timeout.ms": "3000",
            "broker.heartbeat.interval.ms": "500",
            # Two cores: fewer threads than the defaults (3 network, 8 I/O).
            "num.network.threads": "2",
            "num.io.threads": "4",
        }
        props.update(self._overrides)
        return props

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Start the broker (formatting its storage the first time) and wait until ready."""
        if self.running:
            raise KafkaBrokerError(f"broker already running (pid {self.pid})")
        libs = fetch_kafka()
        self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            self._format(libs)
        self._spawn(libs)
        try:
            self.wait_ready(self.ready_timeout)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("Kafka broker pid %s ignored SIGTERM for %.0f s", proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        self._reap()

    def stop_hard(self, grace: float = 5.0) -> None:
        """SIGTERM with a short grace period, then SIGKILL."""
        self.stop(timeout=grace)

    def kill(self) -> None:
        """Crash the broker: SIGKILL, no shutdown. ``start()`` recovers the log directory."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
        self._reap()

    def restart(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Graceful stop, then start again on the same ports and log directory."""
        self.stop(timeout)
        self.start()

    def close(self) -> None:
        """Stop the broker; remove its directory if this object created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> KafkaBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- readiness and diagnostics ---------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Block until the broker answers a metadata request listing itself."""
        deadline = time.monotonic() + timeout
        admin: AdminClient | None = None
        last_error = "listener not accepting connections yet"
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise KafkaBrokerError(
                    f"Kafka broker exited with code {code} while starting\n{self._tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise KafkaBrokerError(
                    f"Kafka broker on {self.bootstrap} not ready after {timeout:.0f} s "
                    f"({last_error})\n{self._tail()}"
                )
            if not self._accepting():
                time.sleep(0.1)
                continue
            if admin is None:
                admin = AdminClient(self._client_config())
            try:
                metadata = admin.list_topics(timeout=max(0.5, min(5.0, remaining)))
            except KafkaException as exc:
                last_error = str(exc)
                time.sleep(0.2)
                continue
            if metadata.brokers:
                return
            last_error = "metadata lists no broker"
            time.sleep(0.2)

    def log_tail(self, lines: int = 60) -> str:
        """The last lines of the broker's own log (stdout and stderr of the JVM)."""
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _tail(self) -> str:
        return f"--- last lines of {self.log_file} ---\n{self.log_tail()}"

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _client_config(self) -> dict[str, Any]:
        # librdkafka logs refused connections while the broker starts: keep them in logging.
        return {"bootstrap.servers": self.bootstrap, "logger": log}

    # --- internals -------------------------------------------------------------------

    def _write_config(self) -> None:
        props = self.server_properties()
        text = "".join(f"{key}={value}\n" for key, value in props.items())
        self.config_file.write_text(text, encoding="utf-8")
        self.log4j_file.write_text(_LOG4J2, encoding="utf-8")

    def _java_command(self, libs: Path, tool_options: bool = False) -> list[str]:
        options = TOOL_JVM_OPTIONS if tool_options else JVM_OPTIONS
        return [
            _java(),
            *options,
            f"-Dlog4j2.configurationFile={self.log4j_file}",
            "-cp",
            f"{libs}/*",
        ]

    def _format(self, libs: Path) -> None:
        command = [
            *self._java_command(libs, tool_options=True),
            "kafka.tools.StorageTool",
            "format",
            "--cluster-id",
            self.cluster_id,
            "--config",
            str(self.config_file),
        ]
        done = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        (self.workdir / "format.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            raise KafkaBrokerError(f"kafka-storage format failed ({done.returncode}):\n{output}")

    def _spawn(self, libs: Path) -> None:
        self.starts += 1
        self._log_fh = self.log_file.open("ab")
        self._log_fh.write(f"=== start #{self.starts} ===\n".encode())
        self._log_fh.flush()
        self._proc = subprocess.Popen(
            [*self._java_command(libs), "kafka.Kafka", str(self.config_file)],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches pytest only; it stops the broker
            preexec_fn=_die_with_parent(),
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
            self.stop(timeout=10.0)


def broker_fixture(
    *,
    name: str = "kafka_broker",
    scope: Any = "session",
    properties: Mapping[str, str | int] | None = None,
) -> Any:
    """A pytest fixture that starts a :class:`KafkaBroker` and always stops it.

    ``kafka_broker`` below is ``broker_fixture()``: one broker for the whole session.
    """

    @pytest.fixture(scope=scope, name=name)
    def _broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
        broker = KafkaBroker(tmp_path_factory.mktemp(name), properties=properties)
        try:
            broker.start()
            yield broker
        finally:
            broker.stop()

    return _broker


kafka_broker = broker_fixture()
