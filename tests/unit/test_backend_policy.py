"""Backend policy functions: the TenantRuntimeConfig of /auth and /check-message rules."""

from __future__ import annotations

import pytest

from mics.backend.config import TenantConfig, UserConfig
from mics.backend.demo import demo_config
from mics.backend.directory import Directory
from mics.backend.hookserver import check_message, runtime_config
from mics.protocol.pb import mics_message_pb2 as msg_pb

OPTIONAL_FIELDS = (
    "hook_max_concurrency",
    "hook_queue_timeout_ms",
    "hook_breaker_failure_threshold",
    "hook_breaker_open_ms",
    "hook_sign_required",
    "offline_use_hook_pull",
    "check_message_fail_closed",
)


def test_runtime_config_defaults() -> None:
    tenant = TenantConfig(secret="s3cret", sign_required=False)
    config = runtime_config(tenant, "http://b:1")
    assert config.hook_base_url == "http://b:1"
    assert config.heartbeat_timeout_seconds == 30
    assert config.offline_buffer_ttl_seconds == 300
    assert config.tenant_max_connections == 0
    assert config.user_max_connections == 0
    assert config.tenant_max_message_qps == 0
    assert config.tenant_secret == "s3cret"
    assert config.offline_mode == "legacy"
    for name in OPTIONAL_FIELDS:
        assert not config.HasField(name), name


def test_runtime_config_all_fields() -> None:
    tenant = TenantConfig(
        secret="s",
        heartbeat_timeout_seconds=10,
        offline_buffer_ttl_seconds=20,
        tenant_max_connections=3,
        user_max_connections=2,
        tenant_max_message_qps=100,
        offline_mode="",
        check_message_fail_closed=False,
        hook_max_concurrency=8,
        hook_queue_timeout_ms=0,
        hook_breaker_failure_threshold=7,
        hook_breaker_open_ms=1500,
    )
    config = runtime_config(tenant, "http://b:1")
    assert (config.heartbeat_timeout_seconds, config.offline_buffer_ttl_seconds) == (10, 20)
    assert (config.tenant_max_connections, config.user_max_connections) == (3, 2)
    assert config.tenant_max_message_qps == 100
    assert config.offline_mode == ""
    # Explicit zero / false values are still present on the wire.
    assert config.HasField("check_message_fail_closed")
    assert config.check_message_fail_closed is False
    assert config.HasField("hook_queue_timeout_ms")
    assert config.hook_queue_timeout_ms == 0
    assert config.hook_max_concurrency == 8
    assert config.hook_breaker_failure_threshold == 7
    assert config.hook_breaker_open_ms == 1500
    assert config.HasField("hook_sign_required")
    assert config.hook_sign_required
    assert not config.HasField("offline_use_hook_pull")


@pytest.fixture
def directory() -> Directory:
    config = demo_config()
    demo = config.tenants["demo"]
    users = {**demo.users, "dave": UserConfig(tokens=["d"]), "eve": UserConfig(blocked=True)}
    tenant = demo.model_copy(update={"users": users})
    return Directory.from_config(config.model_copy(update={"tenants": {"demo": tenant}}))


def _msg(**fields: object) -> msg_pb.MessageRequest:
    base: dict[str, object] = {
        "tenant_id": "demo",
        "user_id": "alice",
        "msg_type": msg_pb.SINGLE_CHAT,
        "to_user_id": "bob",
        "msg_body": b"hello",
    }
    base.update(fields)
    return msg_pb.MessageRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({}, None),
        ({"tenant_id": ""}, None),
        ({"msg_type": msg_pb.GROUP_CHAT, "to_user_id": "", "group_id": "friends"}, None),
        ({"msg_body": b"\xff\xfe not utf-8 but fine"}, None),
        ({"tenant_id": "other"}, "tenant mismatch"),
        ({"user_id": "mallory"}, "sender unknown"),
        ({"user_id": ""}, "sender unknown"),
        ({"user_id": "eve"}, "sender blocked"),
        ({"to_user_id": "mallory"}, "recipient unknown"),
        ({"to_user_id": ""}, "recipient unknown"),
        ({"msg_type": msg_pb.GROUP_CHAT, "group_id": "ghosts"}, "group unknown"),
        (
            {"msg_type": msg_pb.GROUP_CHAT, "group_id": "friends", "user_id": "dave"},
            "not a group member",
        ),
        ({"msg_type": 7}, "unsupported message type"),
        ({"msg_body": b"this is FORBIDDEN talk"}, "blocked word"),
        ({"msg_body": "verboten: Forbidden\u00e9".encode()}, "blocked word"),
        ({"msg_body": b"forbid\xffden"}, "blocked word"),  # invalid byte dropped
        (
            {"msg_type": msg_pb.GROUP_CHAT, "group_id": "friends", "msg_body": b"forbidden"},
            "blocked word",
        ),
    ],
)
def test_check_message(directory: Directory, fields: dict[str, object], reason: str | None) -> None:
    tenant = demo_config().tenants["demo"]
    assert check_message(directory, "demo", tenant, _msg(**fields)) == reason
