from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SINGLE_CHAT: _ClassVar[MessageType]
    GROUP_CHAT: _ClassVar[MessageType]

class AckStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SENT: _ClassVar[AckStatus]
    FAILED: _ClassVar[AckStatus]
SINGLE_CHAT: MessageType
GROUP_CHAT: MessageType
SENT: AckStatus
FAILED: AckStatus

class MessageRequest(_message.Message):
    __slots__ = ("tenant_id", "user_id", "device_id", "msg_id", "msg_type", "to_user_id", "group_id", "msg_body", "timestamp_ms")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    MSG_TYPE_FIELD_NUMBER: _ClassVar[int]
    TO_USER_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    MSG_BODY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    user_id: str
    device_id: str
    msg_id: str
    msg_type: MessageType
    to_user_id: str
    group_id: str
    msg_body: bytes
    timestamp_ms: int
    def __init__(self, tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ..., device_id: _Optional[str] = ..., msg_id: _Optional[str] = ..., msg_type: _Optional[_Union[MessageType, str]] = ..., to_user_id: _Optional[str] = ..., group_id: _Optional[str] = ..., msg_body: _Optional[bytes] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class MessageAck(_message.Message):
    __slots__ = ("msg_id", "status", "timestamp_ms", "reason", "partial_delivery", "offline_notified_users", "offline_buffered_users", "offline_skipped_users")
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_DELIVERY_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_NOTIFIED_USERS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_BUFFERED_USERS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_SKIPPED_USERS_FIELD_NUMBER: _ClassVar[int]
    msg_id: str
    status: AckStatus
    timestamp_ms: int
    reason: str
    partial_delivery: bool
    offline_notified_users: int
    offline_buffered_users: int
    offline_skipped_users: int
    def __init__(self, msg_id: _Optional[str] = ..., status: _Optional[_Union[AckStatus, str]] = ..., timestamp_ms: _Optional[int] = ..., reason: _Optional[str] = ..., partial_delivery: _Optional[bool] = ..., offline_notified_users: _Optional[int] = ..., offline_buffered_users: _Optional[int] = ..., offline_skipped_users: _Optional[int] = ...) -> None: ...

class ConnectAck(_message.Message):
    __slots__ = ("code", "tenant_id", "user_id", "device_id", "node_id", "trace_id", "protocol_version")
    CODE_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    code: int
    tenant_id: str
    user_id: str
    device_id: str
    node_id: str
    trace_id: str
    protocol_version: str
    def __init__(self, code: _Optional[int] = ..., tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ..., device_id: _Optional[str] = ..., node_id: _Optional[str] = ..., trace_id: _Optional[str] = ..., protocol_version: _Optional[str] = ...) -> None: ...

class MessageDelivery(_message.Message):
    __slots__ = ("message", "offline_cursor")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_CURSOR_FIELD_NUMBER: _ClassVar[int]
    message: MessageRequest
    offline_cursor: str
    def __init__(self, message: _Optional[_Union[MessageRequest, _Mapping]] = ..., offline_cursor: _Optional[str] = ...) -> None: ...

class ServerError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class HeartbeatPing(_message.Message):
    __slots__ = ("timestamp_ms",)
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    timestamp_ms: int
    def __init__(self, timestamp_ms: _Optional[int] = ...) -> None: ...

class HeartbeatPong(_message.Message):
    __slots__ = ("timestamp_ms",)
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    timestamp_ms: int
    def __init__(self, timestamp_ms: _Optional[int] = ...) -> None: ...

class DeliveryAck(_message.Message):
    __slots__ = ("msg_ids", "offline_cursor")
    MSG_IDS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_CURSOR_FIELD_NUMBER: _ClassVar[int]
    msg_ids: _containers.RepeatedScalarFieldContainer[str]
    offline_cursor: str
    def __init__(self, msg_ids: _Optional[_Iterable[str]] = ..., offline_cursor: _Optional[str] = ...) -> None: ...

class OfflineSync(_message.Message):
    __slots__ = ("delivered", "complete", "reason")
    DELIVERED_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    delivered: int
    complete: bool
    reason: str
    def __init__(self, delivered: _Optional[int] = ..., complete: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class ClientFrame(_message.Message):
    __slots__ = ("message", "heartbeat_ping", "delivery_ack")
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_PING_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_ACK_FIELD_NUMBER: _ClassVar[int]
    message: MessageRequest
    heartbeat_ping: HeartbeatPing
    delivery_ack: DeliveryAck
    def __init__(self, message: _Optional[_Union[MessageRequest, _Mapping]] = ..., heartbeat_ping: _Optional[_Union[HeartbeatPing, _Mapping]] = ..., delivery_ack: _Optional[_Union[DeliveryAck, _Mapping]] = ...) -> None: ...

class ServerFrame(_message.Message):
    __slots__ = ("connect_ack", "delivery", "ack", "error", "heartbeat_pong", "offline_sync")
    CONNECT_ACK_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_PONG_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_SYNC_FIELD_NUMBER: _ClassVar[int]
    connect_ack: ConnectAck
    delivery: MessageDelivery
    ack: MessageAck
    error: ServerError
    heartbeat_pong: HeartbeatPong
    offline_sync: OfflineSync
    def __init__(self, connect_ack: _Optional[_Union[ConnectAck, _Mapping]] = ..., delivery: _Optional[_Union[MessageDelivery, _Mapping]] = ..., ack: _Optional[_Union[MessageAck, _Mapping]] = ..., error: _Optional[_Union[ServerError, _Mapping]] = ..., heartbeat_pong: _Optional[_Union[HeartbeatPong, _Mapping]] = ..., offline_sync: _Optional[_Union[OfflineSync, _Mapping]] = ...) -> None: ...
