"""The reference backend (``mics.backend``) in its own process, on uvloop.

    python -m bench._backend_proc '{"pairs": 50, "secret": "s3cret"}'

Serves tenant ``bench`` with users ``s0..s<K-1>`` and ``r0..r<K-1>`` whose tokens are
their names; signing required; offline mode ``legacy``; a long heartbeat timeout.
``hook_queue_timeout_ms`` (default 2000) is put in the runtime config it hands the
gateway, so that the gateway queues /check-message calls behind its concurrency limit
instead of failing them open after the 10 ms default (see bench/README.md).
Answers ``@@ {"url": ..., "pid": ...}`` once listening.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from bench._common import child_arg, common_handlers, control_loop, reply, run
from mics.backend.app import BackendServer
from mics.backend.config import BackendConfig, TenantConfig, UserConfig
from mics.observability.logging import setup_logging

TENANT = "bench"


def bench_config(arg: dict[str, Any]) -> BackendConfig:
    pairs = int(arg.get("pairs", 50))
    users = [f"s{i}" for i in range(pairs)] + [f"r{i}" for i in range(pairs)]
    extra: dict[str, Any] = {}
    if arg.get("hook_queue_timeout_ms") is not None:
        extra["hook_queue_timeout_ms"] = int(arg["hook_queue_timeout_ms"])
    if arg.get("hook_max_concurrency") is not None:
        extra["hook_max_concurrency"] = int(arg["hook_max_concurrency"])
    tenant = TenantConfig(
        secret=arg.get("secret", "bench-secret"),
        sign_required=True,
        heartbeat_timeout_seconds=3600,
        offline_mode="legacy",
        users={user: UserConfig(tokens=[user]) for user in users},
        blocked_words=["forbidden"],
        **extra,
    )
    return BackendConfig(host="127.0.0.1", port=0, tenants={TENANT: tenant})


async def main() -> None:
    setup_logging(os.environ.get("BENCH_BACKEND_LOG_LEVEL", "WARNING"))
    logging.getLogger("aiohttp").setLevel(logging.ERROR)
    server = BackendServer(bench_config(child_arg()))
    await server.start()
    reply({"url": server.url, "pid": os.getpid()})
    try:
        await control_loop(common_handlers())
    finally:
        await server.stop()


if __name__ == "__main__":
    run(main)
