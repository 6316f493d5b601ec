"""Kafka transport over confluent-kafka (librdkafka).

Produces are asynchronous: `produce` hands the message to librdkafka's buffer and
returns. Delivery reports run their callbacks (`on_done`) on the event loop's thread,
as soon as librdkafka has them, in one of two ways:

- `fd` (the default): librdkafka writes to a pipe the loop watches, and the loop polls
  the producer itself (`mics.events.rdkafka_wakeup`). No thread, no GIL hand-over.
- `thread` (the fallback, when the pipe cannot be set up, or when asked for): a
  dedicated thread blocked in `producer.poll(timeout)` collects the reports ready in
  one batch and hands them to the loop with one `call_soon_threadsafe`. With nothing
  outstanding it sleeps on an event instead of polling.

The producer is idempotent with acks=all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from mics.events.config import EventConfigError, KafkaSettings, TopicSettings
from mics.events.rdkafka_wakeup import ReportWakeup
from mics.events.transport import DoneCallback, TransportFull

log = logging.getLogger("mics.events.kafka")
_librdkafka_log = logging.getLogger("mics.events.librdkafka")

# How long the report thread blocks in one poll: bounds how long close() waits for it
# while messages are outstanding (a report wakes it at once).
_POLL_TIMEOUT_S = 0.1
# With nothing outstanding it sleeps on an event, waking this often to serve
# librdkafka's log lines.
_IDLE_WAIT_S = 1.0
# In fd mode, the loop also polls this often while reports are outstanding: a safety
# net that never matters while librdkafka's wake-ups arrive, and serves its log lines.
_FD_SAFETY_POLL_S = 1.0

_Report = tuple[DoneCallback, Exception | None]


class KafkaDeliveryError(Exception):
    def __init__(self, error: KafkaError) -> None:
        super().__init__(error.str())
        self.code = error.code()
        self.retriable = error.retriable()


class KafkaTransport:
    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer: Producer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Produces whose report has not run on the loop yet (loop thread only).
        self._outstanding = 0
        self._drained = asyncio.Event()
        self._drained.set()
        # _pending collects the reports of one poll (on the report thread in thread
        # mode until it stops, else on the loop thread). The report thread: _wake ends
        # its idle wait; _stopping ends it.
        self._thread: threading.Thread | None = None
        self._pending: list[_Report] = []
        self._wake = threading.Event()
        self._stopping = threading.Event()
        # fd mode: the pipe librdkafka wakes the loop through, and the safety poll.
        self._wakeup: ReportWakeup | None = None
        self._safety_poll: asyncio.TimerHandle | None = None

    @property
    def report_mode(self) -> str:
        """How delivery reports reach the loop: "fd", "thread", or "" before start()."""
        if self._wakeup is not None:
            return "fd"
        return "thread" if self._thread is not None else ""

    async def start(self) -> None:
        config: dict[str, object] = dict(self._settings.producer_config())
        config["logger"] = _librdkafka_log  # librdkafka's own lines, as JSON logs
        try:
            producer = Producer(config)
        except KafkaException as exc:
            raise EventConfigError(f"invalid Kafka producer configuration: {exc}") from exc
        loop = asyncio.get_running_loop()
        self._producer = producer
        self._loop = loop
        if self._settings.report_wakeup == "fd":
            self._wakeup = ReportWakeup.attach(
                producer, self._settings.client_id, loop, self._poll_on_loop
            )
            if self._wakeup is None:
                log.warning(
                    "Kafka delivery reports cannot wake the loop through a pipe with this "
                    "confluent-kafka; serving them from a thread",
                    extra={"client_id": self._settings.client_id},
                )
        if self._wakeup is None:
            self._start_thread(producer, loop)
        else:
            self._safety_poll = loop.call_later(_FD_SAFETY_POLL_S, self._safety_tick)
        # Connect before serving, so the first event does not pay for it. A broker that
        # is down now is not fatal: events queue and flow once it is back.
        try:
            await loop.run_in_executor(None, producer.list_topics, None, 5.0)
        except KafkaException as exc:
            log.warning(
                "Kafka not reachable at startup; events will queue", extra={"error": str(exc)}
            )

    def produce(self, topic: str, key: bytes, value: bytes, on_done: DoneCallback) -> None:
        producer = self._producer
        assert producer is not None, "start() first"

        def report(error: KafkaError | None, _: Message) -> None:
            # Runs inside producer.poll(): on the loop (fd mode) or the report thread.
            self._pending.append((on_done, None if error is None else KafkaDeliveryError(error)))

        try:
            producer.produce(topic, value=value, key=key, on_delivery=report)
        except BufferError as exc:
            raise TransportFull(str(exc)) from exc
        except KafkaException as exc:
            loop = asyncio.get_running_loop()
            loop.call_soon(on_done, KafkaDeliveryError(exc.args[0]))
            return
        self._outstanding += 1
        self._drained.clear()
        if self._thread is not None and not self._wake.is_set():
            self._wake.set()

    # -- fd mode: the loop polls --------------------------------------------------------------

    def _poll_on_loop(self) -> None:
        producer = self._producer
        if producer is None:
            return
        try:
            producer.poll(0)  # runs the reports' callbacks here, on the loop thread
        except Exception:  # a failing callback must not stop the others being served
            log.exception("Kafka delivery report poll failed")
        self._run_pending()

    def _safety_tick(self) -> None:
        self._safety_poll = None
        if self._producer is None or self._loop is None:
            return
        if self._outstanding or len(self._producer):
            self._poll_on_loop()
        self._safety_poll = self._loop.call_later(_FD_SAFETY_POLL_S, self._safety_tick)

    def _stop_wakeup(self) -> None:
        if self._safety_poll is not None:
            self._safety_poll.cancel()
            self._safety_poll = None
        wakeup, self._wakeup = self._wakeup, None
        if wakeup is not None:
            wakeup.close()

    # -- thread mode -------------------------------------------------------------------------

    def _start_thread(self, producer: Producer, loop: asyncio.AbstractEventLoop) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._serve_reports,
            args=(producer, loop),
            name=f"kafka-reports-{self._settings.client_id}",
            daemon=True,
        )
        self._thread.start()

    def _serve_reports(self, producer: Producer, loop: asyncio.AbstractEventLoop) -> None:
        stopping = self._stopping
        wake = self._wake
        while not stopping.is_set():
            try:
                if not len(producer):
                    # Nothing in librdkafka's queues: sleep until a produce or close (or
                    # a while, to serve librdkafka's own log lines).
                    wake.wait(_IDLE_WAIT_S)
                    wake.clear()
                    continue
                producer.poll(_POLL_TIMEOUT_S)  # runs the reports' callbacks here
                self._hand_over(loop)
            except Exception:  # never leave reports unserved: log, pause, go on
                log.exception("Kafka delivery report thread failed")
                stopping.wait(_POLL_TIMEOUT_S)

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            loop.call_soon_threadsafe(self._run_reports, batch)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            log.warning("Kafka delivery reports after the loop closed", extra={"count": len(batch)})

    def _run_pending(self) -> None:
        """Run the reports collected so far (loop thread, or the report thread stopped)."""
        if self._pending:
            batch, self._pending = self._pending, []
            self._run_reports(batch)

    def _run_reports(self, batch: list[_Report]) -> None:
        for on_done, error in batch:
            self._outstanding -= 1
            try:
                on_done(error)
            except Exception:
                log.exception("Kafka delivery callback failed")
        if self._outstanding <= 0:
            self._drained.set()

    async def _stop_thread(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._thread = None
        self._stopping.set()
        self._wake.set()
        await asyncio.to_thread(thread.join)
        # The reports of its last poll have been handed over, or are still in _pending.
        self._run_pending()

    # -- flush and close ----------------------------------------------------------------------

    async def flush(self, timeout_s: float) -> int:
        if self._producer is None:
            return 0
        if self._outstanding:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout_s)
        return self._outstanding

    async def close(self) -> None:
        self._stop_wakeup()
        await self._stop_thread()
        # Reports that arrived since the last poll (the dispatcher has given up on them
        # by now, but their callbacks must still run once).
        self._poll_on_loop()
        self._producer = None


def provision_topics(
    bootstrap_servers: str, tenants: list[str], topics: TopicSettings, timeout_s: float = 30.0
) -> list[str]:
    """Create each tenant's event and dead-letter topic if missing; return those created.

    Blocking (admin calls): run it at startup, before serving.
    """
    from mics.events.bus import dlq_topic_for, topic_for

    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    wanted = [name for t in tenants for name in (topic_for(t), dlq_topic_for(t))]
    new = [
        NewTopic(
            name,
            num_partitions=topics.partitions,
            replication_factor=topics.replication_factor,
            config={
                "retention.ms": str(topics.retention_ms),
                "compression.type": topics.compression_type,
            },
        )
        for name in wanted
        if name not in existing
    ]
    if not new:
        return []
    created: list[str] = []
    for name, future in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    log.info("topics provisioned", extra={"created": created})
    return created
