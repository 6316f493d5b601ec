"""Message dedup: (tenant, sender, msg_id) seen within the TTL (protocol.md 9.7).

Bounded memory, and compact: the cache holds every message's id for the TTL (10
minutes, up to a million ids per node), so it is the gateway's main per-message memory.
No Python object is kept per id. A key is reduced to a 128-bit blake2b digest, and:

- the *records*, one per claim in claim order, live in three flat arrays (the digest's
  two halves and the expiry): 24 bytes each. Claim order is also expiry order, the TTL
  being fixed, so expired records are evicted from the front in O(1) each, and a hard
  cap evicts the oldest first when traffic outruns the TTL;
- an *index* finds a digest's record: open-addressing hash tables (linear probing,
  at most half full) of 4-byte record references, split in up to 4,096 shards so that
  growing one rehashes a few hundred entries, never the whole cache at once.

About 40 bytes per id in all, against ~210 for a dict of strings. Two different keys
collide on all 128 bits with probability ~2^-128 per pair: never in practice.

A released key's record stays in the arrays, marked dead, until it reaches the front
(it no longer counts as an entry). Dead records are bounded too: at most `max_entries`
of them beyond the live ones, else the oldest records go first.
"""

from __future__ import annotations

import struct
import time
from array import array
from collections.abc import Callable
from hashlib import blake2b

_SPLIT = struct.Struct("<QQ").unpack_from
# A record reference in the index is its sequence number modulo _SEQ_MOD, plus one, so
# that 0 means an empty slot. The records held never span _SEQ_MOD sequence numbers.
_SEQ_MOD = 0xFFFF_FFFF
_MAX_ENTRIES = 1 << 30
_MIN_SLOTS = 8
_MAX_SHARDS = 4096
_ENTRIES_PER_SHARD = 256  # the shard count aims at about this many entries each, full
_DEAD = float("-inf")  # the expiry of a released record
_COMPACT_MIN = 4096  # evicted records kept at the front before the arrays are compacted


def _digest(key: str) -> tuple[int, int]:
    """The key's 128-bit digest (blake2b's first 16 bytes), as two integers."""
    hi, lo = _SPLIT(blake2b(key.encode()).digest())
    return hi, lo


class DedupCache:
    def __init__(
        self,
        ttl_s: float = 600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ttl = ttl_s
        self._max = min(max(1, max_entries), _MAX_ENTRIES)
        self._clock = clock
        # Records: claim order. Positions below _head are evicted, awaiting compaction;
        # _base is the sequence number (mod _SEQ_MOD) of position 0.
        self._hi = array("Q")
        self._lo = array("Q")
        self._exp = array("d")
        self._head = 0
        self._base = 0
        self._live = 0
        shards = 1
        while shards < _MAX_SHARDS and shards * _ENTRIES_PER_SHARD < self._max:
            shards *= 2
        self._shard_mask = shards - 1
        self._tables = [array("I", bytes(4 * _MIN_SLOTS)) for _ in range(shards)]
        self._used = array("I", bytes(4 * shards))

    @staticmethod
    def key(tenant_id: str, user_id: str, msg_id: str) -> str:
        # Tenant and user ids never contain '|'; msg_id comes last, so keys are unambiguous.
        return f"{tenant_id}|{user_id}|{msg_id}"

    def claim(self, key: str) -> bool:
        """Record the key; False if it was already seen and has not expired."""
        now = self._clock()
        exp = self._exp
        head = self._head
        if head < len(exp) and (
            exp[head] <= now or self._live >= self._max or len(exp) - head >= 2 * self._max
        ):
            self._evict(now)
        hi, lo = _SPLIT(blake2b(key.encode()).digest())
        shard = hi & self._shard_mask
        # The index lookup (_find), inlined: this runs for every message.
        table = self._tables[shard]
        mask = len(table) - 1
        his = self._hi
        los = self._lo
        base = self._base
        slot = lo & mask
        while ref := table[slot]:
            pos = (ref - 1 - base) % _SEQ_MOD
            if los[pos] == lo and his[pos] == hi:
                if exp[pos] > now:
                    return False
                # Only with a clock that went back: expired, yet not evicted.
                self._kill(shard, slot, pos)
                table = self._tables[shard]
                slot, _ = self._find(shard, hi, lo)
                break
            slot = (slot + 1) & mask
        pos = len(exp)
        his.append(hi)
        los.append(lo)
        exp.append(now + self._ttl)
        table[slot] = (base + pos) % _SEQ_MOD + 1
        self._live += 1
        used = self._used[shard] + 1
        self._used[shard] = used
        if used * 2 > len(table):
            self._resize(shard, len(table) * 2)
        return True

    def release(self, key: str) -> None:
        """Forget a key whose message failed before delivery, so its retry is processed."""
        hi, lo = _digest(key)
        shard = hi & self._shard_mask
        slot, pos = self._find(shard, hi, lo)
        if pos < 0:
            return
        self._kill(shard, slot, pos)
        exp = self._exp
        if pos == len(exp) - 1:
            # The newest record (a message refused at once), and any dead ones before
            # it: nothing to keep.
            while len(exp) > self._head and exp[-1] == _DEAD:
                self._hi.pop()
                self._lo.pop()
                exp.pop()

    def __len__(self) -> int:
        return self._live

    # -- records ------------------------------------------------------------------------

    def _evict(self, now: float) -> None:
        exp = self._exp
        head = self._head
        end = len(exp)
        # Dead records are at most self._max beyond the live ones.
        records_cap = 2 * self._max
        while head < end:
            expiry = exp[head]
            if expiry > now and self._live < self._max and end - head < records_cap:
                break
            if expiry != _DEAD:
                self._unlink(head)
            head += 1
        if head == end:
            if end:
                self._clear_records(end)
            return
        self._head = head
        if head >= _COMPACT_MIN and head * 2 >= end:
            del self._hi[:head]
            del self._lo[:head]
            del self._exp[:head]
            self._base = (self._base + head) % _SEQ_MOD
            self._head = 0

    def _clear_records(self, end: int) -> None:
        del self._hi[:]
        del self._lo[:]
        del self._exp[:]
        self._base = (self._base + end) % _SEQ_MOD
        self._head = 0

    def _unlink(self, pos: int) -> None:
        """Remove the live record at ``pos`` from the index (it is being evicted)."""
        hi = self._hi[pos]
        shard = hi & self._shard_mask
        table = self._tables[shard]
        mask = len(table) - 1
        ref = (self._base + pos) % _SEQ_MOD + 1
        slot = self._lo[pos] & mask
        while table[slot] != ref:
            slot = (slot + 1) & mask
        self._remove(shard, slot)
        self._live -= 1

    def _kill(self, shard: int, slot: int, pos: int) -> None:
        """Forget a live record found at index ``slot``: out of the index, marked dead."""
        self._remove(shard, slot)
        self._exp[pos] = _DEAD
        self._live -= 1

    # -- index --------------------------------------------------------------------------

    def _find(self, shard: int, hi: int, lo: int) -> tuple[int, int]:
        """(slot, record position) of the digest, or (the empty slot to use, -1)."""
        table = self._tables[shard]
        mask = len(table) - 1
        his = self._hi
        los = self._lo
        base = self._base
        slot = lo & mask
        while True:
            ref = table[slot]
            if not ref:
                return slot, -1
            pos = (ref - 1 - base) % _SEQ_MOD
            if los[pos] == lo and his[pos] == hi:
                return slot, pos
            slot = (slot + 1) & mask

    def _remove(self, shard: int, slot: int) -> None:
        """Empty ``slot``, shifting back the entries after it (no tombstones)."""
        table = self._tables[shard]
        mask = len(table) - 1
        los = self._lo
        base = self._base
        hole = slot
        probe = slot
        while True:
            probe = (probe + 1) & mask
            ref = table[probe]
            if not ref:
                break
            home = los[(ref - 1 - base) % _SEQ_MOD] & mask
            # The entry stays if its home lies cyclically in (hole, probe].
            if not 0 < (home - hole) & mask <= (probe - hole) & mask:
                table[hole] = ref
                hole = probe
        table[hole] = 0
        used = self._used[shard] - 1
        self._used[shard] = used
        size = len(table)
        if size > _MIN_SLOTS and used * 8 < size:
            self._resize(shard, size // 2)

    def _resize(self, shard: int, size: int) -> None:
        old = self._tables[shard]
        table = array("I", bytes(4 * size))
        mask = size - 1
        los = self._lo
        base = self._base
        for ref in old:
            if ref:
                slot = los[(ref - 1 - base) % _SEQ_MOD] & mask
                while table[slot]:
                    slot = (slot + 1) & mask
                table[slot] = ref
        self._tables[shard] = table
