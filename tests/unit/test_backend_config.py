"""Backend config: file loading, defaults and validation errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mics.backend.config import (
    EXAMPLE_TOML,
    BackendConfig,
    ConfigError,
    TenantConfig,
    default_public_url,
    is_loopback,
    load_config,
    parse_config,
)
from mics.backend.demo import demo_config
from mics.backend.state import BackendState


def _tenant(**fields: Any) -> dict[str, Any]:
    return {"secret": "s", **fields}


def _config(**tenants: dict[str, Any]) -> dict[str, Any]:
    return {"tenants": tenants}


def test_example_toml_loads(tmp_path: Path) -> None:
    path = tmp_path / "backend.toml"
    path.write_text(EXAMPLE_TOML, encoding="utf-8")
    config = load_config(path)
    assert config.port == 8090
    assert config.admin_token == "change-me"
    demo = config.tenants["demo"]
    assert demo.secret == "dev-secret-demo"
    assert demo.users["alice"].tokens == ["alice-token"]
    assert demo.groups == {"friends": ["alice", "bob"]}
    assert demo.blocked_words == ["forbidden"]


def test_json_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "backend.json"
    data = _config(t1=_tenant(users={"u1": {"tokens": ["tok"]}}, sign_required=False))
    path.write_text(json.dumps(data), encoding="utf-8")
    config = load_config(path)
    assert config.tenants["t1"].sign_required is False
    assert config.tenants["t1"].users["u1"].tokens == ["tok"]


def test_defaults() -> None:
    config = parse_config(_config(t1=_tenant()))
    assert (config.host, config.port, config.public_url) == ("127.0.0.1", 8090, None)
    assert config.admin_token is None
    assert config.clock_skew_seconds == 300
    tenant = config.tenants["t1"]
    assert tenant.sign_required is True
    assert tenant.heartbeat_timeout_seconds == 30
    assert tenant.offline_buffer_ttl_seconds == 300
    assert (tenant.tenant_max_connections, tenant.user_max_connections) == (0, 0)
    assert tenant.tenant_max_message_qps == 0
    assert tenant.offline_mode == "legacy"
    assert tenant.check_message_fail_closed is None
    assert tenant.hook_max_concurrency is None
    assert (tenant.users, tenant.groups, tenant.blocked_words) == ({}, {}, [])
    assert config.resolved_public_url(8090) == "http://127.0.0.1:8090"


def test_database_pool_size(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    default = BackendConfig(database_url=url)
    assert (default.database_pool_size, default.database_max_overflow) == (10, None)
    store = BackendState.from_config(default).store
    assert (store.pool_size, store.max_overflow) == (10, 10)  # unchanged: 10 + 10

    path = tmp_path / "backend.toml"
    path.write_text("database_pool_size = 4\ndatabase_max_overflow = 0\n", encoding="utf-8")
    sized = load_config(path)
    assert (sized.database_pool_size, sized.database_max_overflow) == (4, 0)
    store = BackendState.from_config(sized).store
    assert (store.pool_size, store.max_overflow) == (4, 0)
    # Overflow follows the pool size unless given.
    store = BackendState.from_config(BackendConfig(database_pool_size=3)).store
    assert (store.pool_size, store.max_overflow) == (3, 3)


def test_public_url_is_normalized_and_wins() -> None:
    config = BackendConfig(public_url="https://backend.example/")
    assert config.public_url == "https://backend.example"
    assert config.resolved_public_url(1234) == "https://backend.example"


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "http://127.0.0.1:80"),
        ("0.0.0.0", "http://127.0.0.1:80"),
        ("::", "http://[::1]:80"),
        ("::1", "http://[::1]:80"),
        ("backend.local", "http://backend.local:80"),
    ],
)
def test_default_public_url(host: str, expected: str) -> None:
    assert default_public_url(host, 80) == expected


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_admin_enabled() -> None:
    assert BackendConfig(host="127.0.0.1").admin_enabled
    assert not BackendConfig(host="0.0.0.0").admin_enabled
    assert BackendConfig(host="0.0.0.0", admin_token="x").admin_enabled


def test_offline_mode_empty_allowed() -> None:
    assert TenantConfig(secret="s", offline_mode="").offline_mode == ""
    assert TenantConfig(secret="s", offline_mode="notify_pull").offline_mode == "notify_pull"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_config(t1={}), "secret"),
        (_config(t1=_tenant(secret="")), "secret"),
        (_config(**{"": _tenant()}), "tenant id must not be empty"),
        (_config(**{"a|b": _tenant()}), "must not contain '|'"),
        (_config(t1=_tenant(users={"": {}})), "user id must not be empty"),
        (_config(t1=_tenant(users={"u|1": {}})), "must not contain '|'"),
        (_config(t1=_tenant(groups={"g|1": []})), "must not contain '|'"),
        (_config(t1=_tenant(groups={"g": ["ghost"]})), "'ghost' is not a user"),
        (_config(t1=_tenant(users={"u": {}}, groups={"g": ["u", "u"]})), "must not repeat"),
        (_config(t1=_tenant(users={"u": {"tokens": [""]}})), "tokens must not be empty"),
        (_config(t1=_tenant(users={"u": {"tokens": ["a", "a"]}})), "tokens must not repeat"),
        (
            _config(
                t1=_tenant(users={"u": {"tokens": ["same"]}}),
                t2=_tenant(users={"v": {"tokens": ["same"]}}),
            ),
            "already used by 't1/u'",
        ),
        (_config(t1=_tenant(offline_mode="pull")), "offline_mode must be one of"),
        (_config(t1=_tenant(blocked_words=[""])), "blocked_words"),
        (_config(t1=_tenant(heartbeat_timeout_seconds=2**31)), "heartbeat_timeout_seconds"),
        (_config(t1=_tenant(hook_max_concurrency=-(2**31) - 1)), "hook_max_concurrency"),
        (_config(t1=_tenant(sign_requried=False)), "sign_requried"),
        ({"port": 70000}, "port"),
        ({"clock_skew_seconds": 0}, "clock_skew_seconds"),
        ({"public_url": "backend:8090"}, "public_url must start with http"),
        ({"admin_token": ""}, "admin_token must not be empty"),
        ({"database_pool_size": 0}, "database_pool_size"),
        ({"database_max_overflow": -1}, "database_max_overflow"),
    ],
)
def test_validation_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match="invalid backend config") as info:
        parse_config(data)
    assert message in str(info.value)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")


def test_load_config_bad_toml(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("tenants = [", encoding="utf-8")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(path)


def test_load_config_json_not_object(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level"):
        load_config(path)


def test_validation_error_names_file(tmp_path: Path) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[tenants.t1]\nsecret = ""\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"b\.toml"):
        load_config(path)


def test_demo_config() -> None:
    config = demo_config(port=1234, secret="s3")
    assert config.port == 1234
    demo = config.tenants["demo"]
    assert demo.secret == "s3"
    assert demo.sign_required
    assert {u: c.tokens for u, c in demo.users.items()} == {
        "alice": ["alice-token"],
        "bob": ["bob-token"],
        "carol": ["carol-token"],
    }
    assert demo.groups == {"friends": ["alice", "bob", "carol"]}
    assert demo.heartbeat_timeout_seconds == 30
    assert demo.offline_mode == "notify_pull"
    assert demo.blocked_words == ["forbidden"]
    assert demo_config().tenants["demo"].secret == "dev-secret-demo"
