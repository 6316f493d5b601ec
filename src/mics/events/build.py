"""Building signed MqEvents (protocol.md section 5.2).

One place builds and signs what the gateway publishes, so every event carries the same
envelope (tenant, node, trace, timestamp) and the same signature whoever emits it: the
message pipeline, the connect/disconnect notices, and deliveries handed back to the
offline path when a connection ends before confirming them.
"""

from __future__ import annotations

from mics.observability.logging import now_ms
from mics.protocol.pb import mics_hook_pb2 as hook_pb
from mics.protocol.pb import mics_message_pb2 as msg_pb
from mics.protocol.signing import sign_event


def signed_event(
    *,
    tenant_id: str,
    event_type: hook_pb.EventType,
    secret: str,
    node_id: str,
    trace_id: str,
    user_id: str,
    device_id: str,
    event_data: bytes,
    msg_id: str = "",
    to_user_id: str = "",
    group_id: str = "",
) -> hook_pb.MqEvent:
    event = hook_pb.MqEvent(
        tenant_id=tenant_id,
        event_type=event_type,
        msg_id=msg_id,
        user_id=user_id,
        device_id=device_id,
        to_user_id=to_user_id,
        group_id=group_id,
        event_data=event_data,
        timestamp=now_ms(),
        node_id=node_id,
        trace_id=trace_id,
    )
    sign_event(event, secret)
    return event


def message_event(
    req: msg_pb.MessageRequest,
    event_type: hook_pb.EventType,
    to_user_id: str,
    *,
    tenant_id: str,
    secret: str,
    node_id: str,
    trace_id: str,
) -> hook_pb.MqEvent:
    """The event about one message for one recipient (OFFLINE_MESSAGE, MESSAGE_SENT...)."""
    return signed_event(
        tenant_id=tenant_id,
        event_type=event_type,
        secret=secret,
        node_id=node_id,
        trace_id=trace_id,
        msg_id=req.msg_id,
        user_id=req.user_id,
        device_id=req.device_id,
        to_user_id=to_user_id,
        group_id=req.group_id,
        event_data=req.SerializeToString(),
    )
