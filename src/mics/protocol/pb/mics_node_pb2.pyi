from mics.protocol.pb import mics_message_pb2 as _mics_message_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ForwardAck(_message.Message):
    __slots__ = ("ok", "reason", "missing_user_ids")
    OK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MISSING_USER_IDS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    reason: str
    missing_user_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ok: _Optional[bool] = ..., reason: _Optional[str] = ..., missing_user_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ForwardSingleRequest(_message.Message):
    __slots__ = ("tenant_id", "to_user_id", "message")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TO_USER_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    to_user_id: str
    message: _mics_message_pb2.MessageRequest
    def __init__(self, tenant_id: _Optional[str] = ..., to_user_id: _Optional[str] = ..., message: _Optional[_Union[_mics_message_pb2.MessageRequest, _Mapping]] = ...) -> None: ...

class ForwardBatchRequest(_message.Message):
    __slots__ = ("tenant_id", "to_user_ids", "message")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TO_USER_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    to_user_ids: _containers.RepeatedScalarFieldContainer[str]
    message: _mics_message_pb2.MessageRequest
    def __init__(self, tenant_id: _Optional[str] = ..., to_user_ids: _Optional[_Iterable[str]] = ..., message: _Optional[_Union[_mics_message_pb2.MessageRequest, _Mapping]] = ...) -> None: ...

class ForwardItem(_message.Message):
    __slots__ = ("tenant_id", "to_user_ids", "message")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TO_USER_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    to_user_ids: _containers.RepeatedScalarFieldContainer[str]
    message: _mics_message_pb2.MessageRequest
    def __init__(self, tenant_id: _Optional[str] = ..., to_user_ids: _Optional[_Iterable[str]] = ..., message: _Optional[_Union[_mics_message_pb2.MessageRequest, _Mapping]] = ...) -> None: ...

class ForwardManyRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ForwardItem]
    def __init__(self, items: _Optional[_Iterable[_Union[ForwardItem, _Mapping]]] = ...) -> None: ...

class ForwardManyResponse(_message.Message):
    __slots__ = ("acks",)
    ACKS_FIELD_NUMBER: _ClassVar[int]
    acks: _containers.RepeatedCompositeFieldContainer[ForwardAck]
    def __init__(self, acks: _Optional[_Iterable[_Union[ForwardAck, _Mapping]]] = ...) -> None: ...

class BufferOfflineRequest(_message.Message):
    __slots__ = ("tenant_id", "to_user_id", "server_frame", "ttl_seconds")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    TO_USER_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_FRAME_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    to_user_id: str
    server_frame: bytes
    ttl_seconds: int
    def __init__(self, tenant_id: _Optional[str] = ..., to_user_id: _Optional[str] = ..., server_frame: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class DrainOfflineRequest(_message.Message):
    __slots__ = ("tenant_id", "user_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    user_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ...) -> None: ...

class DrainOfflineResponse(_message.Message):
    __slots__ = ("server_frames",)
    SERVER_FRAMES_FIELD_NUMBER: _ClassVar[int]
    server_frames: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, server_frames: _Optional[_Iterable[bytes]] = ...) -> None: ...

class PullOfflineRequest(_message.Message):
    __slots__ = ("tenant_id", "user_id", "trace_id")
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    USER_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    tenant_id: str
    user_id: str
    trace_id: str
    def __init__(self, tenant_id: _Optional[str] = ..., user_id: _Optional[str] = ..., trace_id: _Optional[str] = ...) -> None: ...

class PullOfflineResponse(_message.Message):
    __slots__ = ("connections",)
    CONNECTIONS_FIELD_NUMBER: _ClassVar[int]
    connections: int
    def __init__(self, connections: _Optional[int] = ...) -> None: ...
