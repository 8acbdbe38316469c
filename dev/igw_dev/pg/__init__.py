"""An embedded PostgreSQL cluster for ``igw up``, the tests and the benchmark.

``cluster`` holds :class:`EmbeddedPostgres` and :func:`ensure_cluster`; ``files`` the cluster's
layout and configuration; ``host`` the binaries, the OS user and the tools' child processes.
"""

from __future__ import annotations

from igw_dev.pg.cluster import EmbeddedPostgres, ensure_cluster
from igw_dev.pg.host import EmbeddedPostgresError

__all__ = ["EmbeddedPostgres", "EmbeddedPostgresError", "ensure_cluster"]
