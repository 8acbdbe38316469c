"""igw's development tooling, installed beside the runtime (``pip install -e ./dev``), never in it.

* ``pki`` - the dev CA and its certificates (``igw pki``).
* ``pg`` - an embedded PostgreSQL cluster for ``igw up``, the tests and the benchmark.
* ``procs`` - start a service as its own process and wait until it is ready.
* ``fakes`` - fake LLM providers: real HTTP servers speaking each provider's wire format.
* ``up`` - ``igw up``: the whole gateway on one machine.

The runtime (``services``, the container image) imports nothing from here; the ``igw`` command's
dev verbs import it when they run and say how to install it when it is missing.
"""
