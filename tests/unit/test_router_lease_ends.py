"""The router's lease-end batching: the ends of concurrent calls share one EndLeaseBatch, faults
are retried until acknowledged, and a vault without EndLeaseBatch gets them one by one."""

from __future__ import annotations

import asyncio

import grpc
from prometheus_client import CollectorRegistry

from igw.keyvault.v1 import keyvault_pb2 as pb
from services.router.metrics import RouterMetrics
from services.router.settler import LeaseEnder


class _Fault(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


class _Vault:
    """Records every lease end it acknowledged; ``down`` faults the next calls; ``old`` has no batch RPC."""

    def __init__(self, down: int = 0, old: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.singles: list[str] = []
        self.down = down
        self.old = old

    async def EndLeaseBatch(self, req: pb.EndLeaseBatchRequest, timeout: float) -> pb.EndLeaseBatchResponse:
        if self.old:
            raise _Fault(grpc.StatusCode.UNIMPLEMENTED)
        if self.down:
            self.down -= 1
            raise _Fault(grpc.StatusCode.UNAVAILABLE)
        self.batches.append([i.lease_id for i in req.items])
        return pb.EndLeaseBatchResponse()

    async def EndLease(self, req: pb.EndLeaseRequest, timeout: float) -> pb.EndLeaseResponse:
        self.singles.append(req.lease_id)
        return pb.EndLeaseResponse()


def _end(n: int) -> pb.EndLeaseRequest:
    return pb.EndLeaseRequest(lease_id=f"l{n}", end=pb.LEASE_END_USED, reason="SUCCESS", request_id=f"r{n}",
                              provider="p", team="t")


async def test_the_ends_of_concurrent_calls_share_one_batch() -> None:
    vault = _Vault()
    ender = LeaseEnder(vault, RouterMetrics(CollectorRegistry()), linger_s=0.02)  # type: ignore[arg-type]
    for n in range(10):
        ender.submit(_end(n))
    await asyncio.sleep(0.1)
    for n in range(10, 13):
        ender.submit(_end(n))
    await ender.drain(5)
    assert vault.batches == [[f"l{n}" for n in range(10)], ["l10", "l11", "l12"]]
    assert vault.singles == []


async def test_a_full_batch_goes_at_once_without_waiting_for_the_linger() -> None:
    vault = _Vault()
    ender = LeaseEnder(vault, RouterMetrics(CollectorRegistry()), max_batch=4, linger_s=60)  # type: ignore[arg-type]
    for n in range(4):
        ender.submit(_end(n))
    await asyncio.sleep(0.05)
    assert vault.batches == [["l0", "l1", "l2", "l3"]]


async def test_a_batch_is_retried_until_the_vault_acknowledges_it() -> None:
    vault = _Vault(down=2)
    ender = LeaseEnder(vault, RouterMetrics(CollectorRegistry()), linger_s=0.001)  # type: ignore[arg-type]
    ender.submit(_end(1))
    ender.submit(_end(2))
    await asyncio.sleep(0.01)
    await ender.drain(5)
    assert vault.batches == [["l1", "l2"]]


async def test_acknowledged_ends_are_counted_by_how_they_ended() -> None:
    metrics = RouterMetrics(CollectorRegistry())
    ender = LeaseEnder(_Vault(), metrics, linger_s=0.001)  # type: ignore[arg-type]
    returned = _end(9)
    returned.end = pb.LEASE_END_RETURNED
    for req in (_end(1), _end(2), returned):
        ender.submit(req)
    await asyncio.sleep(0.01)
    await ender.drain(5)
    assert metrics.lease_ends.labels("used")._value.get() == 2
    assert metrics.lease_ends.labels("returned")._value.get() == 1


async def test_a_vault_without_the_batch_rpc_gets_each_end_on_its_own() -> None:
    vault = _Vault(old=True)
    ender = LeaseEnder(vault, RouterMetrics(CollectorRegistry()), linger_s=0.001)  # type: ignore[arg-type]
    for n in range(3):
        ender.submit(_end(n))
    await asyncio.sleep(0.01)
    await ender.drain(5)
    ender.submit(_end(3))
    await ender.drain(5)
    assert vault.singles == ["l0", "l1", "l2", "l3"] and vault.batches == []
