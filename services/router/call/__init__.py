"""One agent call as a use case over ports, on plain domain types (no protobuf, no gRPC).

Read a call in this order:

1. :mod:`services.router.servicer`: the wire request becomes a :class:`~.domain.CallRequest`
   (ids checked, alias resolved, request translated); the :class:`~.domain.CallResult` and the
   stream events become the wire answer.
2. :mod:`.engine`: admission, then for each attempt the plan gives: hold + credential, the
   provider call, success (settle, answer) or failure (free, let the plan judge it).
3. :mod:`.plan`: candidate order by strategy, breaker tickets, backoff rounds, what each failure
   kind means, the final error by cause.
4. :mod:`.relay`: a committed stream relayed to the agent and settled, even when cut short.
5. :mod:`.grpc_ports`: the ports over the ledger (holds, budget slices, batched settles) and
   the vault (credential leases); :mod:`.http_ports`: the provider adapters.

:mod:`.domain` holds the types and :mod:`.ports` the protocols; tests/unit/test_call_engine.py
runs the engine over fakes of every port.
"""
