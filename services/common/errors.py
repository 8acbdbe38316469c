"""The one error tree of igw services and its mapping to gRPC status + ErrorInfo.

    IgwError                      (code, reason, message, metadata)
    ├── InvalidArgument           INVALID_ARGUMENT
    ├── NotFound                  NOT_FOUND
    ├── AlreadyExists             ALREADY_EXISTS
    ├── FailedPrecondition        FAILED_PRECONDITION
    ├── PermissionDenied          PERMISSION_DENIED
    ├── ResourceExhausted         RESOURCE_EXHAUSTED
    ├── Unavailable               UNAVAILABLE
    ├── DeadlineExceeded          DEADLINE_EXCEEDED
    ├── Aborted                   ABORTED
    └── Internal                  INTERNAL

Domain code raises these; the server interceptor turns them into a status with a
``google.rpc.ErrorInfo`` (stable UPPER_SNAKE reason, domain ``<service>.igw``), and a
``google.rpc.RetryInfo`` when the error says when a retry may succeed (``retry_delay_s``).
Anything else becomes INTERNAL with a generic message; the traceback stays in the log.
Messages are written by us and must never contain a secret, a prompt or a completion.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2


class IgwError(Exception):
    """Base of every error an igw service returns to a caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self, reason: str, message: str, metadata: Mapping[str, object] | None = None, *,
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = {k: str(v) for k, v in (metadata or {}).items()}
        self.retry_delay_s = retry_delay_s

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r})"


class InvalidArgument(IgwError):
    """The request is malformed; retrying it unchanged will not help."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(IgwError):
    """The named thing does not exist."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(IgwError):
    """The thing to create exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(IgwError):
    """The system is not in a state where the request can be done."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(IgwError):
    """The caller may not do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(IgwError):
    """A budget, quota or capacity limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(IgwError):
    """A dependency is down; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(IgwError):
    """The caller's deadline passed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(IgwError):
    """A conflict (e.g. an idempotency key reused with another payload)."""

    code = grpc.StatusCode.ABORTED


class Internal(IgwError):
    """A bug or an unexpected state; details are in the server log only."""

    code = grpc.StatusCode.INTERNAL


def to_status(err: IgwError, domain: str) -> grpc.Status:
    """Builds the rich status (code, message, ErrorInfo detail) for ``err``."""
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=domain, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    if err.retry_delay_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(int(max(err.retry_delay_s, 0.0) * 1e9))
        packed = any_pb2.Any()
        packed.Pack(retry)
        details.append(packed)
    proto = status_pb2.Status(code=err.code.value[0], message=err.message, details=details)
    return _RichStatus(err.code, err.message, (("grpc-status-details-bin", proto.SerializeToString()),))


class _RichStatus(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: tuple[tuple[str, bytes], ...]):
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


def retry_delay_from_rpc_error(err: grpc.RpcError) -> float | None:
    """The RetryInfo delay (seconds) of a received RpcError, if it carries one."""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                    retry = error_details_pb2.RetryInfo()
                    detail.Unpack(retry)
                    return float(retry.retry_delay.ToNanoseconds()) / 1e9
    return None


def error_info_from_rpc_error(err: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Reads the ErrorInfo detail out of a received RpcError, if any."""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None
