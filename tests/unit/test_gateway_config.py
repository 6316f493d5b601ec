"""Gateway settings from the environment, a TOML file and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from mics.gateway.config import GatewaySettings, load_settings


def test_v1_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("NODE_ID", "n7")
    monkeypatch.setenv("TENANT_AUTH_MAP", '{"t1": "http://auth.example:80"}')
    monkeypatch.setenv("TENANT_HOOK_SECRETS", '{"t1": "s1"}')
    monkeypatch.setenv("HOOK_QUEUE_TIMEOUT_MS", "999999")
    monkeypatch.setenv("HOOK_MAX_CONCURRENCY", "0")
    settings = load_settings()
    assert (settings.port, settings.node_id) == (9000, "n7")
    assert settings.tenant_auth_map == {"t1": "http://auth.example:80"}
    assert settings.tenant_hook_secrets == {"t1": "s1"}
    assert settings.hook_queue_timeout_ms == 10_000  # clamped to the spec's range
    assert settings.hook_max_concurrency == 32  # <= 0 -> 32
    # Peers dial the node service, on PORT + 1 unless GRPC_PORT says otherwise.
    assert settings.endpoint == "http://localhost:9001"


def test_toml_file_and_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    path = tmp_path / "gateway.toml"
    path.write_text(
        'port = 9100\nMAX_MESSAGE_BYTES = 2048\n[tenant_auth_map]\nt1 = "http://127.0.0.1:1"\n'
    )
    settings = load_settings(path, node_id="override")
    assert settings.port == 9100  # the file beats the environment
    assert settings.max_message_bytes == 2048
    assert settings.node_id == "override"


@pytest.mark.parametrize(
    "auth_map",
    [{"": "http://x"}, {"a|b": "http://x"}, {"t1": "ftp://x"}, {"t1": "not a url"}],
)
def test_invalid_tenants_are_a_clear_startup_error(auth_map: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        GatewaySettings(tenant_auth_map=auth_map)


def test_malformed_json_in_environment_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TENANT_AUTH_MAP", "{not json")
    with pytest.raises(Exception, match="tenant_auth_map"):
        load_settings()


@pytest.mark.parametrize("servers", ["localhost", "host:", ":9092", "a:1,,b:2", "h:70000"])
def test_bad_kafka_bootstrap_string_is_a_clear_startup_error(servers: str) -> None:
    with pytest.raises(ValidationError, match="bootstrap"):
        GatewaySettings(
            kafka_bootstrap_servers=servers,
            tenant_auth_map={"t1": "http://127.0.0.1:1"},
            tenant_hook_secrets={"t1": "s"},
        )


def test_events_without_a_tenant_secret_refuse_to_start() -> None:
    with pytest.raises(ValidationError, match="must be signed"):
        GatewaySettings(
            kafka_bootstrap_servers="127.0.0.1:9092",
            tenant_auth_map={"t1": "http://127.0.0.1:1", "t2": "http://127.0.0.1:2"},
            tenant_hook_secrets={"t1": "s"},
        )


def test_kafka_enabled_by_bootstrap_servers_as_in_v1(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    assert load_settings().resolved_event_bus == "kafka"
    monkeypatch.setenv("KAFKA__BOOTSTRAP_SERVERS", "")
    assert load_settings().resolved_event_bus == "none"
    assert load_settings(event_bus="inprocess").resolved_event_bus == "inprocess"


def test_the_shipped_example_config_loads() -> None:
    example = Path(__file__).parents[2] / "deploy" / "config" / "gateway.toml"
    settings = load_settings(example)
    assert settings.node_id == "gw-1"
    assert settings.resolved_event_bus == "kafka"
    assert settings.tenant_auth_map == {"acme": "https://im-hooks.acme.example"}


def test_cluster_timing_that_would_make_live_nodes_look_dead_is_refused() -> None:
    with pytest.raises(ValidationError, match="shorter than"):
        GatewaySettings(node_ttl_seconds=5, node_refresh_seconds=10)
    with pytest.raises(ValidationError, match="shorter than"):
        GatewaySettings(node_ttl_seconds=5, node_cleanup_seconds=5)
