"""The dependency rule of the architecture, checked by import-linter ([tool.importlinter]
in pyproject.toml): contracts imports nothing of the project, shared only contracts, a
service never another service nor the CLI, the CLI never a service's app; and a service
package holds what its service runs, nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), (
        f"{lint_imports} not found: install the test extras (`pip install -e '.[test]'`, import-linter)"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [str(lint_imports), str(REPO / "pyproject.toml"), "--no-cache", "--no-logo"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, f"import-linter found broken import contracts:\n{proc.stdout[-6000:]}{proc.stderr[-2000:]}"
    assert "0 broken" in proc.stdout


# Modules a service package may hold that its running service does not load, and why.
NOT_THE_SERVICE = {
    "services.evaluator.lm_eval_adapter": "the lm-evaluation-harness adapter, imported by lm-eval runs",
}

# Modules of services/ beside the service packages, and who uses them.
BESIDE_THE_SERVICES = {
    "services.runconfig": "the whole run config's validation at the request: data-prep and the CLI",
}


def test_service_packages_hold_the_running_service_only() -> None:
    """Every module of services/<name>/ is loaded by that service (its __main__ or app):
    views for the CLI live in helox/, fixtures for tests and benchmarks in tests/."""
    import grimp

    graph = grimp.build_graph("services", "shared", "contracts")
    stray = []
    for package in sorted(m for m in graph.find_children("services") if m not in BESIDE_THE_SERVICES):
        entry = [m for m in (f"{package}.__main__", f"{package}.app") if m in graph.modules]
        assert entry, f"{package} has neither __main__ nor app"
        loaded = set(entry).union(*(graph.find_upstream_modules(m) for m in entry))
        stray += [m for m in graph.find_descendants(package) if m not in loaded and m not in NOT_THE_SERVICE]
    assert not stray, f"modules in service packages that the services never load: {sorted(stray)}"
    assert all(m in graph.modules for m in NOT_THE_SERVICE), "NOT_THE_SERVICE names a module that is gone"
    assert all(m in graph.modules for m in BESIDE_THE_SERVICES), "BESIDE_THE_SERVICES names a module that is gone"
