"""Proto <-> domain for the two KeyVault services; no SQL and no business rules here.

Authorisation happened in the guard (router only for IssueCredential, operators only for
the admin service); the actor of every audit record is the caller's SPIFFE id from there.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf import duration_pb2, timestamp_pb2

from igw.keyvault.v1 import keyvault_pb2 as pb
from igw.keyvault.v1 import keyvault_pb2_grpc as pb_grpc
from services.common import errors as E
from services.common.guard import current_identity
from services.keyvault import audit_records as AR
from services.keyvault import domain as D
from services.keyvault.service import VaultService, master_key_unavailable

_STATE = {
    D.KeyState.ACTIVE: pb.KEY_STATE_ACTIVE,
    D.KeyState.GRACE: pb.KEY_STATE_GRACE,
    D.KeyState.DISABLED: pb.KEY_STATE_DISABLED,
}
_ACTION_TO_PB = {a: pb.AuditAction.Value(f"AUDIT_ACTION_{a.value}") for a in AR.AuditAction}
_ACTION_FROM_PB = {v: k for k, v in _ACTION_TO_PB.items()}
_OUTCOME_TO_PB = {o: pb.AuditOutcome.Value(f"AUDIT_OUTCOME_{o.value}") for o in AR.AuditOutcome}
_OUTCOME_FROM_PB = {v: k for k, v in _OUTCOME_TO_PB.items()}
_MAX_DURATION = dt.timedelta(days=3650)
_T = TypeVar("_T")


def _filter_enum(field: str, value: int, known: Mapping[Any, _T]) -> _T | None:
    """A filter's enum value: None when unset (0, matches all); an unknown value is refused,
    never ignored (ignoring it would make the filter match everything)."""
    if value == 0:
        return None
    found = known.get(value)
    if found is None:
        raise E.InvalidArgument("UNKNOWN_ENUM_VALUE", f"{field} has an unknown value {int(value)}",
                                {"field": field, "value": int(value)})
    return found


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value.astimezone(dt.UTC))
    return out


def _duration(msg: Any, field: str, has: bool) -> dt.timedelta | None:
    if not has:
        return None
    d: duration_pb2.Duration = getattr(msg, field)
    if d.seconds < 0 or d.nanos < 0 or d.seconds > _MAX_DURATION.total_seconds():
        raise E.InvalidArgument(f"{field.upper()}_INVALID", f"{field} is out of range", {"field": field})
    return dt.timedelta(seconds=d.seconds, microseconds=d.nanos // 1000)


def key_to_pb(info: D.ProviderKeyInfo, now: dt.datetime) -> pb.ProviderKey:
    """Metadata only: there is no secret in a ProviderKeyInfo to begin with."""
    out = pb.ProviderKey(
        name=info.name,
        provider=info.provider,
        base_url=info.base_url,
        allowed_teams=list(info.allowed_teams),
        all_teams=info.all_teams,
        labels=dict(info.labels),
        state=_STATE[info.state],
        current_version=info.current.version if info.current and info.state is D.KeyState.ACTIVE else 0,
        rotation_due=info.rotation_due(now),
        create_time=_ts(info.created_at),
    )
    if info.rotation_period is not None:
        out.rotation_period.FromTimedelta(info.rotation_period)
    for v in info.versions:
        kv = out.versions.add(
            version=v.version, state=_STATE[v.effective_state(now)], create_time=_ts(v.created_at),
            fingerprint=v.fingerprint,
        )
        if v.grace_end is not None and v.state is D.KeyState.GRACE:
            kv.grace_end_time.CopyFrom(_ts(v.grace_end))
    return out


def event_to_pb(rec: AR.AuditRecord) -> pb.AuditEvent:
    """One stored record as the API shows it."""
    return pb.AuditEvent(
        sequence=rec.sequence,
        create_time=_ts(rec.created_at),
        actor=rec.actor,
        action=_ACTION_TO_PB[AR.AuditAction(rec.action)],
        outcome=_OUTCOME_TO_PB[AR.AuditOutcome(rec.outcome)],
        reason=rec.reason,
        provider=rec.provider,
        key_name=rec.key_name,
        key_version=rec.key_version,
        team=rec.team,
        model=rec.model,
        request_id=rec.request_id,
        lease_id_hmac=rec.lease_id_hmac,
        prev_hash=rec.prev_hash,
        hash=rec.hash,
    )


class KeyVaultServicer(pb_grpc.KeyVaultServiceServicer):
    """IssueCredential (router identity only)."""

    def __init__(self, service: VaultService) -> None:
        self._service = service

    async def IssueCredential(self, request: pb.IssueCredentialRequest, context: Any) -> pb.IssueCredentialResponse:
        if self._service.sealed:
            raise master_key_unavailable()
        req = D.IssueRequest(
            provider=D.check_provider(request.provider),
            team=D.check_team(request.team),
            model=D.check_model(request.model),
            request_id=D.check_request_id(request.request_id),
            ttl=_duration(request, "ttl", request.HasField("ttl")),
        )
        lease = await self._service.issue(current_identity().spiffe_id, req)
        return pb.IssueCredentialResponse(
            lease_id=lease.lease_id,
            key_name=lease.key_name,
            key_version=lease.key_version,
            secret=lease.secret,
            base_url=lease.base_url,
            expire_time=_ts(lease.expire_time),
        )


    async def EndLease(self, request: pb.EndLeaseRequest, context: Any) -> pb.EndLeaseResponse:
        if self._service.sealed:
            raise master_key_unavailable()
        await self._service.end_lease(current_identity().spiffe_id, _end_lease_request(request))
        return pb.EndLeaseResponse()

    async def EndLeaseBatch(self, request: pb.EndLeaseBatchRequest, context: Any) -> pb.EndLeaseBatchResponse:
        if self._service.sealed:
            raise master_key_unavailable()
        n = len(request.items)
        if not 1 <= n <= MAX_END_LEASE_BATCH:
            raise E.InvalidArgument(
                "INVALID_BATCH", f"items must hold 1 to {MAX_END_LEASE_BATCH} lease ends",
                {"field": "items", "max": MAX_END_LEASE_BATCH})
        reqs = [_end_lease_request(item, f"items[{i}].") for i, item in enumerate(request.items)]
        await self._service.end_leases(current_identity().spiffe_id, reqs)
        return pb.EndLeaseBatchResponse()


MAX_END_LEASE_BATCH = 256


def _end_lease_request(request: pb.EndLeaseRequest, where: str = "") -> D.EndLeaseRequest:
    """One lease end, validated (``where`` prefixes the field named in an error)."""
    if request.end not in (pb.LEASE_END_USED, pb.LEASE_END_RETURNED):
        raise E.InvalidArgument("END_INVALID", "end must be LEASE_END_USED or LEASE_END_RETURNED",
                                {"field": where + "end"})
    return D.EndLeaseRequest(
        lease_id=D.check_lease_id(request.lease_id),
        used=request.end == pb.LEASE_END_USED,
        reason=D.check_reason(request.reason),
        request_id=D.check_request_id(request.request_id),
        provider=D.check_provider(request.provider),
        team=D.check_team(request.team),
        model=D.check_model(request.model) if request.model else "",
        key_name=D.check_name(request.key_name) if request.key_name else "",
        key_version=max(request.key_version, 0),
    )


class KeyVaultAdminServicer(pb_grpc.KeyVaultAdminServiceServicer):
    """Operator-only key management and audit; never returns key material."""

    def __init__(self, service: VaultService) -> None:
        self._service = service

    def _gate(self) -> str:
        if self._service.sealed:
            raise master_key_unavailable()
        return current_identity().spiffe_id

    async def CreateProviderKey(self, request: pb.CreateProviderKeyRequest, context: Any) -> pb.ProviderKey:
        actor = self._gate()
        new = D.NewKey(
            request_id=D.check_request_id(request.request_id),
            name=D.check_name(request.name),
            provider=D.check_provider(request.provider),
            secret=D.check_secret(request.secret),
            base_url=D.check_base_url(request.base_url),
            allowed_teams=D.check_teams(list(request.allowed_teams)),
            all_teams=request.all_teams,
            labels=D.check_labels(dict(request.labels)),
            rotation_period=D.check_duration(
                _duration(request, "rotation_period", request.HasField("rotation_period")), "rotation_period",
                allow_zero=True,
            )
            or None,
        )
        info = await self._service.create_key(actor, new)
        return key_to_pb(info, self._service.now())

    async def RotateProviderKey(self, request: pb.RotateProviderKeyRequest, context: Any) -> pb.ProviderKey:
        actor = self._gate()
        grace = D.check_duration(
            _duration(request, "grace_period", request.HasField("grace_period")), "grace_period", D.MAX_GRACE
        )
        info = await self._service.rotate_key(
            actor,
            D.check_request_id(request.request_id),
            D.check_name(request.name),
            D.check_secret(request.secret),
            grace,
        )
        return key_to_pb(info, self._service.now())

    async def DisableProviderKey(self, request: pb.DisableProviderKeyRequest, context: Any) -> pb.ProviderKey:
        actor = self._gate()
        info = await self._service.disable_key(
            actor, D.check_request_id(request.request_id), D.check_name(request.name)
        )
        return key_to_pb(info, self._service.now())

    async def ListProviderKeys(
        self, request: pb.ListProviderKeysRequest, context: Any
    ) -> pb.ListProviderKeysResponse:
        self._gate()
        provider = D.check_provider(request.provider) if request.provider else ""
        infos, token = await self._service.list_keys(provider, request.page_size, request.page_token)
        now = self._service.now()
        return pb.ListProviderKeysResponse(keys=[key_to_pb(i, now) for i in infos], next_page_token=token)

    async def ListAuditEvents(
        self, request: pb.ListAuditEventsRequest, context: Any
    ) -> pb.ListAuditEventsResponse:
        self._gate()
        flt = AR.AuditFilter(
            action=_filter_enum("action", request.action, _ACTION_FROM_PB),
            outcome=_filter_enum("outcome", request.outcome, _OUTCOME_FROM_PB),
            key_name=D.check_name(request.key_name) if request.key_name else "",
            team=D.check_team(request.team) if request.team else "",
            request_id=D.check_request_id(request.request_id) if request.request_id else "",
            start_time=request.start_time.ToDatetime(dt.UTC) if request.HasField("start_time") else None,
            end_time=request.end_time.ToDatetime(dt.UTC) if request.HasField("end_time") else None,
        )
        records, token = await self._service.list_audit(flt, request.page_size, request.page_token)
        return pb.ListAuditEventsResponse(events=[event_to_pb(r) for r in records], next_page_token=token)

    async def VerifyAuditLog(
        self, request: pb.VerifyAuditLogRequest, context: Any
    ) -> pb.VerifyAuditLogResponse:
        self._gate()
        result = await self._service.verify_audit(request.anchor_sequence, request.anchor_hash)
        return pb.VerifyAuditLogResponse(
            ok=result.ok, records_checked=result.records_checked,
            first_bad_sequence=result.first_bad_sequence, reason=result.reason,
            head_sequence=result.head_sequence, head_hash=result.head_hash,
        )
