"""igw.client: a small typed client of the igw gateway for agents (sync and asyncio).

Needs only grpcio and protobuf. Configure with arguments or ``IGW_*`` variables::

    from igw.client import IgwClient, BudgetExceeded, user

    with IgwClient.from_env() as client:          # IGW_ROUTER_ADDRS, IGW_TLS_CERT/KEY/CA
        try:
            answer = client.generate("fast", [user("Say hello")], max_output_tokens=100)
            print(answer.text, answer.cost_nanos)
        except BudgetExceeded as err:
            print("budget exhausted, remaining", err.remaining_dollars)
"""

from __future__ import annotations

from igw.client._async import AsyncIgwClient
from igw.client._config import ClientConfig, certificate_not_after
from igw.client._errors import (
    Aborted,
    AlreadyExists,
    BudgetExceeded,
    Cancelled,
    CertificateExpired,
    ClientConfigError,
    DeadlineExceeded,
    FailedPrecondition,
    IgwError,
    Internal,
    InvalidArgument,
    ModelMisconfigured,
    ModelNotFound,
    ModelNotPriced,
    NoBudget,
    NoCandidates,
    NotFound,
    PermissionDenied,
    RateLimited,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    decode_status_details,
    error_from_rpc_error,
    format_nanos,
)
from igw.client._messages import (
    assistant,
    build_request,
    new_request_id,
    system,
    tool,
    tool_result,
    user,
)
from igw.client._sync import IgwClient
from igw.router.v1.router_pb2 import (
    GenerateRequest,
    GenerateResponse,
    GenerateStreamResponse,
    ListModelsResponse,
    Message,
)

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AsyncIgwClient",
    "BudgetExceeded",
    "Cancelled",
    "CertificateExpired",
    "ClientConfig",
    "ClientConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GenerateRequest",
    "GenerateResponse",
    "GenerateStreamResponse",
    "IgwClient",
    "IgwError",
    "Internal",
    "InvalidArgument",
    "ListModelsResponse",
    "Message",
    "ModelMisconfigured",
    "ModelNotFound",
    "ModelNotPriced",
    "NoBudget",
    "NoCandidates",
    "NotFound",
    "PermissionDenied",
    "RateLimited",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "assistant",
    "build_request",
    "certificate_not_after",
    "decode_status_details",
    "error_from_rpc_error",
    "format_nanos",
    "new_request_id",
    "system",
    "tool",
    "tool_result",
    "user",
]
