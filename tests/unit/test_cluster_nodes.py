"""NodeDirectory settings, key names and loop shutdown; no Redis server."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from mics.cluster.nodes import (
    NODES_KNOWN,
    NODES_LIVE,
    CleanupReport,
    NodeDirectory,
    cleanup_lock_key,
    node_key,
)

UNREACHABLE = "redis://127.0.0.1:1/0"  # connections are refused at once


def unreachable() -> Redis:
    return Redis.from_url(UNREACHABLE, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


def test_key_names() -> None:
    assert node_key("n1") == "nodes:n1"
    assert cleanup_lock_key("n1") == "nodes:n1:cleanup_lock"
    assert (NODES_LIVE, NODES_KNOWN) == ("nodes:live", "nodes:known")


async def test_defaults_and_validation() -> None:
    client = unreachable()
    node = NodeDirectory(client, "n1", "http://n1:8080")
    assert (node.ttl_s, node.refresh_s, node.snapshot_s, node.cleanup_s) == (30, 10, 3, 5)
    assert node.cleanup_lock_s == 15
    assert node.live_nodes == ()
    assert node.home_node("t1", "u1") is None
    assert not node.running
    with pytest.raises(ValueError, match="refresh_s"):
        NodeDirectory(client, "n1", "http://n1", ttl_s=2.0, refresh_s=2.0)
    with pytest.raises(ValueError, match="node id"):
        NodeDirectory(client, "n|1", "http://n1")
    with pytest.raises(ValueError, match="endpoint"):
        NodeDirectory(client, "n1", "")
    with pytest.raises(ValueError, match="cleanup_s"):
        NodeDirectory(client, "n1", "http://n1", ttl_s=2.0, refresh_s=0.5, cleanup_s=2.0)
    with pytest.raises(ValueError, match="> 0"):
        NodeDirectory(client, "n1", "http://n1", cleanup_s=0)
    await client.aclose()


async def test_start_survives_an_unreachable_redis_and_stop_ends_the_loops() -> None:
    client = unreachable()
    node = NodeDirectory(
        client, "n1", "http://n1", ttl_s=2, refresh_s=0.05, snapshot_s=0.05, cleanup_s=0.05
    )
    await node.start()
    try:
        assert node.running
        assert node.stats.heartbeat_failures >= 1
        assert node.stats.snapshot_failures >= 1
    finally:
        await asyncio.wait_for(node.stop(), 5)
    assert not node.running
    await client.aclose()


async def test_stop_ends_a_loop_whose_operation_swallowed_the_cancellation() -> None:
    # redis-py 8.2 sometimes swallows a task's cancellation inside a command.
    client = unreachable()
    node = NodeDirectory(client, "n1", "http://n1", ttl_s=30, refresh_s=20, cleanup_s=0.01)
    entered = asyncio.Event()

    async def swallowing_cleanup() -> CleanupReport:
        entered.set()
        with contextlib.suppress(asyncio.CancelledError):  # what the bug does
            await asyncio.sleep(30)
        return CleanupReport()

    node.cleanup_dead_nodes = swallowing_cleanup  # type: ignore[method-assign]
    await node.start()
    await asyncio.wait_for(entered.wait(), 5)

    await asyncio.wait_for(node.stop(), 5)

    assert not node.running
    await client.aclose()
