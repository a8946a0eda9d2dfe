"""Files the artifact store writes: atomic, and readable the way a plain open() makes them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from shared.artifacts import atomic_write_bytes, process_umask


def test_atomic_writes_get_the_mode_the_umask_gives_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        assert process_umask() == 0o022
        p = atomic_write_bytes(tmp_path / "reports" / "run.html", b"<html/>")
        assert stat.S_IMODE(p.stat().st_mode) == 0o644  # 0o666 & ~0o022
        os.umask(0o077)
        q = atomic_write_bytes(tmp_path / "private.json", b"{}")
        assert stat.S_IMODE(q.stat().st_mode) == 0o600
    finally:
        os.umask(old)
    assert p.read_bytes() == b"<html/>"
    assert not [f for f in p.parent.iterdir() if f.name.endswith(".tmp")]
