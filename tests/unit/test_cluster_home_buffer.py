"""HomeBuffer: where a buffered frame goes, and what a drain gets back (protocol.md 7.2)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mics.cluster.home_buffer import HomeBuffer, merge_frames
from mics.cluster.nodes import LiveNode
from mics.protocol.pb import mics_message_pb2 as msg_pb


def frame(sender: str, msg_id: str, timestamp_ms: int) -> bytes:
    message = msg_pb.MessageRequest(
        tenant_id="t1", user_id=sender, msg_id=msg_id, timestamp_ms=timestamp_ms
    )
    return msg_pb.ServerFrame(delivery=msg_pb.MessageDelivery(message=message)).SerializeToString()


def ids(frames: list[bytes]) -> list[str]:
    return [msg_pb.ServerFrame.FromString(f).delivery.message.msg_id for f in frames]


@dataclass
class DictBuffer:
    items: dict[tuple[str, str], list[bytes]] = field(default_factory=dict)
    accept: bool = True

    def put(self, tenant_id: str, user_id: str, frame: bytes, ttl_s: float) -> bool:
        if self.accept:
            self.items.setdefault((tenant_id, user_id), []).append(frame)
        return self.accept

    def take(self, tenant_id: str, user_id: str) -> list[bytes]:
        return self.items.pop((tenant_id, user_id), [])


@dataclass
class Homes:
    home: LiveNode | None

    def home_node(self, tenant_id: str, user_id: str) -> LiveNode | None:
        return self.home


@dataclass
class FakePeers:
    """The home node's side of BufferOffline / DrainOffline, reachable or not."""

    remote: DictBuffer = field(default_factory=DictBuffer)
    reachable: bool = True
    puts: list[str] = field(default_factory=list)
    drains: list[str] = field(default_factory=list)

    async def buffer_offline(
        self,
        *,
        node_id: str,
        endpoint: str,
        tenant_id: str,
        user_id: str,
        frame: bytes,
        ttl_s: float,
    ) -> bool:
        self.puts.append(node_id)
        return self.reachable and self.remote.put(tenant_id, user_id, frame, ttl_s)

    async def drain_offline(
        self, *, node_id: str, endpoint: str, tenant_id: str, user_id: str
    ) -> list[bytes] | None:
        self.drains.append(node_id)
        return self.remote.take(tenant_id, user_id) if self.reachable else None


N2 = LiveNode("n2", "http://n2:1")


def home_buffer(
    home: LiveNode | None, peers: FakePeers | None = None
) -> tuple[HomeBuffer, DictBuffer, FakePeers]:
    local = DictBuffer()
    peers = peers or FakePeers()
    return HomeBuffer(local, Homes(home), peers, node_id="n1"), local, peers


async def test_a_frame_goes_to_the_home_node_when_it_is_another_node() -> None:
    buffer, local, peers = home_buffer(N2)
    assert await buffer.put("t1", "u2", b"f", 60)
    assert peers.remote.items == {("t1", "u2"): [b"f"]}
    assert local.items == {}


async def test_a_frame_stays_here_when_this_node_is_home_or_there_is_no_snapshot() -> None:
    for home in (LiveNode("n1", "http://n1:1"), None):
        buffer, local, peers = home_buffer(home)
        assert await buffer.put("t1", "u2", b"f", 60)
        assert local.items == {("t1", "u2"): [b"f"]}
        assert peers.puts == []


async def test_a_home_that_does_not_take_the_frame_leaves_it_here() -> None:
    buffer, local, peers = home_buffer(N2, FakePeers(reachable=False))
    assert await buffer.put("t1", "u2", b"f", 60)
    assert peers.puts == ["n2"]
    assert local.items == {("t1", "u2"): [b"f"]}
    local.accept = False
    assert not await buffer.put("t1", "u2", b"g", 60)  # nothing holds it: say so


async def test_a_drain_takes_from_the_home_and_from_here_merged_by_time() -> None:
    buffer, local, peers = home_buffer(N2)
    peers.remote.items[("t1", "u2")] = [frame("a", "a1", 10), frame("a", "a2", 30)]
    local.items[("t1", "u2")] = [frame("b", "b1", 20), frame("b", "b2", 40)]
    taken = await buffer.take("t1", "u2")
    assert taken.complete
    assert ids(taken.frames) == ["a1", "b1", "a2", "b2"]
    assert peers.remote.items == {}
    assert local.items == {}
    again = await buffer.take("t1", "u2")
    assert (again.frames, again.complete) == ([], True)


async def test_a_drain_whose_home_does_not_answer_still_drains_here() -> None:
    buffer, local, _peers = home_buffer(N2, FakePeers(reachable=False))
    local.items[("t1", "u2")] = [frame("b", "b1", 20)]
    taken = await buffer.take("t1", "u2")
    assert (ids(taken.frames), taken.complete) == (["b1"], False)


async def test_a_drain_at_home_asks_no_one() -> None:
    buffer, local, peers = home_buffer(None)
    local.items[("t1", "u2")] = [frame("b", "b1", 20)]
    taken = await buffer.take("t1", "u2")
    assert (ids(taken.frames), taken.complete) == (["b1"], True)
    assert peers.drains == []


async def test_hand_home_moves_what_is_held_here_in_order_and_keeps_what_the_home_refuses() -> None:
    buffer, local, peers = home_buffer(N2)
    local.items[("t1", "u2")] = [b"x", b"y"]
    assert await buffer.hand_home("t1", "u2", 60) == 2
    assert peers.remote.items == {("t1", "u2"): [b"x", b"y"]}
    assert local.items == {}
    peers.reachable = False
    local.items[("t1", "u2")] = [b"z"]
    assert await buffer.hand_home("t1", "u2", 60) == 0
    assert local.items == {("t1", "u2"): [b"z"]}


async def test_hand_home_at_home_moves_nothing() -> None:
    buffer, local, peers = home_buffer(None)
    local.items[("t1", "u2")] = [b"x"]
    assert await buffer.hand_home("t1", "u2", 60) == 0
    assert local.items == {("t1", "u2"): [b"x"]}
    assert peers.puts == []


async def test_restore_keeps_frames_here() -> None:
    buffer, local, _ = home_buffer(N2)
    assert buffer.restore("t1", "u2", [b"x", b"y"], 60) == 2
    assert local.items == {("t1", "u2"): [b"x", b"y"]}


def test_merge_keeps_each_sources_order_even_with_odd_timestamps() -> None:
    # A client-set timestamp that goes backwards must not reorder one sender's messages.
    first = [frame("a", "a1", 50), frame("a", "a2", 10)]
    second = [frame("b", "b1", 20), frame("b", "b2", 60)]
    merged = ids(merge_frames(first, second))
    assert merged.index("a1") < merged.index("a2")
    assert merged.index("b1") < merged.index("b2")
    assert sorted(merged) == ["a1", "a2", "b1", "b2"]


def test_merge_returns_a_message_found_in_both_sources_once() -> None:
    copy = frame("a", "a1", 10)
    merged = merge_frames([copy, frame("a", "a2", 30)], [copy, frame("b", "b1", 20)])
    assert ids(merged) == ["a1", "b1", "a2"]


def test_merge_of_one_source_is_that_source() -> None:
    only = [frame("a", "a1", 10), b"not a frame"]
    assert merge_frames(only, []) == only
    assert merge_frames([], only) == only
