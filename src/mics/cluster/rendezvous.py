"""Home node by rendezvous hashing (protocol section 7.1).

score = the first 8 bytes of SHA-256(UTF-8(``tenant + ":" + user + ":" + nodeId``)) read
as a little-endian unsigned 64-bit integer. The node with the highest score is the home;
a tie goes to the node that comes first in the list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["home_node", "rendezvous_score"]


def rendezvous_score(tenant_id: str, user_id: str, node_id: str) -> int:
    digest = hashlib.sha256(f"{tenant_id}:{user_id}:{node_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=False)


def home_node(tenant_id: str, user_id: str, node_ids: Iterable[str]) -> str | None:
    """The highest-scoring node id; the first of equal scores; None for no nodes."""
    best: str | None = None
    best_score = -1
    for node_id in node_ids:
        score = rendezvous_score(tenant_id, user_id, node_id)
        if score > best_score:
            best, best_score = node_id, score
    return best
