"""The in-memory offline buffer on the recipient's home node (protocol.md 7.1, 7.2).

A frame that must be buffered for a user goes to the user's home node (rendezvous
hashing over this node's live-node snapshot) by ``BufferOffline``; it stays here when
the snapshot is empty, the home is this node, or the home does not take it (no answer,
breaker open, refused, draining). On connect a node drains the user's frames from the
home (``DrainOffline``) and from its own buffer, which may hold frames kept here while
the home was away, or buffered here by paths that only know the local buffer.

`HomeBuffer` wraps the node's local buffer (`mics.gateway.offline.LegacyBuffer`); the
node service keeps serving ``BufferOffline`` / ``DrainOffline`` from the local buffer
only, so a call never travels on.

The two sources are merged by the messages' timestamps, each source's own order kept
(so one sender's messages stay in the order sent), and a message found in both (a put
that timed out at the home after the home stored it, then was kept here too) is
returned once.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import DecodeError

from mics.cluster.nodes import LiveNode
from mics.protocol.pb import mics_message_pb2 as msg_pb

log = logging.getLogger("mics.cluster.home_buffer")

REASON_BUFFER_UNAVAILABLE = "buffer unavailable"  # protocol.md 9.4: DrainOffline failed


class LocalBuffer(Protocol):
    """This node's own buffer."""

    def put(self, tenant_id: str, user_id: str, frame: bytes, ttl_s: float) -> bool: ...

    def take(self, tenant_id: str, user_id: str) -> list[bytes]: ...


class HomeLocator(Protocol):
    """Who is whose home (`mics.cluster.nodes.NodeDirectory`)."""

    def home_node(self, tenant_id: str, user_id: str) -> LiveNode | None: ...


class HomeClient(Protocol):
    """The node-service calls used (`mics.cluster.forwarding.NodeClient`)."""

    async def buffer_offline(
        self,
        *,
        node_id: str,
        endpoint: str,
        tenant_id: str,
        user_id: str,
        frame: bytes,
        ttl_s: float,
    ) -> bool: ...

    async def drain_offline(
        self, *, node_id: str, endpoint: str, tenant_id: str, user_id: str
    ) -> list[bytes] | None: ...


@dataclass(frozen=True, slots=True)
class Taken:
    """A user's buffered frames, oldest first."""

    frames: list[bytes] = field(default_factory=list)
    # False: the home node could not be asked; what it holds stays there for later.
    complete: bool = True


class HomeBuffer:
    def __init__(
        self, local: LocalBuffer, homes: HomeLocator, client: HomeClient, *, node_id: str
    ) -> None:
        self.local = local
        self._homes = homes
        self._client = client
        self._node_id = node_id

    def remote_home(self, tenant_id: str, user_id: str) -> LiveNode | None:
        """The user's home node if it is another node, else None (buffer here)."""
        home = self._homes.home_node(tenant_id, user_id)
        if home is None or home.node_id == self._node_id:
            return None
        return home

    async def put(self, tenant_id: str, user_id: str, frame: bytes, ttl_s: float) -> bool:
        """Buffer one serialized delivery frame on the user's home node, or here if the
        home does not take it; False if nothing holds it."""
        home = self.remote_home(tenant_id, user_id)
        if home is not None and await self._put_at(home, tenant_id, user_id, frame, ttl_s):
            return True
        return self.local.put(tenant_id, user_id, frame, ttl_s)

    async def _put_at(
        self, home: LiveNode, tenant_id: str, user_id: str, frame: bytes, ttl_s: float
    ) -> bool:
        return await self._client.buffer_offline(
            node_id=home.node_id,
            endpoint=home.endpoint,
            tenant_id=tenant_id,
            user_id=user_id,
            frame=frame,
            ttl_s=ttl_s,
        )

    async def take(self, tenant_id: str, user_id: str) -> Taken:
        """Remove and return the user's frames from the home node and from here."""
        home = self.remote_home(tenant_id, user_id)
        remote: list[bytes] | None = []
        if home is not None:
            remote = await self._client.drain_offline(
                node_id=home.node_id, endpoint=home.endpoint, tenant_id=tenant_id, user_id=user_id
            )
        # After the call: what was kept here meanwhile comes too.
        local = self.local.take(tenant_id, user_id)
        return Taken(merge_frames(remote or [], local), complete=remote is not None)

    async def hand_home(self, tenant_id: str, user_id: str, ttl_s: float) -> int:
        """Move what this node holds for the user to the user's home node (frames put
        here synchronously, e.g. a disconnected connection's unconfirmed deliveries);
        what the home does not take stays here. Returns how many moved."""
        home = self.remote_home(tenant_id, user_id)
        if home is None:
            return 0
        moved = 0
        for frame in self.local.take(tenant_id, user_id):
            if await self._put_at(home, tenant_id, user_id, frame, ttl_s):
                moved += 1
            else:
                self.local.put(tenant_id, user_id, frame, ttl_s)
        return moved

    def restore(self, tenant_id: str, user_id: str, frames: Sequence[bytes], ttl_s: float) -> int:
        """Keep frames taken for a connection that ended before they were sent: here,
        for the user's next connection. Returns how many were kept."""
        return sum(1 for frame in frames if self.local.put(tenant_id, user_id, frame, ttl_s))


def _order_key(frame: bytes) -> tuple[int, str]:
    """(timestamp, "sender|msg_id") of a delivery frame; (0, "") if it is not one."""
    try:
        message = msg_pb.ServerFrame.FromString(frame).delivery.message
    except DecodeError:
        return 0, ""
    if not message.msg_id:
        return message.timestamp_ms, ""
    return message.timestamp_ms, f"{message.user_id}|{message.msg_id}"


def merge_frames(first: list[bytes], second: list[bytes]) -> list[bytes]:
    """Merge two oldest-first frame lists by message timestamp, keeping each list's own
    order (ties: ``first`` first) and dropping repeats of a (sender, msg_id)."""
    if not first or not second:
        return first or second
    keyed = [
        [(_order_key(frame), source, index, frame) for index, frame in enumerate(frames)]
        for source, frames in enumerate((first, second))
    ]
    # Each list is already in its own order; a merge (not a sort) keeps it so even if
    # a client's timestamps are not monotonic.
    merged: list[bytes] = []
    seen: set[str] = set()
    for (_, key), _, _, frame in heapq.merge(*keyed, key=lambda item: (item[0][0], item[1])):
        if key:
            if key in seen:
                continue
            seen.add(key)
        merged.append(frame)
    return merged
