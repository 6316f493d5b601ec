"""Home node by rendezvous hashing (protocol.md 7.1), with the spec's vector."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from mics.cluster import rendezvous
from mics.cluster.rendezvous import home_node, rendezvous_score

NODES = ["n1", "n2", "n3"]


def test_spec_vector_scores_for_t1_u1() -> None:
    assert [rendezvous_score("t1", "u1", n) for n in NODES] == [
        0x35B3450BC95EDCA0,
        0x43D4DBDF9172A379,
        0xF21DE010DBDC8A7E,
    ]


@pytest.mark.parametrize(("user", "home"), [("u1", "n3"), ("u2", "n2"), ("u3", "n1")])
def test_spec_vector_homes(user: str, home: str) -> None:
    assert home_node("t1", user, NODES) == home


def test_score_is_the_first_8_bytes_of_sha256_little_endian() -> None:
    digest = hashlib.sha256("tenant é:user 1:node-a".encode()).digest()
    expected = int.from_bytes(digest[:8], "little")
    assert rendezvous_score("tenant é", "user 1", "node-a") == expected
    assert 0 <= expected < 2**64


def test_the_home_does_not_depend_on_the_list_order() -> None:
    nodes = [f"node-{i}" for i in range(5)]
    for user in (f"u{i}" for i in range(50)):
        homes = {home_node("t1", user, list(p)) for p in itertools.permutations(nodes)}
        assert len(homes) == 1


def test_only_the_users_of_a_removed_node_move() -> None:
    nodes = [f"node-{i}" for i in range(4)]
    users = [f"u{i}" for i in range(400)]
    before = {u: home_node("t1", u, nodes) for u in users}
    after = {u: home_node("t1", u, nodes[:-1]) for u in users}
    moved = {u for u in users if before[u] != after[u]}
    assert moved == {u for u in users if before[u] == "node-3"}
    assert 50 < len(moved) < 150  # about a quarter


def test_a_tie_goes_to_the_first_in_list_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendezvous, "rendezvous_score", lambda tenant, user, node: 7)
    assert rendezvous.home_node("t1", "u1", ["b", "a", "c"]) == "b"


def test_no_nodes_no_home() -> None:
    assert home_node("t1", "u1", []) is None
    assert home_node("t1", "u1", iter(["only"])) == "only"
