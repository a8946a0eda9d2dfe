"""The dependency rule of the architecture, checked by import-linter ([tool.importlinter]
in pyproject.toml): contracts imports nothing of the project, shared only contracts, a
service never another service nor the CLI."""

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
