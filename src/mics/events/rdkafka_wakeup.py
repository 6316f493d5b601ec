"""Wake the event loop when librdkafka has delivery reports, with no thread in between.

librdkafka can write a byte to a file descriptor each time its main queue (delivery
reports, errors, and the log lines confluent-kafka forwards there) goes from empty to
non-empty, at most once between two polls:
`rd_kafka_queue_io_event_enable`. The loop watches the read end of a pipe and calls
`producer.poll(0)` on its own thread, so a confirmation costs one epoll wake-up instead
of a thread wake-up, a GIL hand-over and a `call_soon_threadsafe` (measured in
docs/benchmarks.md: half the CPU per event and a third of the p99 at linger.ms=0).

confluent-kafka does not expose that call. It is reached with ctypes through the very
library the `cimpl` extension is linked against (bundled or system librdkafka alike),
given the producer's `rd_kafka_t *`, which confluent-kafka keeps as the first field
after the Python object header. That layout is its implementation detail, so it is
checked before it is trusted: the handle must be a producer that names itself after
this producer's client.id. If anything does not hold, `attach` returns None and the
transport serves its reports from a thread as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import Producer

_RD_KAFKA_PRODUCER = 0  # rd_kafka_type_t
# confluent-kafka's Handle: PyObject_HEAD, then `rd_kafka_t *rk`.
_HANDLE_OFFSET = object.__basicsize__
_WAKE_BYTE = b"!"


@dataclass(frozen=True, slots=True)
class _Api:
    name: Callable[[int], bytes | None]
    type: Callable[[int], int]
    queue_get_main: Callable[[int], int | None]
    io_event_enable: Callable[[int, int, bytes | None, int], None]
    queue_length: Callable[[int], int]
    queue_destroy: Callable[[int], None]


def _load_api() -> _Api | None:
    """librdkafka's functions, from the library confluent-kafka itself uses."""
    if not sys.platform.startswith("linux") and sys.platform != "darwin":
        return None
    try:
        from confluent_kafka import cimpl

        lib = ctypes.CDLL(cimpl.__file__)
        name = lib.rd_kafka_name
        kind = lib.rd_kafka_type
        get_main = lib.rd_kafka_queue_get_main
        enable = lib.rd_kafka_queue_io_event_enable
        length = lib.rd_kafka_queue_length
        destroy = lib.rd_kafka_queue_destroy
    except (OSError, AttributeError, ImportError):
        return None
    name.argtypes, name.restype = [ctypes.c_void_p], ctypes.c_char_p
    kind.argtypes, kind.restype = [ctypes.c_void_p], ctypes.c_int
    get_main.argtypes, get_main.restype = [ctypes.c_void_p], ctypes.c_void_p
    enable.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    enable.restype = None
    length.argtypes, length.restype = [ctypes.c_void_p], ctypes.c_size_t
    destroy.argtypes, destroy.restype = [ctypes.c_void_p], None
    return _Api(name, kind, get_main, enable, length, destroy)


def _handle_of(producer: Producer, client_id: str, api: _Api) -> int | None:
    """The producer's rd_kafka_t *, once it has proved to be one."""
    if type(producer) is not Producer:  # a subclass could add fields before it
        return None
    rk = ctypes.c_void_p.from_address(id(producer) + _HANDLE_OFFSET).value
    if not rk or rk % ctypes.alignment(ctypes.c_void_p):
        return None
    name = api.name(rk)
    # librdkafka names a handle "<client.id>#producer-<n>".
    if name is None or not name.decode("utf-8", "replace").startswith(f"{client_id}#producer-"):
        return None
    if api.type(rk) != _RD_KAFKA_PRODUCER:
        return None
    return rk


class ReportWakeup:
    """A pipe librdkafka writes to when reports are ready, watched by the loop."""

    def __init__(
        self,
        api: _Api,
        queue: int,
        read_fd: int,
        write_fd: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._api = api
        self._queue: int | None = queue
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._loop = loop

    @classmethod
    def attach(
        cls,
        producer: Producer,
        client_id: str,
        loop: asyncio.AbstractEventLoop,
        on_wake: Callable[[], None],
    ) -> ReportWakeup | None:
        """Have `on_wake` run on the loop whenever `producer` has reports to poll;
        None if this librdkafka or confluent-kafka cannot be driven that way."""
        api = _load_api()
        if api is None:
            return None
        rk = _handle_of(producer, client_id, api)
        if rk is None:
            return None
        queue = api.queue_get_main(rk)
        if not queue:
            return None
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)  # librdkafka's threads must never block on it
        wakeup = cls(api, queue, read_fd, write_fd, loop)
        loop.add_reader(read_fd, wakeup._readable, on_wake)
        api.io_event_enable(queue, write_fd, _WAKE_BYTE, len(_WAKE_BYTE))
        # librdkafka writes only when the queue goes from empty to non-empty. Whatever
        # it queued before now (connection errors, log lines) would keep it non-empty
        # and silent: serve it, so the next report is such a transition.
        wakeup._serve(on_wake)
        return wakeup

    def _readable(self, on_wake: Callable[[], None]) -> None:
        # librdkafka writes once per stretch between polls; read it all, then poll
        # (which re-arms it), so nothing written after the poll is missed.
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while os.read(self._read_fd, 4096):
                pass
        self._serve(on_wake)

    def _serve(self, on_wake: Callable[[], None]) -> None:
        on_wake()
        queue = self._queue
        if queue is not None and self._api.queue_length(queue):
            # Still not empty: reports that arrived during the poll (they wrote to the
            # pipe too), or a poll that stopped early because a callback raised, which
            # would leave librdkafka silent. Either way, go round again.
            self._loop.call_soon(self._serve, on_wake)

    def close(self) -> None:
        """Stop watching and hand the queue back; before the producer is destroyed.
        Idempotent."""
        queue, self._queue = self._queue, None
        if queue is None:
            return
        self._loop.remove_reader(self._read_fd)
        self._api.io_event_enable(queue, -1, None, 0)
        self._api.queue_destroy(queue)
        os.close(self._read_fd)
        os.close(self._write_fd)
