"""A gateway node in its own process, on uvloop, driven by a benchmark orchestrator.

    python -m bench._gateway_proc '{"tenant_auth_map": {"bench": "http://..."}}'

The JSON argument is passed to ``GatewaySettings`` (host 127.0.0.1 and port 0 by
default). Answers ``@@ {"port": ..., "pid": ...}`` once listening, then serves the
commands of ``bench._common`` plus:

- ``count``: open sessions (``len(gateway.registry)``);
- ``tm_base`` / ``tm_diff``: tracemalloc snapshot and the top allocation sites grown
  since the base (only with PYTHONTRACEMALLOC set);
- ``profile_start`` / ``profile_stop``: cProfile, with BENCH_CPROFILE=<dump path>.

It stops (gracefully, as ``mics gateway`` does on SIGTERM) when stdin closes.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from bench._common import child_arg, common_handlers, control_loop, raise_nofile, reply, run
from mics.gateway.app import GatewayServer
from mics.gateway.config import GatewaySettings
from mics.observability.logging import setup_logging


async def main() -> None:
    raise_nofile()
    config: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "node_id": "bench-node"}
    config.update(child_arg())
    settings = GatewaySettings(**config)
    setup_logging(os.environ.get("BENCH_GATEWAY_LOG_LEVEL", "WARNING"))
    logging.getLogger("aiohttp").setLevel(logging.ERROR)
    server = GatewayServer(settings)
    await server.start()
    handlers = common_handlers()
    handlers["count"] = lambda _: {"count": len(server.gateway.registry)}
    reply({"port": server.port, "pid": os.getpid()})
    try:
        await control_loop(handlers)
    finally:
        await server.stop()


if __name__ == "__main__":
    run(main)
