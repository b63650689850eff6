from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("version", "model_name", "bundle_path", "bundle_sha256", "policy", "backend", "ready", "uptime_seconds", "bundle_loaded_at", "requests", "flagged", "reloads", "workers")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    RELOADS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    version: str
    model_name: str
    bundle_path: str
    bundle_sha256: str
    policy: str
    backend: str
    ready: bool
    uptime_seconds: float
    bundle_loaded_at: float
    requests: int
    flagged: int
    reloads: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    def __init__(self, version: _Optional[str] = ..., model_name: _Optional[str] = ..., bundle_path: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., policy: _Optional[str] = ..., backend: _Optional[str] = ..., ready: bool = ..., uptime_seconds: _Optional[float] = ..., bundle_loaded_at: _Optional[float] = ..., requests: _Optional[int] = ..., flagged: _Optional[int] = ..., reloads: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("index", "pid", "ready", "bundle_sha256", "requests", "flagged", "restarts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    pid: int
    ready: bool
    bundle_sha256: str
    requests: int
    flagged: int
    restarts: int
    def __init__(self, index: _Optional[int] = ..., pid: _Optional[int] = ..., ready: bool = ..., bundle_sha256: _Optional[str] = ..., requests: _Optional[int] = ..., flagged: _Optional[int] = ..., restarts: _Optional[int] = ...) -> None: ...

class ReloadBundleRequest(_message.Message):
    __slots__ = ("bundle_path",)
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    def __init__(self, bundle_path: _Optional[str] = ...) -> None: ...

class ReloadBundleResponse(_message.Message):
    __slots__ = ("bundle_path", "bundle_sha256", "previous_sha256")
    BUNDLE_PATH_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_SHA256_FIELD_NUMBER: _ClassVar[int]
    bundle_path: str
    bundle_sha256: str
    previous_sha256: str
    def __init__(self, bundle_path: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., previous_sha256: _Optional[str] = ...) -> None: ...
