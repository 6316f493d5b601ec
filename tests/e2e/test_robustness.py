"""Failures inside the gateway: no leaked sessions, clear errors, the connection survives."""

from __future__ import annotations

import pytest

from mics.client import ConnectRejected
from mics.cluster.routes import Admission, AdmissionLimits, MemoryRouteTable, Route
from mics.protocol.pb import mics_message_pb2 as msg_pb
from tests.e2e.conftest import TENANT, StackFactory


class ExplodingAdmission(MemoryRouteTable):
    """A route table whose admission fails, as a broken Redis would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    async def admit(self, route: Route, limits: AdmissionLimits) -> Admission:
        if self.fail:
            raise ConnectionError("route table unavailable")
        return await super().admit(route, limits)


async def test_failure_during_connect_setup_leaks_nothing(make_stack: StackFactory) -> None:
    routes = ExplodingAdmission()
    stack = await make_stack(routes=routes)
    client = stack.client("u1")
    with pytest.raises(ConnectRejected) as info:
        await client.connect()
    assert info.value.code == 1011
    gateway = stack.gateway.gateway
    assert len(gateway.registry) == 0
    assert stack.metric("mics_internal_errors_total", {"tenant": TENANT, "where": "session"}) == 1
    # Nothing half-registered blocks the device afterwards.
    routes.fail = False
    again = await stack.connect("u1")
    assert again.is_open
    assert len(gateway.registry) == 1


async def test_unexpected_error_in_pipeline_acks_internal_error(
    make_stack: StackFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = await make_stack()
    pipeline = stack.gateway.gateway.pipeline
    real = pipeline._deliver_local
    calls = {"n": 0}

    def flaky(tenant_id: str, user_id: str, frame: bytes, msg_id: str) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return real(tenant_id, user_id, frame, msg_id)

    monkeypatch.setattr(pipeline, "_deliver_local", flaky)
    alice = await stack.connect("u1")
    bob = await stack.connect("u2")
    failed = await alice.send_single("u2", b"first", msg_id="ie-1")
    assert (failed.status, failed.reason) == (msg_pb.FAILED, "internal error")
    # The id was not consumed and the connection keeps working.
    retry = await alice.send_single("u2", b"first", msg_id="ie-1")
    assert (retry.status, retry.reason) == (msg_pb.SENT, "")
    assert (await bob.next_delivery(timeout=5)).msg_id == "ie-1"
    assert stack.metric("mics_internal_errors_total", {"tenant": TENANT, "where": "pipeline"}) == 1
