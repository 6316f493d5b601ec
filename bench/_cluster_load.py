"""The load process of ``bench.cluster``: clients spread over two gateway nodes (uvloop).

    python -m bench._cluster_load '{"loop": "open", "ports": {"A": 8080, "B": 8090}, ...}'

Built on ``bench._load_proc`` (message templates with the body stamp, ``Receiver``,
``Stats``, the raw ``bench._wsclient`` connections); what it adds is where each user connects
(``nodes``: user -> node name, ``ports``: node name -> port) and an open-loop mode.

``loop: "closed"``: ``bench._load_proc``'s closed loop unchanged (each sender keeps
``window`` messages un-acked), only with the receivers on another node than the senders.

``loop: "open"``: a fixed offered load, independent of how fast the gateways answer.
Pair ``i`` is sender ``s<i>`` -> receiver ``r<i>``; message ``k`` goes from pair
``k % P`` and is *scheduled* at ``t0 + k / rate``. A timer thread sleeps until each
scheduled time (``time.sleep``: ~0.1 ms precision, where the event loop's timers have
1 ms) and hands the due messages to the event loop, which stamps the *scheduled* time
into the body and sends them. Latency = arrival - scheduled time, so a late send (a
busy loop, a stalled socket) counts against the system instead of silently delaying
the next measurement: no coordinated omission. The send lateness is reported too.
Receivers on the senders' node measure local delivery; receivers on the other node
measure cross-node delivery, in the same run. The first ``warmup_s`` seconds of
messages are sent but not recorded (gRPC channels, first route lookups).

The answer to ``go`` has counts and the paths of int64-ns arrays (native order).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from array import array
from typing import Any

from bench._common import child_arg, common_handlers, control_loop, raise_nofile, reply, run
from bench._load_proc import _STAMP, Load, Receiver, Sender, Stats, _write
from mics.protocol.pb import mics_message_pb2 as msg_pb

CLASSES = ("local", "cross")


class NodeLoad(Load):
    """``bench._load_proc.Load`` with each user connected to its own node."""

    def __init__(self, arg: dict[str, Any]) -> None:
        arg.setdefault("port", 0)
        super().__init__(arg)
        self.ports: dict[str, int] = {k: int(v) for k, v in arg["ports"].items()}
        self.nodes: dict[str, str] = dict(arg["nodes"])

    async def _open(self, user: str) -> Any:
        self.port = self.ports[self.nodes[user]]
        return await super()._open(user)


class OpenLoop(NodeLoad):
    """Fixed-rate sends from the senders' node to local and cross-node receivers."""

    def __init__(self, arg: dict[str, Any]) -> None:
        arg.setdefault("per_sender", 0)  # the closed loop's settings, unused here
        arg.setdefault("window", 0)
        super().__init__(arg)
        self.rate = float(arg["rate"])
        self.seconds = float(arg["seconds"])
        self.warmup_s = float(arg.get("warmup_s", 2.0))
        self.sender_node: str = arg["sender_node"]
        self.receiver_stats: list[Stats] = []  # one per pair, in self.pairs order
        self.ack_lat: dict[str, array[int]] = {c: array("q") for c in CLASSES}
        self.acks = 0
        self.failed = 0
        self.not_live = 0  # SENT with a reason: the message did not reach a live session
        self.lateness = array("q")

    def kind(self, pair: int) -> str:
        return "local" if self.nodes[f"r{pair}"] == self.sender_node else "cross"

    def _messages_of(self, index: int) -> int:
        """Messages of the pair at ``index``: every ``count``-th from ``index``."""
        total = int(self.rate * (self.warmup_s + self.seconds))
        return max(0, (total - index + len(self.pairs) - 1) // len(self.pairs))

    async def connect(self) -> int:
        for index, pair in enumerate(self.pairs):
            conn = await self._open(f"r{pair}")
            stats = Stats(0, self._messages_of(index))
            receiver = Receiver(stats)
            conn.attach(receiver.on_frame)
            self.receivers.append((conn, receiver))
            self.receiver_stats.append(stats)
        for pair in self.pairs:
            conn = await self._open(f"s{pair}")
            # Only for its message template: the sending is done by go() below.
            sender = Sender(pair, self.mode, True, 0, 0, self.body, Stats(0, 0), conn.send)
            self.senders.append((conn, sender))
        return len(self.senders) + len(self.receivers)

    async def go(self, request: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        count = len(self.pairs)
        total = int(self.rate * (self.warmup_s + self.seconds))
        warm = int(self.rate * self.warmup_s)
        period_ns = round(1e9 / self.rate)
        kinds = [self.kind(pair) for pair in self.pairs]
        t0 = time.monotonic_ns() + 20_000_000
        acked = loop.create_future()
        state = {"next": 0}

        def fire(upto: int) -> None:
            """Send every message scheduled up to ``upto`` (exclusive), stamped with its
            scheduled time."""
            now = time.monotonic_ns()
            k = state["next"]
            while k < upto:
                i, seq = k % count, k // count
                scheduled = t0 + k * period_ns
                conn, sender = self.senders[i]
                buf = bytearray(sender.template)
                buf[sender.id_off : sender.id_off + 16] = b"%016x" % seq
                _STAMP.pack_into(buf, sender.stamp_off, scheduled, seq)
                conn.send(bytes(buf))
                if k >= warm:
                    self.lateness.append(now - scheduled)
                k += 1
            state["next"] = k

        def on_ack(i: int, payload: bytes) -> None:
            now = time.monotonic_ns()
            frame = msg_pb.ServerFrame.FromString(payload)
            if frame.WhichOneof("payload") != "ack":
                return
            ack = frame.ack
            k = int(ack.msg_id, 16) * count + i
            self.acks += 1
            if ack.status != msg_pb.SENT:
                self.failed += 1
            elif ack.reason:
                self.not_live += 1
            if k >= warm:
                self.ack_lat[kinds[i]].append(now - (t0 + k * period_ns))
            if self.acks >= total and not acked.done():
                acked.set_result(None)

        for i, (conn, _) in enumerate(self.senders):
            conn.attach(lambda payload, i=i: on_ack(i, payload))
        stop = threading.Event()

        def ticker() -> None:
            for k in range(total):
                delay = (t0 + k * period_ns - time.monotonic_ns()) / 1e9
                if delay > 0 and stop.wait(delay):
                    return
                loop.call_soon_threadsafe(fire, k + 1)

        thread = threading.Thread(target=ticker, name="open-loop", daemon=True)
        thread.start()
        waits = [acked, *(stats.done for stats in self.receiver_stats)]
        budget = self.warmup_s + self.seconds + self.time_limit
        completed = True
        try:
            await asyncio.wait_for(asyncio.gather(*(asyncio.shield(w) for w in waits)), budget)
        except TimeoutError:
            completed = False
        stop.set()
        thread.join()
        delivery: dict[str, array[int]] = {name: array("q") for name in CLASSES}
        for index, stats in enumerate(self.receiver_stats):
            # Each receiver gets its pair's messages in order (out_of_order says if
            # not): the first ones, scheduled before the end of the warm-up, are cut.
            warm_here = max(0, (warm - index + count - 1) // count)
            delivery[kinds[index]].extend(stats.del_lat[warm_here:])
        files: dict[str, str] = {}
        for name in CLASSES:
            files[f"{name}_delivery"] = self._dump(f"{name}-delivery", delivery[name])
            files[f"{name}_ack"] = self._dump(f"{name}-ack", self.ack_lat[name])
        files["lateness"] = self._dump("lateness", self.lateness)
        return {
            "completed": completed,
            "scheduled": total,
            "warmup": warm,
            "sent": state["next"],
            "acked": self.acks,
            "failed": self.failed,
            "not_live": self.not_live,
            "delivered": {
                name: sum(
                    s.delivered for i, s in enumerate(self.receiver_stats) if kinds[i] == name
                )
                for name in CLASSES
            },
            "out_of_order": sum(s.out_of_order for s in self.receiver_stats),
            "unexpected": sum(s.unexpected for s in self.receiver_stats),
            "files": files,
        }

    def _dump(self, what: str, values: array[int]) -> str:
        path = os.path.join(self.out_dir, f"{self.name}-{what}.bin")
        _write(path, values)
        return path


async def main() -> None:
    raise_nofile()
    arg = child_arg()
    load = OpenLoop(arg) if arg.get("loop") == "open" else NodeLoad(arg)
    try:
        connected = await load.connect()
        reply({"connected": connected, "pid": os.getpid()})
        handlers = common_handlers()
        handlers["go"] = load.go
        await control_loop(handlers)
    finally:
        await load.close()


if __name__ == "__main__":
    run(main)
