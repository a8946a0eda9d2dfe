"""The histogram file of a dataset is byte-identical across processes (safetensors' metadata
order is per-process random: the same dataset used to get either of two digests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load

from services.data_prep.sharding import histogram_file_bytes

REPO = Path(__file__).resolve().parents[2]
SCRIPT = """
import hashlib, numpy as np
from services.data_prep.sharding import histogram_file_bytes
h = {"train/code": np.arange(300, dtype=np.int64), "val/docs": np.ones(300, dtype=np.int64)}
print(hashlib.sha256(histogram_file_bytes(h, {"vocab_size": "300", "dataset_version": "ds-x"})).hexdigest())
"""


def test_same_bytes_in_every_process() -> None:
    digests = {subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout for _ in range(8)}
    assert len(digests) == 1  # without the fix, 8 processes give both orders with probability ~0.99


def test_readable_and_metadata_sorted(tmp_path: Path) -> None:
    h = {"train/code": np.arange(300, dtype=np.int64), "val/code": np.full(300, 7, dtype=np.int64)}
    data = histogram_file_bytes(h, {"vocab_size": "300", "dataset_version": "ds-x"})
    assert {k: v.tolist() for k, v in load(data).items()} == {k: v.tolist() for k, v in h.items()}
    (tmp_path / "h.safetensors").write_bytes(data)
    with safe_open(str(tmp_path / "h.safetensors"), "np") as f:
        assert f.metadata() == {"dataset_version": "ds-x", "vocab_size": "300"}
    assert data.index(b'"dataset_version"') < data.index(b'"vocab_size"')
