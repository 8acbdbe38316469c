"""The vault's metrics, on the runtime's registry (labels never carry secrets).

Audit writes (latency, batch size, failures, the chain head), leases issued, denied and
ended, refused calls, and integrity and verification failures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_WRITE_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1, 2, 5)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class VaultMetrics:
    """Vault metrics on the runtime's registry (labels never carry secrets)."""

    registry: CollectorRegistry
    write_seconds: Histogram = field(init=False)
    batch_size: Histogram = field(init=False)
    leases_issued: Counter = field(init=False)
    leases_denied: Counter = field(init=False)
    leases_ended: Counter = field(init=False)
    write_failures: Counter = field(init=False)
    integrity_failures: Counter = field(init=False)
    verify_failures: Counter = field(init=False)
    head_sequence: Gauge = field(init=False)
    refusals: Counter = field(init=False)

    def __post_init__(self) -> None:
        r = self.registry
        self.write_seconds = Histogram(
            "igw_keyvault_audit_write_seconds", "Time to commit one audit batch.", buckets=_WRITE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "igw_keyvault_audit_batch_size", "Audit records per committed batch.", buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.leases_issued = Counter(
            "igw_keyvault_leases_issued", "Leases issued, by provider.", ["provider"], registry=r
        )
        self.leases_ended = Counter(
            "igw_keyvault_leases_ended", "Leases ended (EndLease), by provider and how: used or returned.",
            ["provider", "end"], registry=r,
        )
        self.leases_denied = Counter(
            "igw_keyvault_leases_denied", "IssueCredential denials, by provider and reason.",
            ["provider", "reason"], registry=r,
        )
        self.write_failures = Counter(
            "igw_keyvault_audit_write_failures", "Audit batches that could not be committed.", registry=r
        )
        self.verify_failures = Counter(
            "igw_keyvault_audit_verify_failures", "VerifyAuditLog walks that found the chain broken.", registry=r
        )
        self.integrity_failures = Counter(
            "igw_keyvault_integrity_failures", "Stored secrets or data keys that failed to authenticate.",
            registry=r,
        )
        self.refusals = Counter(
            "igw_keyvault_refused_calls", "Calls the authorisation table refused, by method and whether they "
            "were audited (a flood from one identity is counted, not written).", ["method", "audited"], registry=r,
        )
        self.head_sequence = Gauge(
            "igw_keyvault_audit_head_sequence",
            "Sequence of the last audit record this vault wrote or saw (it never goes down unless "
            "the log was truncated).",
            registry=r,
        )
