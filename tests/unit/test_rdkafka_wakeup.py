"""librdkafka waking the loop through a pipe: when it is trusted, and that it wakes.

No broker: a producer pointed at a closed port gives up on its message after
`message.timeout.ms`, and that failed delivery report is what the pipe announces.
"""

from __future__ import annotations

import asyncio

import pytest
from confluent_kafka import KafkaError, Message, Producer

from mics.events import rdkafka_wakeup
from mics.events.config import EventConfigError, KafkaSettings
from mics.events.rdkafka_wakeup import ReportWakeup
from tests.support.waiting import wait_until


def _producer(client_id: str, cls: type[Producer] = Producer) -> Producer:
    return cls(
        {
            "bootstrap.servers": "127.0.0.1:9",
            "client.id": client_id,
            "message.timeout.ms": 200,
            "log_level": 0,
        }
    )


async def test_a_failed_delivery_report_wakes_the_loop() -> None:
    producer = _producer("wake-test")
    # librdkafka writes to the pipe only when its queue goes from empty to non-empty:
    # let it queue something first (its connection errors), as a producer started a
    # moment before attaching would. Unserved, that would keep the pipe silent for good.
    api = rdkafka_wakeup._load_api()
    assert api is not None
    rk = rdkafka_wakeup._handle_of(producer, "wake-test", api)
    assert rk is not None
    main_queue = api.queue_get_main(rk)
    assert main_queue
    try:
        await wait_until(lambda: api.queue_length(main_queue) > 0, 10, "librdkafka's first ops")
    finally:
        api.queue_destroy(main_queue)

    loop = asyncio.get_running_loop()
    reports: list[KafkaError | None] = []
    got_report = loop.create_future()

    def on_wake() -> None:
        producer.poll(0)  # what the transport does: serve the reports on the loop
        if reports and not got_report.done():
            got_report.set_result(None)

    def report(error: KafkaError | None, _: Message) -> None:
        reports.append(error)

    wakeup = ReportWakeup.attach(producer, "wake-test", loop, on_wake)
    assert wakeup is not None
    try:
        producer.produce("t", b"v", on_delivery=report)
        await asyncio.wait_for(got_report, 10)
    finally:
        wakeup.close()
        wakeup.close()  # idempotent
    assert len(reports) == 1
    assert reports[0] is not None  # nothing listens on port 9: the message timed out


async def test_a_handle_that_does_not_check_out_is_not_used() -> None:
    loop = asyncio.get_running_loop()

    class Wrapped(Producer):  # a subclass may lay its fields out differently
        pass

    assert ReportWakeup.attach(_producer("a", Wrapped), "a", loop, lambda: None) is None
    # A handle that names itself after another client.id is not this producer's.
    assert ReportWakeup.attach(_producer("b"), "someone-else", loop, lambda: None) is None
    attached = ReportWakeup.attach(_producer("c"), "c", loop, lambda: None)
    assert attached is not None
    attached.close()


def test_the_report_wakeup_setting_is_checked() -> None:
    assert KafkaSettings("127.0.0.1:9092").report_wakeup == "fd"
    assert KafkaSettings("127.0.0.1:9092", report_wakeup="thread").report_wakeup == "thread"
    with pytest.raises(EventConfigError, match="report wakeup"):
        KafkaSettings("127.0.0.1:9092", report_wakeup="poll")
