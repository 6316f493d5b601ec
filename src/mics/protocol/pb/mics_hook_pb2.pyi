from mics.protocol.pb import mics_message_pb2 as _mics_message_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONNECT_ONLINE: _ClassVar[EventType]
    CONNECT_OFFLINE: _ClassVar[EventType]
    SINGLE_CHAT_MSG: _ClassVar[EventType]
    GROUP_CHAT_MSG: _ClassVar[EventType]
    OFFLINE_MESSAGE: _ClassVar[EventType]
CONNECT_ONLINE: EventType
CONNECT_OFFLINE: EventType
SINGLE_CHAT_MSG: EventType
GROUP_CHAT_MSG: EventType
OFFLINE_MESSAGE: EventType

class HookMeta(_message.Message):
    __slots__ = ("tenant_id", "request_id", "timestamp_ms", "sign", "trace_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    request_id: str
    timestamp_ms: int
    sign: str
    trace_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., request_id: _Optional[str] = ..., timestamp_ms: _Optional[int] = ..., sign: _Optional[str] = ..., trace_id: _Optional[str] = ...) -> None: ...

class TenantRuntimeConfig(_message.Message):
    __slots__ = ("hook_base_url", "heartbeat_timeout_seconds", "offline_buffer_ttl_seconds", "tenant_max_connections", "user_max_connections", "tenant_max_message_qps", "tenant_secret", "hook_max_concurrency", "hook_queue_timeout_ms", "hook_breaker_failure_threshold", "hook_breaker_open_ms", "hook_sign_required", "offline_use_hook_pull", "offline_mode", "check_message_fail_closed")
    HOOK_BASE_URL_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_BUFFER_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TENANT_MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    USER_MAX_CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    TENANT_MAX_MESSAGE_QPS_FIELD_NUMBER: _ClassVar[int]
    TENANT_SECRET_FIELD_NUMBER: _ClassVar[int]
    HOOK_MAX_CONCURRENCY_FIELD_NUMBER: _ClassVar[int]
    HOOK_QUEUE_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    HOOK_BREAKER_FAILURE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    HOOK_BREAKER_OPEN_MS_FIELD_NUMBER: _ClassVar[int]
    HOOK_SIGN_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_USE_HOOK_PULL_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_MODE_FIELD_NUMBER: _ClassVar[int]
    CHECK_MESSAGE_FAIL_CLOSED_FIELD_NUMBER: _ClassVar[int]
    hook_base_url: str
    heartbeat_timeout_seconds: int
    offline_buffer_ttl_seconds: int
    tenant_max_connections: int
    user_max_connections: int
    tenant_max_message_qps: int
    tenant_secret: str
    hook_max_concurrency: int
    hook_queue_timeout_ms: int
    hook_breaker_failure_threshold: int
    hook_breaker_open_ms: int
    hook_sign_required: bool
    offline_use_hook_pull: bool
    offline_mode: str
    check_message_fail_closed: bool
    def __init__(self, hook_base_url: _Optional[str] = ..., heartbeat_timeout_seconds: _Optional[int] = ..., offline_buffer_ttl_seconds: _Optional[int] = ..., tenant_max_connections: _Optional[int] = ..., user_max_connections: _Optional[int] = ..., tenant_max_message_qps: _Optional[int] = ..., tenant_secret: _Optional[str] = ..., hook_max_concurrency: _Optional[int] = ..., hook_queue_timeout_ms: _Optional[int] = ..., hook_breaker_failure_threshold: _Optional[int] = ..., hook_breaker_open_ms: _Optional[int] = ..., hook_sign_required: _Optional[bool] = ..., offline_use_hook_pull: _Optional[bool] = ..., offline_mode: _Optional[str] = ..., check_message_fail_closed: _Optional[bool] = ...) -> None: ...

class AuthRequest(_message.Message):
    __slots__ = ("meta", "token", "device_id")
    META_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    token: str
    device_id: str
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., token: _Optional[str] = ..., device_id: _Optional[str] = ...) -> None: ...

class AuthResponse(_message.Message):
    __slots__ = ("meta", "ok", "user_id", "device_id", "config", "reason")
    META_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    ok: bool
    user_id: str
    device_id: str
    config: TenantRuntimeConfig
    reason: str
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., ok: _Optional[bool] = ..., user_id: _Optional[str] = ..., device_id: _Optional[str] = ..., config: _Optional[_Union[TenantRuntimeConfig, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class CheckMessageRequest(_message.Message):
    __slots__ = ("meta", "message")
    META_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    message: _mics_message_pb2.MessageRequest
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., message: _Optional[_Union[_mics_message_pb2.MessageRequest, _Mapping]] = ...) -> None: ...

class CheckMessageResponse(_message.Message):
    __slots__ = ("meta", "allow", "reason")
    META_FIELD_NUMBER: _ClassVar[int]
    ALLOW_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    allow: bool
    reason: str
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., allow: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class GetGroupMembersRequest(_message.Message):
    __slots__ = ("meta", "group_id")
    META_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    group_id: str
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., group_id: _Optional[str] = ...) -> None: ...

class GetGroupMembersResponse(_message.Message):
    __slots__ = ("meta", "user_ids")
    META_FIELD_NUMBER: _ClassVar[int]
    USER_IDS_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    user_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., user_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetOfflineMessagesRequest(_message.Message):
    __slots__ = ("meta", "user_id", "device_id", "max_messages", "cursor", "ack_follows")
    META_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    ACK_FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    user_id: str
    device_id: str
    max_messages: int
    cursor: str
    ack_follows: bool
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., user_id: _Optional[str] = ..., device_id: _Optional[str] = ..., max_messages: _Optional[int] = ..., cursor: _Optional[str] = ..., ack_follows: _Optional[bool] = ...) -> None: ...

class GetOfflineMessagesResponse(_message.Message):
    __slots__ = ("meta", "ok", "messages", "reason", "next_cursor", "has_more")
    META_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NEXT_CURSOR_FIELD_NUMBER: _ClassVar[int]
    HAS_MORE_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    ok: bool
    messages: _containers.RepeatedCompositeFieldContainer[_mics_message_pb2.MessageRequest]
    reason: str
    next_cursor: str
    has_more: bool
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., ok: _Optional[bool] = ..., messages: _Optional[_Iterable[_Union[_mics_message_pb2.MessageRequest, _Mapping]]] = ..., reason: _Optional[str] = ..., next_cursor: _Optional[str] = ..., has_more: _Optional[bool] = ...) -> None: ...

class MqEvent(_message.Message):
    __slots__ = ("tenant_id", "event_type", "msg_id", "user_id", "device_id", "to_user_id", "group_id", "event_data", "timestamp", "node_id", "sign", "trace_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    MSG_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    TO_USER_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_DATA_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    event_type: EventType
    msg_id: str
    user_id: str
    device_id: str
    to_user_id: str
    group_id: str
    event_data: bytes
    timestamp: int
    node_id: str
    sign: str
    trace_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., event_type: _Optional[_Union[EventType, str]] = ..., msg_id: _Optional[str] = ..., user_id: _Optional[str] = ..., device_id: _Optional[str] = ..., to_user_id: _Optional[str] = ..., group_id: _Optional[str] = ..., event_data: _Optional[bytes] = ..., timestamp: _Optional[int] = ..., node_id: _Optional[str] = ..., sign: _Optional[str] = ..., trace_id: _Optional[str] = ...) -> None: ...

class AckOfflineMessagesRequest(_message.Message):
    __slots__ = ("meta", "user_id", "device_id", "cursor")
    META_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    user_id: str
    device_id: str
    cursor: str
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., user_id: _Optional[str] = ..., device_id: _Optional[str] = ..., cursor: _Optional[str] = ...) -> None: ...

class AckOfflineMessagesResponse(_message.Message):
    __slots__ = ("meta", "ok", "reason")
    META_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    ok: bool
    reason: str
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., ok: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class OfflineAvailableRequest(_message.Message):
    __slots__ = ("meta", "user_id")
    META_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    meta: HookMeta
    user_id: str
    def __init__(self, meta: _Optional[_Union[HookMeta, _Mapping]] = ..., user_id: _Optional[str] = ...) -> None: ...

class OfflineAvailableResponse(_message.Message):
    __slots__ = ("ok", "reason", "connections")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    connections: int
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., connections: _Optional[int] = ...) -> None: ...
