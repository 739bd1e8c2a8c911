"""Optional dependencies: `kvgate sim` / `kvgate bench` without their extra say in one line what to
install (exit 2, no traceback), and the gateway imports none of the extras' packages.

A missing package is simulated in a subprocess: a sitecustomize on PYTHONPATH puts a meta-path finder
first that refuses the blocked modules, as if they were not installed."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from gateway.cli import OPTIONAL_MODULES

ROOT = Path(__file__).resolve().parents[2]
BLOCKER = """\
import os
import sys

BLOCKED = set(os.environ["BLOCKED_MODULES"].split(","))


class _Blocker:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Blocker)
"""
# kvgate epp's gRPC side is the `epp` extra's own code: everything else imports without any extra.
EPP_EXTRA_MODULES = ("gateway.epp.cli", "gateway.epp.extproc", "gateway.epp.server")
GATEWAY_IMPORTS_ALL = f"""\
import importlib, pkgutil
import gateway, prefixindex, router
for package in (gateway, router, prefixindex):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if module.name not in {EPP_EXTRA_MODULES!r}:
            importlib.import_module(module.name)
print("imported")
"""


def run_without(tmp_path: Path, blocked: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "BLOCKED_MODULES": ",".join(blocked)}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def extra_modules(extra: str) -> list[str]:
    return [m for m, e in OPTIONAL_MODULES.items() if e == extra]


@pytest.mark.parametrize(
    ("argv", "blocked", "extra"),
    [
        (["bench", "--quick"], ["matplotlib"], "bench"),
        (["bench", "--help"], extra_modules("bench") + extra_modules("sim"), "bench"),
        (["sim", "--port", "0"], ["msgpack"], "sim"),
        (["sim", "--help"], ["msgpack"], "sim"),
        (["serve", "--backend", "http://127.0.0.1:9", "--model", "m", "--redis-url", "redis://127.0.0.1:9"],
         ["redis"], "redis"),
        (["epp", "--help"], ["grpc"], "epp"),
        (["epp", "--backend", "http://127.0.0.1:1"], ["envoy"], "epp"),
    ],
)
def test_a_missing_extra_is_one_line_naming_it(tmp_path: Path, argv: list[str], blocked: list[str],
                                              extra: str) -> None:
    result = run_without(tmp_path, blocked, "-m", "gateway.cli", *argv)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    hint = rf"kvgate {argv[0]}: needs the optional package '(\w+)': pip install 'kvgate\[(\w+)\]'"
    match = re.fullmatch(hint, lines[0])
    assert match, lines[0]
    assert match[1] in blocked and match[2] == extra


def test_the_gateway_imports_no_optional_package(tmp_path: Path) -> None:
    result = run_without(tmp_path, sorted(OPTIONAL_MODULES), "-c", GATEWAY_IMPORTS_ALL)
    assert result.returncode == 0 and result.stdout.strip() == "imported", result.stderr
    serve = run_without(tmp_path, sorted(OPTIONAL_MODULES), "-m", "gateway.cli", "serve", "--help")
    assert serve.returncode == 0 and "KVGATE_PORT" in serve.stdout, serve.stderr


def test_optional_modules_match_the_extras_in_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.match(r"[A-Za-z0-9_.-]+", r)[0].lower() for r in requirements}  # type: ignore[index]

    core = names(project["dependencies"])
    extras = {extra: names(reqs) for extra, reqs in project["optional-dependencies"].items()}
    installs = importlib.metadata.packages_distributions()  # module -> the distributions shipping it
    for module, extra in OPTIONAL_MODULES.items():
        dists = {module} | {d.lower() for d in installs.get(module, [])}
        assert dists & extras[extra] and not dists & core, module
    for extra in ("sim", "bench"):  # each package of these extras has its one-line hint
        assert extras[extra] <= set(OPTIONAL_MODULES), extra
