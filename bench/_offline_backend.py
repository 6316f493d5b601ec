"""The reference backend with its offline store, in its own process, for ``bench.offline``.

    python -m bench._offline_backend '{"database_url": "postgresql+asyncpg://...", ...}'

The JSON argument: ``database_url`` (required); ``kafka`` (bootstrap servers; "" = no
Kafka consumer); ``tenant`` and ``secret``; ``users`` (N: users ``u0..u<N-1>`` whose
token is their name); ``offline_mode`` (default ``notify_pull``); ``consumer_settings``
(keyword arguments of each ``OfflineConsumer``: ``batch_size``, ``lag_interval_s``, ...);
``consumer_options`` (extra librdkafka settings); ``profile_at_start``
(with BENCH_CPROFILE=<path>: cProfile from before the consumer starts). Periodic jobs
are off. Answers ``@@ {"url": ..., "pid": ...}`` once listening, then serves the
commands of ``bench._common`` plus:

- ``wait_counter {"name": "stored"|"acked", "count": N, "timeout": s}``: polls the
  counter (``offline_message_stored_total`` or ``offline_message_delivered_total
  {via="ack"}`` of the tenant) every ``poll_ms`` (default 2) until it reaches N; answers
  the monotonic times (``time.monotonic()``, comparable across processes) of the first
  change and of reaching N, the value seen at the first change, and this process's CPU
  seconds at both points;
- ``pending {"user": id}``: the user's undelivered rows, from the database.

It stops (consumers first, then HTTP and the store) when stdin closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from prometheus_client import Counter

from bench._common import Profiler, child_arg, common_handlers, control_loop, reply, run
from mics.backend.app import BackendServer
from mics.backend.config import BackendConfig, TenantConfig, UserConfig
from mics.observability.logging import setup_logging


def backend_config(arg: dict[str, Any]) -> BackendConfig:
    users = [f"u{i}" for i in range(int(arg.get("users", 0)))]
    tenant = TenantConfig(
        secret=arg["secret"],
        sign_required=True,
        heartbeat_timeout_seconds=3600,
        offline_mode=arg.get("offline_mode", "notify_pull"),
        users={user: UserConfig(tokens=[user]) for user in users},
        hook_queue_timeout_ms=5000,
    )
    return BackendConfig(
        host="127.0.0.1",
        port=0,
        database_url=arg["database_url"],
        kafka_bootstrap_servers=arg.get("kafka", ""),
        kafka_consumer_options=arg.get("consumer_options", {}),
        jobs_interval_seconds=0,
        tenants={arg["tenant"]: tenant},
    )


def counter_value(counter: Counter, labels: dict[str, str]) -> float:
    """One labelled sample of ``counter`` (collects this counter only, not the registry)."""
    for family in counter.collect():
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def main() -> None:
    arg = child_arg()
    setup_logging(os.environ.get("BENCH_BACKEND_LOG_LEVEL", "WARNING"))
    logging.getLogger("aiohttp").setLevel(logging.ERROR)
    profiler = Profiler()
    if arg.get("profile_at_start"):
        profiler.start({})
    server = BackendServer(backend_config(arg), consumer_settings=arg.get("consumer_settings"))
    await server.start()
    tenant = arg["tenant"]
    metrics = server.state.metrics
    counters = {
        "stored": (metrics.stored, {"tenant": tenant}),
        "acked": (metrics.delivered, {"tenant": tenant, "via": "ack"}),
    }

    async def wait_counter(req: dict[str, Any]) -> dict[str, Any]:
        counter, labels = counters[req["name"]]
        want = float(req["count"])
        poll_s = float(req.get("poll_ms", 2)) / 1000
        deadline = time.monotonic() + float(req.get("timeout", 60))
        start = counter_value(counter, labels)
        first_t = first_cpu = 0.0
        first_value = start
        value = start
        while value < want and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
            value = counter_value(counter, labels)
            if not first_t and value > start:
                first_t, first_cpu, first_value = time.monotonic(), time.process_time(), value
        return {
            "value": value,
            "reached": value >= want,
            "first_t": first_t,
            "first_value": first_value,
            "first_cpu": first_cpu,
            "done_t": time.monotonic(),
            "done_cpu": time.process_time(),
        }

    async def pending(req: dict[str, Any]) -> dict[str, Any]:
        repository = await server.state.store.repository()
        return {"pending": await repository.count_pending(tenant, req["user"])}

    handlers = common_handlers()
    handlers.update(
        {
            "wait_counter": wait_counter,
            "pending": pending,
            "profile_start": profiler.start,
            "profile_stop": profiler.stop,
        }
    )
    reply({"url": server.url, "pid": os.getpid()})
    try:
        await control_loop(handlers)
    finally:
        await server.stop()


if __name__ == "__main__":
    run(main)
