"""The agent client installs on its own, with grpcio and protobuf as its only dependencies."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.clientvenv import (
    ALLOWED_DISTRIBUTIONS,
    FORBIDDEN_DISTRIBUTIONS,
    build_client_venv,
    installed_distributions,
    run_client_script,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_client_venv(tmp_path_factory.mktemp("clientvenv"))


def test_pip_install_clients_pulls_only_grpcio_and_protobuf(client_python: Path) -> None:
    installed = installed_distributions(client_python)

    assert {"igw-client", "grpcio", "protobuf"} <= installed
    assert not installed & FORBIDDEN_DISTRIBUTIONS
    assert installed <= ALLOWED_DISTRIBUTIONS, f"unexpected packages: {installed - ALLOWED_DISTRIBUTIONS}"


def test_the_client_imports_and_decodes_typed_errors_without_googleapis(client_python: Path) -> None:
    result = run_client_script(client_python)

    assert result["imported"] is True
    assert result["forbidden_modules"] == []
    assert result["offline_error"] == {"type": "BudgetExceeded", "remaining_nanos": 42}
    assert "generate" not in result  # no gateway given: nothing was called
