"""`helox data prepare|inspect|verify` run the pipeline without the bus."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.data_prep.conftest import make_config, write_corpus

REPO = Path(__file__).resolve().parents[2]


def _helox(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HELOX_ARTIFACTS": str(cwd / "store"), "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    env.pop("HELOX_REDIS_URL", None)
    return subprocess.run([sys.executable, "-m", "helox.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_prepare_inspect_verify_and_a_corrupt_shard(tmp_path: Path) -> None:
    write_corpus(tmp_path)
    data = make_config().model_dump(mode="json")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"name": "cli", "corpus": data.pop("corpus"), "data": data}))
    prep = _helox(["data", "prepare", "run.yaml"], tmp_path)
    assert prep.returncode == 0, prep.stderr + prep.stdout
    version = prep.stdout.split("dataset ")[-1].split(":")[0].split()[0]
    assert "near_dedup" in prep.stdout
    inspect = _helox(["data", "inspect", version], tmp_path)
    assert inspect.returncode == 0 and version in inspect.stdout
    assert _helox(["data", "verify", version], tmp_path).returncode == 0
    shard = next((tmp_path / "store" / "datasets" / version).rglob("*.bin"))
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    bad = _helox(["data", "verify", version], tmp_path)
    assert bad.returncode == 1 and shard.name in bad.stderr
    again = _helox(["data", "prepare", "run.yaml"], tmp_path)  # the corrupt copy is not reused: rebuilt
    assert again.returncode == 0 and "(reused)" not in again.stdout
    assert f"rebuilt: shard {shard.relative_to(shard.parents[2]).as_posix()} failed its digest" in again.stdout
    assert _helox(["data", "verify", version], tmp_path).returncode == 0
    third = _helox(["data", "prepare", "run.yaml"], tmp_path)
    assert third.returncode == 0 and "(reused)" in third.stdout and "reused (verified" in third.stdout


def test_prepare_with_a_bad_config_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("name: x\ndata:\n  tokenizer:\n    vocab_sise: 10\n")
    out = _helox(["data", "prepare", "run.yaml"], tmp_path)
    assert out.returncode == 2 and "vocab_sise" in out.stderr
