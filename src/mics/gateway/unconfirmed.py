"""Deliveries a v1.1 connection has been sent but has not confirmed yet.

A frame written to a socket is not a message the app processed: the connection can die
with the frame in a kernel buffer, or the client can stop reading while closing. For
messages that exist only in the gateway (live deliveries, frames drained from the
in-memory buffer) that would be a silent loss after a SENT ack. So a connection that
speaks receipts (protocol.md 9.2) keeps each such delivery here until a DeliveryAck
confirms it; whatever is still here when the connection ends goes back to the offline
path, and the client's dedup by (sender, msg_id) hides the copies it had processed
after all. Offline pages pulled from the hook are not kept here: they stay in the
backend until their commit, which waits for the same receipts.

Receipts are optional (9.2), so the ledger is bounded: past its message or byte cap
the oldest entries are forgotten (counted), as for a v1 connection.
"""

from __future__ import annotations

from enum import IntEnum


class Kind(IntEnum):
    LIVE = 1  # routed to this connection by the pipeline or a peer node
    BUFFERED = 2  # drained from the in-memory fallback buffer


class Unconfirmed:
    __slots__ = ("_by_id", "_entries", "_max_bytes", "_max_entries", "_seq", "bytes", "evicted")

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        # seq -> (msg_id, frame, kind), in the order the frames were written.
        self._entries: dict[int, tuple[str, bytes, Kind]] = {}
        # msg_id -> its unconfirmed seqs, oldest first (an id may repeat: two senders).
        self._by_id: dict[str, list[int]] = {}
        self._seq = 0
        self.bytes = 0
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, msg_id: str, frame: bytes, kind: Kind) -> None:
        seq = self._seq
        self._seq = seq + 1
        self._entries[seq] = (msg_id, frame, kind)
        seqs = self._by_id.get(msg_id)
        if seqs is None:
            self._by_id[msg_id] = [seq]
        else:
            seqs.append(seq)
        self.bytes += len(frame)
        while len(self._entries) > self._max_entries or (
            self.bytes > self._max_bytes and len(self._entries) > 1
        ):
            self._evict_oldest()

    def confirm(self, msg_id: str) -> Kind | None:
        """Confirm the earliest unconfirmed delivery with ``msg_id``; its kind, or None."""
        seqs = self._by_id.get(msg_id)
        if not seqs:
            return None
        seq = seqs.pop(0)
        if not seqs:
            del self._by_id[msg_id]
        _, frame, kind = self._entries.pop(seq)
        self.bytes -= len(frame)
        return kind

    def pending(self, msg_id: str, kind: Kind) -> int:
        """How many deliveries of ``msg_id`` of ``kind`` wait for their receipt."""
        seqs = self._by_id.get(msg_id)
        if not seqs:
            return 0
        return sum(1 for seq in seqs if self._entries[seq][2] is kind)

    def take(self) -> list[tuple[str, bytes]]:
        """Everything unconfirmed, oldest first, and forget it."""
        entries = [(msg_id, frame) for msg_id, frame, _ in self._entries.values()]
        self._entries.clear()
        self._by_id.clear()
        self.bytes = 0
        return entries

    def _evict_oldest(self) -> None:
        seq = next(iter(self._entries))
        msg_id, frame, _ = self._entries.pop(seq)
        seqs = self._by_id[msg_id]
        seqs.remove(seq)
        if not seqs:
            del self._by_id[msg_id]
        self.bytes -= len(frame)
        self.evicted += 1
