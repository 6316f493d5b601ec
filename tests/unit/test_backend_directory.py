"""Backend directory: token lookup, users, groups and their invariants."""

from __future__ import annotations

import pytest

from mics.backend.config import BackendConfig, TenantConfig, UserConfig
from mics.backend.demo import demo_config
from mics.backend.directory import Directory, DirectoryError, TokenOwner


@pytest.fixture
def directory() -> Directory:
    config = demo_config().model_copy(
        update={
            "tenants": {
                **demo_config().tenants,
                "other": TenantConfig(
                    secret="x", users={"zed": UserConfig(tokens=["zed-token"], blocked=True)}
                ),
            }
        }
    )
    return Directory.from_config(config)


def test_from_config(directory: Directory) -> None:
    assert directory.lookup_token("alice-token") == TokenOwner("demo", "alice")
    assert directory.lookup_token("zed-token") == TokenOwner("other", "zed")
    assert directory.lookup_token("nope") is None
    assert directory.lookup_token("") is None
    assert directory.has_tenant("demo")
    assert not directory.has_tenant("ghost")
    assert directory.has_user("demo", "bob")
    assert not directory.has_user("other", "bob")
    assert not directory.has_user("ghost", "bob")
    assert directory.is_blocked("other", "zed")
    assert not directory.is_blocked("demo", "alice")
    assert not directory.is_blocked("demo", "ghost")
    assert directory.group_members("demo", "friends") == ["alice", "bob", "carol"]
    assert directory.group_members("demo", "ghost") is None
    assert directory.group_members("ghost", "friends") is None


def test_empty_config() -> None:
    directory = Directory.from_config(BackendConfig())
    assert not directory.has_tenant("demo")


def test_group_members_is_a_copy(directory: Directory) -> None:
    members = directory.group_members("demo", "friends")
    assert members is not None
    members.append("mallory")
    assert directory.group_members("demo", "friends") == ["alice", "bob", "carol"]


def test_add_user_and_tokens(directory: Directory) -> None:
    assert directory.add_user("demo", "dave", ["dave-1", "dave-2"]) is True
    assert directory.lookup_token("dave-2") == TokenOwner("demo", "dave")
    # Adding again merges tokens and reports "not created".
    assert directory.add_user("demo", "dave", ["dave-3"]) is False
    assert directory.lookup_token("dave-1") == TokenOwner("demo", "dave")
    assert directory.lookup_token("dave-3") == TokenOwner("demo", "dave")
    directory.add_token("demo", "dave", "dave-4")
    assert directory.lookup_token("dave-4") == TokenOwner("demo", "dave")
    assert directory.summary("demo")["users"]["dave"] == {"tokens": 4, "blocked": False}


def test_add_user_keeps_or_sets_blocked(directory: Directory) -> None:
    directory.add_user("demo", "dave", blocked=True)
    directory.add_user("demo", "dave", ["d"])
    assert directory.is_blocked("demo", "dave")
    directory.add_user("demo", "dave", blocked=False)
    assert not directory.is_blocked("demo", "dave")
    directory.set_blocked("demo", "dave", True)
    assert directory.is_blocked("demo", "dave")


def test_token_conflict_changes_nothing(directory: Directory) -> None:
    with pytest.raises(DirectoryError) as info:
        directory.add_user("demo", "dave", ["new-token", "zed-token"])
    assert info.value.kind == "conflict"
    assert "zed" not in str(info.value)  # does not leak the other owner
    assert not directory.has_user("demo", "dave")
    assert directory.lookup_token("new-token") is None
    with pytest.raises(DirectoryError, match="another user"):
        directory.add_token("demo", "alice", "bob-token")
    # Re-adding a token the user already owns is fine.
    directory.add_token("demo", "alice", "alice-token")


@pytest.mark.parametrize(
    ("tenant", "user", "tokens", "kind"),
    [
        ("ghost", "dave", [], "not_found"),
        ("demo", "", [], "invalid"),
        ("demo", "a|b", [], "invalid"),
        ("demo", "dave", [""], "invalid"),
    ],
)
def test_add_user_errors(
    directory: Directory, tenant: str, user: str, tokens: list[str], kind: str
) -> None:
    with pytest.raises(DirectoryError) as info:
        directory.add_user(tenant, user, tokens)
    assert info.value.kind == kind


def test_add_token_unknown_user(directory: Directory) -> None:
    with pytest.raises(DirectoryError) as info:
        directory.add_token("demo", "ghost", "t")
    assert info.value.kind == "not_found"


def test_revoke_token(directory: Directory) -> None:
    assert directory.revoke_token("alice-token") is True
    assert directory.lookup_token("alice-token") is None
    assert directory.revoke_token("alice-token") is False
    assert directory.summary("demo")["users"]["alice"]["tokens"] == 0


def test_remove_user_drops_tokens_and_memberships(directory: Directory) -> None:
    directory.remove_user("demo", "bob")
    assert not directory.has_user("demo", "bob")
    assert directory.lookup_token("bob-token") is None
    assert directory.group_members("demo", "friends") == ["alice", "carol"]
    # The token is free again.
    directory.add_user("demo", "bobby", ["bob-token"])
    assert directory.lookup_token("bob-token") == TokenOwner("demo", "bobby")
    with pytest.raises(DirectoryError) as info:
        directory.remove_user("demo", "bob")
    assert info.value.kind == "not_found"


def test_set_group_members(directory: Directory) -> None:
    assert directory.set_group_members("demo", "pair", ["bob", "alice", "bob"]) is True
    assert directory.group_members("demo", "pair") == ["bob", "alice"]
    assert directory.set_group_members("demo", "pair", []) is False
    assert directory.group_members("demo", "pair") == []
    assert directory.remove_group("demo", "pair") is True
    assert directory.remove_group("demo", "pair") is False


@pytest.mark.parametrize(
    ("tenant", "group", "members", "kind"),
    [
        ("ghost", "g", [], "not_found"),
        ("demo", "", [], "invalid"),
        ("demo", "g|h", [], "invalid"),
        ("demo", "g", ["alice", "zed"], "invalid"),  # zed is a user of another tenant
    ],
)
def test_set_group_errors(
    directory: Directory, tenant: str, group: str, members: list[str], kind: str
) -> None:
    with pytest.raises(DirectoryError) as info:
        directory.set_group_members(tenant, group, members)
    assert info.value.kind == kind
    assert directory.group_members("demo", "g") is None


def test_summary(directory: Directory) -> None:
    summary = directory.summary("demo")
    assert summary == {
        "tenant_id": "demo",
        "users": {
            "alice": {"tokens": 1, "blocked": False},
            "bob": {"tokens": 1, "blocked": False},
            "carol": {"tokens": 1, "blocked": False},
        },
        "groups": {"friends": ["alice", "bob", "carol"]},
    }
    with pytest.raises(DirectoryError):
        directory.summary("ghost")
