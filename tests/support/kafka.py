"""A real Apache Kafka broker for tests: KRaft, one node, no ZooKeeper, no Docker.

``scripts/kafka-fetch`` puts the broker's jars (resolved by Maven, pinned version) in
``.cache/``; :class:`KafkaBroker` formats a private log directory and runs
``java -cp 'libs/*' kafka.Kafka server.properties`` as one combined broker+controller
process on free loopback ports, with its log in a file next to the data, never on the
pytest console. The process handling (work directory, stop, kill, restart, cleanup) is
:class:`tests.support.process.ServiceProcess`'s.

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

import base64
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from tests.support.process import ServiceProcess, ServiceProcessError, free_port, run_tool

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


class KafkaBrokerError(ServiceProcessError):
    """The broker could not be fetched, formatted, started or stopped."""


def new_cluster_id() -> str:
    """A random Kafka cluster id: 16 bytes, URL-safe base64 without padding."""
    while True:
        cluster_id = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")
        if not cluster_id.startswith("-"):  # Kafka avoids these too: they read as options
            return cluster_id


def fetch_kafka() -> Path:
    """Run ``scripts/kafka-fetch`` (instant once its stamp exists); return the libs dir."""
    done = run_tool(["bash", FETCH_SCRIPT], KafkaBrokerError, timeout=600, what=str(FETCH_SCRIPT))
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


class KafkaBroker(ServiceProcess):
    """One single-node KRaft broker (combined broker + controller) in a private directory.

    The listener and controller ports are picked once, in the constructor, and kept for
    the broker's life, across ``stop()``/``start()``; so is the log directory. ``kill()``
    crashes it (SIGKILL, no shutdown); ``start()`` then recovers the log directory.
    """

    name = "Kafka broker"
    error = KafkaBrokerError
    workdir_prefix = "mics-kafka-"
    log_name = "broker.log"
    stop_timeout = STOP_TIMEOUT_S
    at_exit_timeout = 10.0
    probe_interval = 0.1
    log_tail_lines = 60

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        properties: Mapping[str, str | int] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
    ) -> None:
        super().__init__(workdir, ready_timeout=ready_timeout)
        self.controller_port = free_port()
        self.data_dir = self.workdir / "data"
        self.config_file = self.workdir / "server.properties"
        self.log4j_file = self.workdir / "log4j2.properties"
        self.cluster_id = new_cluster_id()
        self._overrides = {k: str(v) for k, v in (properties or {}).items()}
        self._libs: Path | None = None
        self._admin: AdminClient | None = None

    @property
    def bootstrap(self) -> str:
        """The ``bootstrap.servers`` value for clients: ``127.0.0.1:<port>``."""
        return f"127.0.0.1:{self.port}"

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

    def stop_hard(self, grace: float = 5.0) -> None:
        """SIGTERM with a short grace period, then SIGKILL."""
        self.stop(timeout=grace)

    # --- readiness -------------------------------------------------------------------

    def wait_ready(self, timeout: float) -> None:
        """Block until the broker answers a metadata request listing itself."""
        try:
            super().wait_ready(timeout)
        finally:
            self._admin = None

    def _probe(self, pid: int, remaining: float) -> str | None:
        if not self._accepting():
            return "listener not accepting connections yet"
        if self._admin is None:
            self._admin = AdminClient(self._client_config())
        try:
            metadata = self._admin.list_topics(timeout=max(0.5, min(5.0, remaining)))
        except KafkaException as exc:
            return str(exc)
        return None if metadata.brokers else "metadata lists no broker"

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

    def _prepare(self) -> None:
        """Fetch the jars, write the configuration, format the storage the first time."""
        self._libs = fetch_kafka()
        self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            self._format(self._libs)

    def _command(self) -> list[str]:
        assert self._libs is not None, "_prepare() runs first"
        return [*self._java_command(self._libs), "kafka.Kafka", str(self.config_file)]

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
        done = run_tool(command, KafkaBrokerError, timeout=120, what="kafka-storage format")
        (self.workdir / "format.log").write_text(done.stdout + done.stderr, encoding="utf-8")
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
            raise KafkaBrokerError(f"kafka-storage format failed ({done.returncode}):\n{output}")


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
        yield from KafkaBroker(tmp_path_factory.mktemp(name), properties=properties).serve()

    return _broker


kafka_broker = broker_fixture()
