"""Router worker processes: how many, and the reserved port every worker can listen on."""

from __future__ import annotations

import socket

import pytest

from services.router.workers import _metrics_listen, reserve_port, workers_of


def test_the_worker_count_defaults_to_one_and_refuses_nonsense() -> None:
    assert workers_of({}) == 1
    assert workers_of({"IGW_ROUTER_WORKERS": "4"}) == 4
    for bad in ("0", "65", "two", "-1"):
        with pytest.raises(SystemExit):
            workers_of({"IGW_ROUTER_WORKERS": bad})


def test_a_reserved_port_is_shared_by_workers_that_listen_with_so_reuseport() -> None:
    held, listen = reserve_port("127.0.0.1:0")
    port = int(listen.rsplit(":", 1)[1])
    workers = []
    try:
        assert port > 0
        for _ in range(2):  # two workers bind and listen on the same port
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            s.listen(8)
            workers.append(s)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # a connection reaches one of the listening workers, never the reserving socket
        plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with pytest.raises(OSError):  # a program without SO_REUSEPORT cannot take the port
            plain.bind(("127.0.0.1", port))
        plain.close()
    finally:
        for s in [held, *workers]:
            s.close()


def test_each_worker_gets_its_own_metrics_port() -> None:
    assert [_metrics_listen("0.0.0.0:9101", i) for i in range(3)] == ["0.0.0.0:9101", "0.0.0.0:9102", "0.0.0.0:9103"]
    assert _metrics_listen("127.0.0.1:0", 2) == "127.0.0.1:0"
