"""The vault's use cases: issue leases, manage keys, read and verify the audit log.

Hot path (IssueCredential), per call:

1. the provider's ACTIVE keys come from a short in-memory cache (``key_cache.py``: each
   key's policy, ciphertext, unwrapped data key and secret, per key version, for
   ``key_cache_seconds``; a miss is one SELECT), dropped on every admin change;
2. team check, round-robin pick among the keys the team may use, decrypt;
3. the audit record is appended by the group-commit writer and is durable before the
   lease is returned (the one mandatory DB round trip, shared by concurrent calls).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from services.common import errors as E
from services.keyvault import audit as A
from services.keyvault import audit_reader, paging
from services.keyvault import audit_records as AR
from services.keyvault import crypto as C
from services.keyvault import domain as D
from services.keyvault import repository as R
from services.keyvault.key_cache import ActiveKeyCache
from services.keyvault.keywatch import NOTIFY_SQL
from services.keyvault.metrics import VaultMetrics

_LOGGER = logging.getLogger(__name__)
# Refused calls audited per identity a minute (the rest are counted in a metric).
_REFUSALS_PER_MINUTE = 20
# The key actions a refused call was attempting; refused reads are counted, not audited.
_ACTION_OF_METHOD = {
    "IssueCredential": AR.AuditAction.ISSUE_CREDENTIAL,
    "CreateProviderKey": AR.AuditAction.CREATE_KEY,
    "RotateProviderKey": AR.AuditAction.ROTATE_KEY,
    "DisableProviderKey": AR.AuditAction.DISABLE_KEY,
}


def _str_field(request: Any, name: str) -> str:
    """A string field of an unauthorised caller's request, made safe to store: printable, capped."""
    value = getattr(request, name, "")
    if not isinstance(value, str):
        return ""
    return "".join(c for c in value if c.isprintable())[:128]


def master_key_unavailable() -> E.Unavailable:
    """What every RPC answers while the vault is sealed."""
    return E.Unavailable(
        "MASTER_KEY_UNAVAILABLE", "the vault is sealed: its master key is missing or wrong (see the vault log)"
    )


class VaultService:
    """Use cases of the KeyVault; raises ``services.common.errors`` only."""

    def __init__(
        self,
        engine: AsyncEngine,
        writer: A.AuditWriter,
        metrics: VaultMetrics,
        master: C.MasterKey | None,
        *,
        clock: Callable[[], dt.datetime] = D.utcnow,
        lease_ttl: dt.timedelta = dt.timedelta(seconds=30),
        lease_max_ttl: dt.timedelta = dt.timedelta(seconds=60),
        default_grace: dt.timedelta = dt.timedelta(hours=1),
        key_cache_seconds: float = 5.0,
    ) -> None:
        self._engine = engine
        self._writer = writer
        self._metrics = metrics
        self._master = master
        self._clock = clock
        # The same hard limit Settings enforces, for services built without Settings.
        self._lease_max_ttl = min(lease_max_ttl, dt.timedelta(seconds=D.MAX_LEASE_TTL_SECONDS))
        self._lease_ttl = min(lease_ttl, self._lease_max_ttl)
        self._default_grace = default_grace
        self._keys = ActiveKeyCache(engine, key_cache_seconds)
        self._refusals: dict[str, tuple[float, int]] = {}

    # ------------------------------------------------------------------ state

    @property
    def sealed(self) -> bool:
        """True when no usable master key is loaded: every RPC is refused."""
        return self._master is None

    def seal(self) -> None:
        """Forgets the master key, the audit chain key and every cached data key (e.g. after a failed check)."""
        self._master = None
        self._writer.forget_key()
        self._keys.clear()

    def _unsealed(self) -> C.MasterKey:
        if self._master is None:
            raise master_key_unavailable()
        return self._master

    def invalidate_cache(self) -> None:
        """Drops every cached data key and ciphertext."""
        self._keys.clear()

    # ------------------------------------------------------------------ IssueCredential

    async def issue(self, actor: str, req: D.IssueRequest) -> D.Lease:
        """A lease on an ACTIVE key of ``req.provider`` that ``req.team`` may use; audited first."""
        master = self._unsealed()
        keys = await self._keys.active_keys(req.provider)
        draft = AR.AuditDraft(
            actor=actor, action=AR.AuditAction.ISSUE_CREDENTIAL, provider=req.provider, team=req.team,
            model=req.model, request_id=req.request_id,
        )
        if not keys:
            await self._deny(draft, "NO_KEY_FOR_PROVIDER")
            raise E.PermissionDenied(
                "NO_KEY_FOR_PROVIDER", "no active key for this provider", {"provider": req.provider}
            )
        eligible = [c for c in keys if c.key.allows(req.team)]
        if not eligible:
            await self._deny(draft, "TEAM_NOT_ALLOWED")
            raise E.PermissionDenied(
                "TEAM_NOT_ALLOWED", "the team may not use any key of this provider",
                {"provider": req.provider, "team": req.team},
            )
        chosen = self._keys.pick(req.provider, eligible)
        key = chosen.key
        draft.key_name, draft.key_version = key.name, key.version
        try:
            plaintext = chosen.secret(master)
        except C.DecryptionError:
            # Fail closed: no fallback to another key, no partial output, an alarm in the log.
            self._metrics.integrity_failures.inc()
            self._keys.drop(req.provider)
            _LOGGER.error(
                "stored key version does not authenticate; refusing to issue",
                extra={"key_name": key.name, "key_version": key.version},
            )
            await self._deny(draft, "DECRYPTION_FAILED")
            raise E.Internal("DECRYPTION_FAILED", "the stored key could not be decrypted") from None
        ttl = self._lease_ttl if req.ttl is None or req.ttl <= dt.timedelta(0) else min(req.ttl, self._lease_max_ttl)
        lease_id = secrets.token_hex(16)
        draft.lease_id_hmac = master.lease_hmac(lease_id)
        await self._writer.append(draft)
        self._metrics.leases_issued.labels(req.provider).inc()
        # The clock is read after the audit commit, so the lease's life starts when it is handed out.
        return D.Lease(
            lease_id=lease_id, key_name=key.name, key_version=key.version, secret=plaintext.decode("utf-8"),
            base_url=key.base_url, expire_time=self._clock() + ttl,
        )

    async def end_lease(self, actor: str, req: D.EndLeaseRequest) -> None:
        """Audits how a lease ended (used, or returned unused and why); durable before it returns.

        The record carries the lease id's HMAC, as the issue record does, so the two pair up; the
        vault keeps no lease state, so it does not check that the lease was issued (only the
        router identity may call this, and it holds the leases).
        """
        await self.end_leases(actor, [req])

    async def end_leases(self, actor: str, reqs: list[D.EndLeaseRequest]) -> None:
        """Audits several lease ends (as :meth:`end_lease` each) in one group commit; durable
        before it returns, all or none (the batch is one audit transaction)."""
        master = self._unsealed()
        drafts = [
            AR.AuditDraft(
                actor=actor, action=AR.AuditAction.LEASE_USED if req.used else AR.AuditAction.LEASE_RETURNED,
                reason=req.reason, provider=req.provider, key_name=req.key_name, key_version=req.key_version,
                team=req.team, model=req.model, request_id=req.request_id,
                lease_id_hmac=master.lease_hmac(req.lease_id),
            )
            for req in reqs
        ]
        await self._writer.append_many(drafts)
        for req in reqs:
            self._metrics.leases_ended.labels(req.provider, "used" if req.used else "returned").inc()

    async def record_refusal(self, method: str, request: Any, actor: str, reason: str) -> None:
        """Audits a call the authorisation table refused (e.g. an agent certificate asking for a
        lease). At most ``_REFUSALS_PER_MINUTE`` records per identity a minute: beyond that they
        are only counted, so one stolen certificate cannot flood the log."""
        name = method.rsplit("/", 1)[-1]
        action = _ACTION_OF_METHOD.get(name)
        if action is None:  # reads (lists, verify, reflection) are not key actions: counted only
            self._metrics.refusals.labels(name, "no").inc()
            return
        now = time.monotonic()
        start, count = self._refusals.get(actor, (now, 0))
        if now - start >= 60:
            start, count = now, 0
        if count >= _REFUSALS_PER_MINUTE:
            self._metrics.refusals.labels(name, "no").inc()
            return
        if len(self._refusals) >= 10_000:
            self._refusals.clear()
        self._refusals[actor] = (start, count + 1)
        draft = AR.AuditDraft(
            actor=actor, action=action, outcome=AR.AuditOutcome.DENIED, reason=reason,
            provider=_str_field(request, "provider"), team=_str_field(request, "team"),
            key_name=_str_field(request, "name"), request_id=_str_field(request, "request_id"),
        )
        await self._writer.append(draft)
        self._metrics.refusals.labels(name, "yes").inc()

    async def _deny(self, draft: AR.AuditDraft, reason: str) -> None:
        draft.outcome, draft.reason = AR.AuditOutcome.DENIED, reason
        self._metrics.leases_denied.labels(draft.provider, reason).inc()
        await self._writer.append(draft)

    # ------------------------------------------------------------------ admin

    async def create_key(self, actor: str, new: D.NewKey) -> D.ProviderKeyInfo:
        """Stores a new key (version 1). Idempotent on ``request_id``; a taken name is ALREADY_EXISTS."""
        master = self._unsealed()
        fp = master.request_fingerprint(
            _canonical(
                "create", new.name, new.provider, base64.b64encode(new.secret).decode(), new.base_url,
                list(new.allowed_teams), new.all_teams, sorted(new.labels.items()),
                new.rotation_period.total_seconds() if new.rotation_period else 0,
            )
        )
        sealed = C.seal(master, new.name, new.provider, 1, new.secret)
        fingerprint = C.secret_fingerprint(new.secret)

        async def action(conn: AsyncConnection, draft: AR.AuditDraft) -> D.ProviderKeyInfo:
            await self._replay_or_none(conn, new.request_id, "create", fp)
            if await R.get_key(conn, new.name) is not None:
                raise E.AlreadyExists("KEY_EXISTS", "a key with this name exists", {"name": new.name})
            now = self._clock()
            await R.insert_key(conn, new, sealed, fingerprint, now)
            await R.record_request(conn, new.request_id, "create", fp, new.name, now)
            draft.key_version = 1
            info = await R.get_key(conn, new.name)
            assert info is not None
            return info

        draft = AR.AuditDraft(
            actor=actor, action=AR.AuditAction.CREATE_KEY, provider=new.provider, key_name=new.name,
            request_id=new.request_id,
        )
        return await self._admin(draft, action)

    async def rotate_key(
        self, actor: str, request_id: str, name: str, secret: bytes, grace: dt.timedelta | None
    ) -> D.ProviderKeyInfo:
        """Adds a new ACTIVE version; the previous one is GRACE until ``grace`` (default 1 h) passes."""
        master = self._unsealed()
        grace = self._default_grace if grace is None else grace
        fp = master.request_fingerprint(
            _canonical("rotate", name, base64.b64encode(secret).decode(), grace.total_seconds())
        )
        fingerprint = C.secret_fingerprint(secret)

        async def action(conn: AsyncConnection, draft: AR.AuditDraft) -> D.ProviderKeyInfo:
            await self._replay_or_none(conn, request_id, "rotate", fp)
            info = await R.get_key(conn, name, for_update=True)
            if info is None:
                raise E.NotFound("KEY_NOT_FOUND", "no key with this name", {"name": name})
            draft.provider = info.provider
            if info.state is D.KeyState.DISABLED:
                raise E.FailedPrecondition("KEY_DISABLED", "a disabled key cannot be rotated", {"name": name})
            version = max((v.version for v in info.versions), default=0) + 1
            sealed = C.seal(master, name, info.provider, version, secret)
            now = self._clock()
            await R.add_version(conn, name, version, sealed, fingerprint, now, now + grace)
            await R.record_request(conn, request_id, "rotate", fp, name, now)
            draft.key_version = version
            out = await R.get_key(conn, name)
            assert out is not None
            return out

        draft = AR.AuditDraft(actor=actor, action=AR.AuditAction.ROTATE_KEY, key_name=name, request_id=request_id)
        return await self._admin(draft, action)

    async def disable_key(self, actor: str, request_id: str, name: str) -> D.ProviderKeyInfo:
        """Disables a key and all its versions at once (idempotent)."""
        master = self._unsealed()
        fp = master.request_fingerprint(_canonical("disable", name))

        async def action(conn: AsyncConnection, draft: AR.AuditDraft) -> D.ProviderKeyInfo:
            await self._replay_or_none(conn, request_id, "disable", fp)
            info = await R.get_key(conn, name, for_update=True)
            if info is None:
                raise E.NotFound("KEY_NOT_FOUND", "no key with this name", {"name": name})
            draft.provider = info.provider
            draft.key_version = info.current.version if info.current else 0
            await R.disable_key(conn, name)
            await R.record_request(conn, request_id, "disable", fp, name, self._clock())
            out = await R.get_key(conn, name)
            assert out is not None
            return out

        draft = AR.AuditDraft(actor=actor, action=AR.AuditAction.DISABLE_KEY, key_name=name, request_id=request_id)
        return await self._admin(draft, action)

    async def _admin(self, draft: AR.AuditDraft, action: A.Action) -> D.ProviderKeyInfo:
        async def and_notify(conn: AsyncConnection, d: AR.AuditDraft) -> D.ProviderKeyInfo:
            result = await action(conn, d)
            # Delivered at commit to every vault replica, which drops its cached keys.
            await conn.execute(text(NOTIFY_SQL))
            return result  # type: ignore[no-any-return]

        try:
            _, result = await self._writer.append(draft, and_notify)
        finally:
            self._keys.clear()
        assert isinstance(result, D.ProviderKeyInfo)
        return result

    async def _replay_or_none(self, conn: AsyncConnection, request_id: str, method: str, fp: str) -> None:
        prior = await R.find_request(conn, request_id)
        if prior is None:
            return
        prior_method, prior_fp, key_name = prior
        if prior_method != method or prior_fp != fp:
            raise E.Aborted(
                "REQUEST_ID_REUSED", "this request id was used for a different request",
                {"request_id": request_id},
            )
        raise A.Replay(await R.get_key(conn, key_name))

    async def list_keys(
        self, provider: str, page_size: int, page_token: str
    ) -> tuple[list[D.ProviderKeyInfo], str]:
        """Metadata only, by name."""
        self._unsealed()
        after = paging.decode_token(page_token, "after", str)
        infos, last = await R.list_keys(self._engine, provider, paging.page_size(page_size), after)
        return infos, paging.encode_token("after", last) if last is not None else ""

    def now(self) -> dt.datetime:
        """The service clock (for effective states and rotation_due)."""
        return self._clock()

    # ------------------------------------------------------------------ audit

    async def list_audit(
        self, flt: AR.AuditFilter, page_size: int, page_token: str
    ) -> tuple[list[AR.AuditRecord], str]:
        """Newest first."""
        self._unsealed()
        before = paging.decode_token(page_token, "before", int)
        records, nxt = await audit_reader.list_events(self._engine, flt, paging.page_size(page_size), before)
        return records, paging.encode_token("before", nxt) if nxt is not None else ""

    async def verify_audit(self, anchor_sequence: int = 0, anchor_hash: str = "") -> AR.VerifyResult:
        """Walks the whole chain; with an anchor (a head recorded outside the vault), also checks
        that the chain still holds it, so a cut-off tail shows."""
        self._unsealed()
        if anchor_sequence < 0:
            raise E.InvalidArgument(
                "ANCHOR_INVALID", "anchor_sequence must not be negative", {"field": "anchor_sequence"}
            )
        if anchor_sequence and not re.fullmatch(r"[0-9a-fA-F]{64}", anchor_hash):
            raise E.InvalidArgument(
                "ANCHOR_INVALID", "anchor_hash must be the 64 hex digits of the anchored record's hash",
                {"field": "anchor_hash"},
            )
        if anchor_hash and not anchor_sequence:
            raise E.InvalidArgument("ANCHOR_INVALID", "anchor_hash needs anchor_sequence", {"field": "anchor_sequence"})
        key = self._writer.chain_key
        if key is None:
            raise master_key_unavailable()
        anchor = (anchor_sequence, anchor_hash) if anchor_sequence else None
        result = await audit_reader.verify_chain(self._engine, key, anchor=anchor)
        if not result.ok:
            self._metrics.verify_failures.inc()
        return result


def _canonical(*parts: object) -> bytes:
    return json.dumps(parts, separators=(",", ":"), sort_keys=True).encode()

