import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATE_UNSPECIFIED: _ClassVar[KeyState]
    KEY_STATE_ACTIVE: _ClassVar[KeyState]
    KEY_STATE_GRACE: _ClassVar[KeyState]
    KEY_STATE_DISABLED: _ClassVar[KeyState]

class AuditAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_ACTION_UNSPECIFIED: _ClassVar[AuditAction]
    AUDIT_ACTION_ISSUE_CREDENTIAL: _ClassVar[AuditAction]
    AUDIT_ACTION_CREATE_KEY: _ClassVar[AuditAction]
    AUDIT_ACTION_ROTATE_KEY: _ClassVar[AuditAction]
    AUDIT_ACTION_DISABLE_KEY: _ClassVar[AuditAction]
    AUDIT_ACTION_REWRAP: _ClassVar[AuditAction]
    AUDIT_ACTION_LEASE_USED: _ClassVar[AuditAction]
    AUDIT_ACTION_LEASE_RETURNED: _ClassVar[AuditAction]

class LeaseEnd(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_END_UNSPECIFIED: _ClassVar[LeaseEnd]
    LEASE_END_USED: _ClassVar[LeaseEnd]
    LEASE_END_RETURNED: _ClassVar[LeaseEnd]

class AuditOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AUDIT_OUTCOME_UNSPECIFIED: _ClassVar[AuditOutcome]
    AUDIT_OUTCOME_ALLOWED: _ClassVar[AuditOutcome]
    AUDIT_OUTCOME_DENIED: _ClassVar[AuditOutcome]
KEY_STATE_UNSPECIFIED: KeyState
KEY_STATE_ACTIVE: KeyState
KEY_STATE_GRACE: KeyState
KEY_STATE_DISABLED: KeyState
AUDIT_ACTION_UNSPECIFIED: AuditAction
AUDIT_ACTION_ISSUE_CREDENTIAL: AuditAction
AUDIT_ACTION_CREATE_KEY: AuditAction
AUDIT_ACTION_ROTATE_KEY: AuditAction
AUDIT_ACTION_DISABLE_KEY: AuditAction
AUDIT_ACTION_REWRAP: AuditAction
AUDIT_ACTION_LEASE_USED: AuditAction
AUDIT_ACTION_LEASE_RETURNED: AuditAction
LEASE_END_UNSPECIFIED: LeaseEnd
LEASE_END_USED: LeaseEnd
LEASE_END_RETURNED: LeaseEnd
AUDIT_OUTCOME_UNSPECIFIED: AuditOutcome
AUDIT_OUTCOME_ALLOWED: AuditOutcome
AUDIT_OUTCOME_DENIED: AuditOutcome

class KeyVersion(_message.Message):
    __slots__ = ("version", "state", "create_time", "grace_end_time", "fingerprint")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    GRACE_END_TIME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    version: int
    state: KeyState
    create_time: _timestamp_pb2.Timestamp
    grace_end_time: _timestamp_pb2.Timestamp
    fingerprint: str
    def __init__(self, version: _Optional[int] = ..., state: _Optional[_Union[KeyState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., grace_end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class ProviderKey(_message.Message):
    __slots__ = ("name", "provider", "base_url", "allowed_teams", "all_teams", "labels", "rotation_period", "state", "current_version", "versions", "rotation_due", "create_time")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TEAMS_FIELD_NUMBER: _ClassVar[int]
    ALL_TEAMS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_DUE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    name: str
    provider: str
    base_url: str
    allowed_teams: _containers.RepeatedScalarFieldContainer[str]
    all_teams: bool
    labels: _containers.ScalarMap[str, str]
    rotation_period: _duration_pb2.Duration
    state: KeyState
    current_version: int
    versions: _containers.RepeatedCompositeFieldContainer[KeyVersion]
    rotation_due: bool
    create_time: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., provider: _Optional[str] = ..., base_url: _Optional[str] = ..., allowed_teams: _Optional[_Iterable[str]] = ..., all_teams: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., rotation_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., state: _Optional[_Union[KeyState, str]] = ..., current_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[KeyVersion, _Mapping]]] = ..., rotation_due: _Optional[bool] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class IssueCredentialRequest(_message.Message):
    __slots__ = ("provider", "team", "model", "request_id", "ttl")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    provider: str
    team: str
    model: str
    request_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, provider: _Optional[str] = ..., team: _Optional[str] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class IssueCredentialResponse(_message.Message):
    __slots__ = ("lease_id", "key_name", "key_version", "secret", "base_url", "expire_time")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    key_name: str
    key_version: int
    secret: str
    base_url: str
    expire_time: _timestamp_pb2.Timestamp
    def __init__(self, lease_id: _Optional[str] = ..., key_name: _Optional[str] = ..., key_version: _Optional[int] = ..., secret: _Optional[str] = ..., base_url: _Optional[str] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EndLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "end", "reason", "request_id", "provider", "team", "model", "key_name", "key_version")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    end: LeaseEnd
    reason: str
    request_id: str
    provider: str
    team: str
    model: str
    key_name: str
    key_version: int
    def __init__(self, lease_id: _Optional[str] = ..., end: _Optional[_Union[LeaseEnd, str]] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ..., provider: _Optional[str] = ..., team: _Optional[str] = ..., model: _Optional[str] = ..., key_name: _Optional[str] = ..., key_version: _Optional[int] = ...) -> None: ...

class EndLeaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndLeaseBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EndLeaseRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[EndLeaseRequest, _Mapping]]] = ...) -> None: ...

class EndLeaseBatchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateProviderKeyRequest(_message.Message):
    __slots__ = ("request_id", "name", "provider", "secret", "base_url", "allowed_teams", "all_teams", "labels", "rotation_period")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_TEAMS_FIELD_NUMBER: _ClassVar[int]
    ALL_TEAMS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ROTATION_PERIOD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    name: str
    provider: str
    secret: str
    base_url: str
    allowed_teams: _containers.RepeatedScalarFieldContainer[str]
    all_teams: bool
    labels: _containers.ScalarMap[str, str]
    rotation_period: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., name: _Optional[str] = ..., provider: _Optional[str] = ..., secret: _Optional[str] = ..., base_url: _Optional[str] = ..., allowed_teams: _Optional[_Iterable[str]] = ..., all_teams: _Optional[bool] = ..., labels: _Optional[_Mapping[str, str]] = ..., rotation_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RotateProviderKeyRequest(_message.Message):
    __slots__ = ("request_id", "name", "secret", "grace_period")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    GRACE_PERIOD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    name: str
    secret: str
    grace_period: _duration_pb2.Duration
    def __init__(self, request_id: _Optional[str] = ..., name: _Optional[str] = ..., secret: _Optional[str] = ..., grace_period: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class DisableProviderKeyRequest(_message.Message):
    __slots__ = ("request_id", "name")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    name: str
    def __init__(self, request_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ListProviderKeysRequest(_message.Message):
    __slots__ = ("provider", "page_size", "page_token")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    provider: str
    page_size: int
    page_token: str
    def __init__(self, provider: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListProviderKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ProviderKey]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[ProviderKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("sequence", "create_time", "actor", "action", "outcome", "reason", "provider", "key_name", "key_version", "team", "model", "request_id", "lease_id_hmac", "prev_hash", "hash")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_HMAC_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    create_time: _timestamp_pb2.Timestamp
    actor: str
    action: AuditAction
    outcome: AuditOutcome
    reason: str
    provider: str
    key_name: str
    key_version: int
    team: str
    model: str
    request_id: str
    lease_id_hmac: str
    prev_hash: str
    hash: str
    def __init__(self, sequence: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., action: _Optional[_Union[AuditAction, str]] = ..., outcome: _Optional[_Union[AuditOutcome, str]] = ..., reason: _Optional[str] = ..., provider: _Optional[str] = ..., key_name: _Optional[str] = ..., key_version: _Optional[int] = ..., team: _Optional[str] = ..., model: _Optional[str] = ..., request_id: _Optional[str] = ..., lease_id_hmac: _Optional[str] = ..., prev_hash: _Optional[str] = ..., hash: _Optional[str] = ...) -> None: ...

class ListAuditEventsRequest(_message.Message):
    __slots__ = ("action", "outcome", "key_name", "team", "request_id", "start_time", "end_time", "page_size", "page_token")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    action: AuditAction
    outcome: AuditOutcome
    key_name: str
    team: str
    request_id: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, action: _Optional[_Union[AuditAction, str]] = ..., outcome: _Optional[_Union[AuditOutcome, str]] = ..., key_name: _Optional[str] = ..., team: _Optional[str] = ..., request_id: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListAuditEventsResponse(_message.Message):
    __slots__ = ("events", "next_page_token")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[AuditEvent]
    next_page_token: str
    def __init__(self, events: _Optional[_Iterable[_Union[AuditEvent, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class VerifyAuditLogRequest(_message.Message):
    __slots__ = ("anchor_sequence", "anchor_hash")
    ANCHOR_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ANCHOR_HASH_FIELD_NUMBER: _ClassVar[int]
    anchor_sequence: int
    anchor_hash: str
    def __init__(self, anchor_sequence: _Optional[int] = ..., anchor_hash: _Optional[str] = ...) -> None: ...

class VerifyAuditLogResponse(_message.Message):
    __slots__ = ("ok", "records_checked", "first_bad_sequence", "reason", "head_sequence", "head_hash")
    OK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    FIRST_BAD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HEAD_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    HEAD_HASH_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    records_checked: int
    first_bad_sequence: int
    reason: str
    head_sequence: int
    head_hash: str
    def __init__(self, ok: _Optional[bool] = ..., records_checked: _Optional[int] = ..., first_bad_sequence: _Optional[int] = ..., reason: _Optional[str] = ..., head_sequence: _Optional[int] = ..., head_hash: _Optional[str] = ...) -> None: ...
