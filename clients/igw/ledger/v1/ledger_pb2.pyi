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

class BudgetWindow(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_WINDOW_UNSPECIFIED: _ClassVar[BudgetWindow]
    BUDGET_WINDOW_DAILY: _ClassVar[BudgetWindow]
    BUDGET_WINDOW_WEEKLY: _ClassVar[BudgetWindow]
    BUDGET_WINDOW_MONTHLY: _ClassVar[BudgetWindow]
    BUDGET_WINDOW_TOTAL: _ClassVar[BudgetWindow]

class CallOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CALL_OUTCOME_UNSPECIFIED: _ClassVar[CallOutcome]
    CALL_OUTCOME_SUCCESS: _ClassVar[CallOutcome]
    CALL_OUTCOME_CANCELLED: _ClassVar[CallOutcome]
    CALL_OUTCOME_PROVIDER_ERROR: _ClassVar[CallOutcome]

class SpendFlag(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPEND_FLAG_UNSPECIFIED: _ClassVar[SpendFlag]
    SPEND_FLAG_OVER_HOLD: _ClassVar[SpendFlag]
    SPEND_FLAG_UNSETTLED_CAPTURE: _ClassVar[SpendFlag]
    SPEND_FLAG_USAGE_ESTIMATED: _ClassVar[SpendFlag]

class SpendGroupBy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SPEND_GROUP_BY_UNSPECIFIED: _ClassVar[SpendGroupBy]
    SPEND_GROUP_BY_TEAM: _ClassVar[SpendGroupBy]
    SPEND_GROUP_BY_AGENT: _ClassVar[SpendGroupBy]
    SPEND_GROUP_BY_MODEL: _ClassVar[SpendGroupBy]
    SPEND_GROUP_BY_PROVIDER: _ClassVar[SpendGroupBy]
    SPEND_GROUP_BY_DAY: _ClassVar[SpendGroupBy]
    SPEND_GROUP_BY_RUN: _ClassVar[SpendGroupBy]
BUDGET_WINDOW_UNSPECIFIED: BudgetWindow
BUDGET_WINDOW_DAILY: BudgetWindow
BUDGET_WINDOW_WEEKLY: BudgetWindow
BUDGET_WINDOW_MONTHLY: BudgetWindow
BUDGET_WINDOW_TOTAL: BudgetWindow
CALL_OUTCOME_UNSPECIFIED: CallOutcome
CALL_OUTCOME_SUCCESS: CallOutcome
CALL_OUTCOME_CANCELLED: CallOutcome
CALL_OUTCOME_PROVIDER_ERROR: CallOutcome
SPEND_FLAG_UNSPECIFIED: SpendFlag
SPEND_FLAG_OVER_HOLD: SpendFlag
SPEND_FLAG_UNSETTLED_CAPTURE: SpendFlag
SPEND_FLAG_USAGE_ESTIMATED: SpendFlag
SPEND_GROUP_BY_UNSPECIFIED: SpendGroupBy
SPEND_GROUP_BY_TEAM: SpendGroupBy
SPEND_GROUP_BY_AGENT: SpendGroupBy
SPEND_GROUP_BY_MODEL: SpendGroupBy
SPEND_GROUP_BY_PROVIDER: SpendGroupBy
SPEND_GROUP_BY_DAY: SpendGroupBy
SPEND_GROUP_BY_RUN: SpendGroupBy

class TokenUsage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "cached_input_tokens")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ...) -> None: ...

class BudgetStatus(_message.Message):
    __slots__ = ("team", "agent", "window", "limit_nanos", "soft_limit_nanos", "spent_nanos", "held_nanos", "remaining_nanos", "window_start", "window_end", "run")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LIMIT_NANOS_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_NANOS_FIELD_NUMBER: _ClassVar[int]
    SPENT_NANOS_FIELD_NUMBER: _ClassVar[int]
    HELD_NANOS_FIELD_NUMBER: _ClassVar[int]
    REMAINING_NANOS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_START_FIELD_NUMBER: _ClassVar[int]
    WINDOW_END_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    team: str
    agent: str
    window: BudgetWindow
    limit_nanos: int
    soft_limit_nanos: int
    spent_nanos: int
    held_nanos: int
    remaining_nanos: int
    window_start: _timestamp_pb2.Timestamp
    window_end: _timestamp_pb2.Timestamp
    run: str
    def __init__(self, team: _Optional[str] = ..., agent: _Optional[str] = ..., window: _Optional[_Union[BudgetWindow, str]] = ..., limit_nanos: _Optional[int] = ..., soft_limit_nanos: _Optional[int] = ..., spent_nanos: _Optional[int] = ..., held_nanos: _Optional[int] = ..., remaining_nanos: _Optional[int] = ..., window_start: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., window_end: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run: _Optional[str] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("team", "agent", "window", "limit_nanos", "soft_limit_nanos", "update_time", "run")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LIMIT_NANOS_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_NANOS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    team: str
    agent: str
    window: BudgetWindow
    limit_nanos: int
    soft_limit_nanos: int
    update_time: _timestamp_pb2.Timestamp
    run: str
    def __init__(self, team: _Optional[str] = ..., agent: _Optional[str] = ..., window: _Optional[_Union[BudgetWindow, str]] = ..., limit_nanos: _Optional[int] = ..., soft_limit_nanos: _Optional[int] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "attempt", "team", "agent", "model", "prompt_tokens_upper_bound", "max_output_tokens", "hold_ttl", "provider", "run_id", "run_cap_nanos")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_UPPER_BOUND_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    HOLD_TTL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_CAP_NANOS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    attempt: int
    team: str
    agent: str
    model: str
    prompt_tokens_upper_bound: int
    max_output_tokens: int
    hold_ttl: _duration_pb2.Duration
    provider: str
    run_id: str
    run_cap_nanos: int
    def __init__(self, request_id: _Optional[str] = ..., attempt: _Optional[int] = ..., team: _Optional[str] = ..., agent: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens_upper_bound: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., hold_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., provider: _Optional[str] = ..., run_id: _Optional[str] = ..., run_cap_nanos: _Optional[int] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "held_nanos", "price_version", "expire_time", "budgets")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_NANOS_FIELD_NUMBER: _ClassVar[int]
    PRICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    held_nanos: int
    price_version: int
    expire_time: _timestamp_pb2.Timestamp
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    def __init__(self, reservation_id: _Optional[str] = ..., held_nanos: _Optional[int] = ..., price_version: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ...) -> None: ...

class SettleRequest(_message.Message):
    __slots__ = ("request_id", "reservation_id", "usage", "provider", "provider_model", "outcome", "latency", "usage_estimated")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    USAGE_ESTIMATED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reservation_id: str
    usage: TokenUsage
    provider: str
    provider_model: str
    outcome: CallOutcome
    latency: _duration_pb2.Duration
    usage_estimated: bool
    def __init__(self, request_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ..., provider: _Optional[str] = ..., provider_model: _Optional[str] = ..., outcome: _Optional[_Union[CallOutcome, str]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., usage_estimated: _Optional[bool] = ...) -> None: ...

class SpendEntry(_message.Message):
    __slots__ = ("request_id", "team", "agent", "model", "provider", "provider_model", "usage", "cost_nanos", "held_nanos", "price_version", "outcome", "flags", "create_time", "reserve_time", "latency", "run_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_MODEL_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    HELD_NANOS_FIELD_NUMBER: _ClassVar[int]
    PRICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    RESERVE_TIME_FIELD_NUMBER: _ClassVar[int]
    LATENCY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    team: str
    agent: str
    model: str
    provider: str
    provider_model: str
    usage: TokenUsage
    cost_nanos: int
    held_nanos: int
    price_version: int
    outcome: CallOutcome
    flags: _containers.RepeatedScalarFieldContainer[SpendFlag]
    create_time: _timestamp_pb2.Timestamp
    reserve_time: _timestamp_pb2.Timestamp
    latency: _duration_pb2.Duration
    run_id: str
    def __init__(self, request_id: _Optional[str] = ..., team: _Optional[str] = ..., agent: _Optional[str] = ..., model: _Optional[str] = ..., provider: _Optional[str] = ..., provider_model: _Optional[str] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ..., cost_nanos: _Optional[int] = ..., held_nanos: _Optional[int] = ..., price_version: _Optional[int] = ..., outcome: _Optional[_Union[CallOutcome, str]] = ..., flags: _Optional[_Iterable[_Union[SpendFlag, str]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reserve_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., latency: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., run_id: _Optional[str] = ...) -> None: ...

class SettleResponse(_message.Message):
    __slots__ = ("entry", "replayed")
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    entry: SpendEntry
    replayed: bool
    def __init__(self, entry: _Optional[_Union[SpendEntry, _Mapping]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class SettleBatchRequest(_message.Message):
    __slots__ = ("settles", "codes_only")
    SETTLES_FIELD_NUMBER: _ClassVar[int]
    CODES_ONLY_FIELD_NUMBER: _ClassVar[int]
    settles: _containers.RepeatedCompositeFieldContainer[SettleRequest]
    codes_only: bool
    def __init__(self, settles: _Optional[_Iterable[_Union[SettleRequest, _Mapping]]] = ..., codes_only: _Optional[bool] = ...) -> None: ...

class SettleBatchResult(_message.Message):
    __slots__ = ("response", "code", "reason")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    response: SettleResponse
    code: int
    reason: str
    def __init__(self, response: _Optional[_Union[SettleResponse, _Mapping]] = ..., code: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class SettleBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SettleBatchResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SettleBatchResult, _Mapping]]] = ...) -> None: ...

class AcquireSliceRequest(_message.Message):
    __slots__ = ("slice_id", "team", "agent", "model", "prompt_tokens_upper_bound", "max_output_tokens", "calls", "hold_ttl", "provider")
    SLICE_ID_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_UPPER_BOUND_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    HOLD_TTL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    slice_id: str
    team: str
    agent: str
    model: str
    prompt_tokens_upper_bound: int
    max_output_tokens: int
    calls: int
    hold_ttl: _duration_pb2.Duration
    provider: str
    def __init__(self, slice_id: _Optional[str] = ..., team: _Optional[str] = ..., agent: _Optional[str] = ..., model: _Optional[str] = ..., prompt_tokens_upper_bound: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., calls: _Optional[int] = ..., hold_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., provider: _Optional[str] = ...) -> None: ...

class SliceDraw(_message.Message):
    __slots__ = ("reservation_id", "request_id", "held_nanos", "withdrawn")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_NANOS_FIELD_NUMBER: _ClassVar[int]
    WITHDRAWN_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    request_id: str
    held_nanos: int
    withdrawn: bool
    def __init__(self, reservation_id: _Optional[str] = ..., request_id: _Optional[str] = ..., held_nanos: _Optional[int] = ..., withdrawn: _Optional[bool] = ...) -> None: ...

class NoteSliceDrawsRequest(_message.Message):
    __slots__ = ("draws",)
    DRAWS_FIELD_NUMBER: _ClassVar[int]
    draws: _containers.RepeatedCompositeFieldContainer[SliceDraw]
    def __init__(self, draws: _Optional[_Iterable[_Union[SliceDraw, _Mapping]]] = ...) -> None: ...

class NoteSliceDrawResult(_message.Message):
    __slots__ = ("code", "reason", "over_limit")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OVER_LIMIT_FIELD_NUMBER: _ClassVar[int]
    code: int
    reason: str
    over_limit: bool
    def __init__(self, code: _Optional[int] = ..., reason: _Optional[str] = ..., over_limit: _Optional[bool] = ...) -> None: ...

class NoteSliceDrawsResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[NoteSliceDrawResult]
    def __init__(self, results: _Optional[_Iterable[_Union[NoteSliceDrawResult, _Mapping]]] = ...) -> None: ...

class AcquireSliceResponse(_message.Message):
    __slots__ = ("reservation_id", "held_nanos", "calls", "per_call_nanos", "price_version", "expire_time", "budgets")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    HELD_NANOS_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    PER_CALL_NANOS_FIELD_NUMBER: _ClassVar[int]
    PRICE_VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRE_TIME_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    held_nanos: int
    calls: int
    per_call_nanos: int
    price_version: int
    expire_time: _timestamp_pb2.Timestamp
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    def __init__(self, reservation_id: _Optional[str] = ..., held_nanos: _Optional[int] = ..., calls: _Optional[int] = ..., per_call_nanos: _Optional[int] = ..., price_version: _Optional[int] = ..., expire_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id", "reason", "request_id")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    reason: str
    request_id: str
    def __init__(self, reservation_id: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("team", "agent")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    team: str
    agent: str
    def __init__(self, team: _Optional[str] = ..., agent: _Optional[str] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budgets",)
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[BudgetStatus]
    def __init__(self, budgets: _Optional[_Iterable[_Union[BudgetStatus, _Mapping]]] = ...) -> None: ...

class SetBudgetRequest(_message.Message):
    __slots__ = ("team", "agent", "window", "limit_nanos", "soft_limit_nanos", "run")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    LIMIT_NANOS_FIELD_NUMBER: _ClassVar[int]
    SOFT_LIMIT_NANOS_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    team: str
    agent: str
    window: BudgetWindow
    limit_nanos: int
    soft_limit_nanos: int
    run: str
    def __init__(self, team: _Optional[str] = ..., agent: _Optional[str] = ..., window: _Optional[_Union[BudgetWindow, str]] = ..., limit_nanos: _Optional[int] = ..., soft_limit_nanos: _Optional[int] = ..., run: _Optional[str] = ...) -> None: ...

class ListBudgetsRequest(_message.Message):
    __slots__ = ("team", "page_size", "page_token", "include_runs")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_RUNS_FIELD_NUMBER: _ClassVar[int]
    team: str
    page_size: int
    page_token: str
    include_runs: bool
    def __init__(self, team: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_runs: _Optional[bool] = ...) -> None: ...

class ListBudgetsResponse(_message.Message):
    __slots__ = ("budgets", "next_page_token")
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[Budget]
    next_page_token: str
    def __init__(self, budgets: _Optional[_Iterable[_Union[Budget, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteBudgetRequest(_message.Message):
    __slots__ = ("team", "agent", "window", "run")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    team: str
    agent: str
    window: BudgetWindow
    run: str
    def __init__(self, team: _Optional[str] = ..., agent: _Optional[str] = ..., window: _Optional[_Union[BudgetWindow, str]] = ..., run: _Optional[str] = ...) -> None: ...

class DeleteBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class RateLimit(_message.Message):
    __slots__ = ("team", "agent", "requests_per_minute", "tokens_per_minute", "requests_used", "tokens_used", "update_time")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_USED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_USED_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    team: str
    agent: str
    requests_per_minute: int
    tokens_per_minute: int
    requests_used: int
    tokens_used: int
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, team: _Optional[str] = ..., agent: _Optional[str] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ..., requests_used: _Optional[int] = ..., tokens_used: _Optional[int] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetRateLimitRequest(_message.Message):
    __slots__ = ("team", "agent", "requests_per_minute", "tokens_per_minute")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    team: str
    agent: str
    requests_per_minute: int
    tokens_per_minute: int
    def __init__(self, team: _Optional[str] = ..., agent: _Optional[str] = ..., requests_per_minute: _Optional[int] = ..., tokens_per_minute: _Optional[int] = ...) -> None: ...

class GetRateLimitsRequest(_message.Message):
    __slots__ = ("team",)
    TEAM_FIELD_NUMBER: _ClassVar[int]
    team: str
    def __init__(self, team: _Optional[str] = ...) -> None: ...

class GetRateLimitsResponse(_message.Message):
    __slots__ = ("limits",)
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    limits: _containers.RepeatedCompositeFieldContainer[RateLimit]
    def __init__(self, limits: _Optional[_Iterable[_Union[RateLimit, _Mapping]]] = ...) -> None: ...

class MaintainPartitionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MaintainPartitionsResponse(_message.Message):
    __slots__ = ("created", "dropped", "partitions")
    CREATED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    created: _containers.RepeatedScalarFieldContainer[str]
    dropped: _containers.RepeatedScalarFieldContainer[str]
    partitions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, created: _Optional[_Iterable[str]] = ..., dropped: _Optional[_Iterable[str]] = ..., partitions: _Optional[_Iterable[str]] = ...) -> None: ...

class ListSpendRequest(_message.Message):
    __slots__ = ("start_time", "end_time", "group_by", "team", "page_size", "page_token", "run")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    TEAM_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    group_by: _containers.RepeatedScalarFieldContainer[SpendGroupBy]
    team: str
    page_size: int
    page_token: str
    run: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., group_by: _Optional[_Iterable[_Union[SpendGroupBy, str]]] = ..., team: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., run: _Optional[str] = ...) -> None: ...

class SpendTotal(_message.Message):
    __slots__ = ("team", "agent", "model", "provider", "day", "request_count", "usage", "cost_nanos", "run")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    DAY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_COUNT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    COST_NANOS_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    team: str
    agent: str
    model: str
    provider: str
    day: _timestamp_pb2.Timestamp
    request_count: int
    usage: TokenUsage
    cost_nanos: int
    run: str
    def __init__(self, team: _Optional[str] = ..., agent: _Optional[str] = ..., model: _Optional[str] = ..., provider: _Optional[str] = ..., day: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., request_count: _Optional[int] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ..., cost_nanos: _Optional[int] = ..., run: _Optional[str] = ...) -> None: ...

class ListSpendResponse(_message.Message):
    __slots__ = ("totals", "next_page_token")
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    totals: _containers.RepeatedCompositeFieldContainer[SpendTotal]
    next_page_token: str
    def __init__(self, totals: _Optional[_Iterable[_Union[SpendTotal, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListSpendEntriesRequest(_message.Message):
    __slots__ = ("team", "start_time", "end_time", "page_size", "page_token")
    TEAM_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    team: str
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    page_size: int
    page_token: str
    def __init__(self, team: _Optional[str] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSpendEntriesResponse(_message.Message):
    __slots__ = ("entries", "next_page_token")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[SpendEntry]
    next_page_token: str
    def __init__(self, entries: _Optional[_Iterable[_Union[SpendEntry, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ModelPrice(_message.Message):
    __slots__ = ("model", "input_per_mtok_nanos", "output_per_mtok_nanos", "cached_input_per_mtok_nanos")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_PER_MTOK_NANOS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PER_MTOK_NANOS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_PER_MTOK_NANOS_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_per_mtok_nanos: int
    output_per_mtok_nanos: int
    cached_input_per_mtok_nanos: int
    def __init__(self, model: _Optional[str] = ..., input_per_mtok_nanos: _Optional[int] = ..., output_per_mtok_nanos: _Optional[int] = ..., cached_input_per_mtok_nanos: _Optional[int] = ...) -> None: ...

class SetPricesRequest(_message.Message):
    __slots__ = ("request_id", "prices", "remove_models")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRICES_FIELD_NUMBER: _ClassVar[int]
    REMOVE_MODELS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prices: _containers.RepeatedCompositeFieldContainer[ModelPrice]
    remove_models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_id: _Optional[str] = ..., prices: _Optional[_Iterable[_Union[ModelPrice, _Mapping]]] = ..., remove_models: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPricesResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class ListPricesRequest(_message.Message):
    __slots__ = ("version", "page_size", "page_token")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    version: int
    page_size: int
    page_token: str
    def __init__(self, version: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListPricesResponse(_message.Message):
    __slots__ = ("version", "prices", "create_time", "next_page_token")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PRICES_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    version: int
    prices: _containers.RepeatedCompositeFieldContainer[ModelPrice]
    create_time: _timestamp_pb2.Timestamp
    next_page_token: str
    def __init__(self, version: _Optional[int] = ..., prices: _Optional[_Iterable[_Union[ModelPrice, _Mapping]]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
