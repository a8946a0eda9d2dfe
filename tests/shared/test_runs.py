"""The run config as an artifact: written once, read back only when its bytes match the reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts import RunRequested
from helox.runconfig import load_run_config
from shared.artifacts import ArtifactStore
from shared.runs import (
    RunConfigError,
    RunConfigMissingError,
    read_run_config,
    request_config,
    section,
    stages,
    write_run_config,
)

CONFIG = {"name": "r1", "stages": ["data", "train"], "train": {"optim": {"lr": 0.001}}}


def test_a_written_config_reads_back_through_its_reference(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    ref = write_run_config(store, "r1", CONFIG)
    assert store.resolve(ref.uri) == store.path("runs", "r1", "config.json")
    assert read_run_config(store, ref) == CONFIG
    assert section(read_run_config(store, ref), "train") == {"optim": {"lr": 0.001}}
    assert stages(CONFIG) == ["data", "train"] and stages({}) == ["data", "train", "eval", "export"]


def test_the_files_digest_is_the_run_configs_hash(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("name: hashed\nstages: [data, train]\ntrain: {optim: {lr: 0.002}, max_steps: 5}\n")
    cfg = load_run_config(path)
    ref = write_run_config(ArtifactStore(tmp_path / "store"), "hashed-1", cfg.pipeline_config())
    assert ref.sha256 == cfg.config_hash()


def test_a_config_is_written_once(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    first = write_run_config(store, "r1", CONFIG)
    assert write_run_config(store, "r1", dict(reversed(CONFIG.items()))) == first  # the same config again
    with pytest.raises(RunConfigError, match="already holds a different configuration for run 'r1'"):
        write_run_config(store, "r1", {**CONFIG, "stages": ["data"]})
    assert read_run_config(store, first) == CONFIG


def test_a_file_that_no_longer_matches_its_reference_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    ref = write_run_config(store, "r1", CONFIG)
    path = store.resolve(ref.uri)
    path.write_text(path.read_text().replace("0.001", "0.100"))  # same size, other bytes
    with pytest.raises(RunConfigError, match="does not match its reference"):
        read_run_config(store, ref)


def test_a_reference_outside_the_store_or_to_nothing_is_missing(tmp_path: Path) -> None:
    ref = write_run_config(ArtifactStore(tmp_path / "theirs"), "r1", CONFIG)
    with pytest.raises(RunConfigMissingError, match="not in the artifact store"):
        read_run_config(ArtifactStore(tmp_path / "ours"), ref)
    store = ArtifactStore(tmp_path / "theirs")
    store.resolve(ref.uri).unlink()
    with pytest.raises(RunConfigMissingError):
        read_run_config(store, ref)


def test_a_file_that_is_not_a_json_object_is_refused(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    store.atomic_write_bytes(store.path("runs", "r1", "config.json"), json.dumps([1, 2]).encode())
    with pytest.raises(RunConfigError, match="must hold a JSON object"):
        read_run_config(store, store.ref(store.path("runs", "r1", "config.json")))
    with pytest.raises(RunConfigError, match="not plain JSON"):
        write_run_config(store, "r2", {"lr": float("nan")})
    with pytest.raises(RunConfigError, match="'train' must be a mapping"):
        section({"train": [1]}, "train")


def test_a_request_without_a_reference_stands_for_its_inline_config_with_its_name_and_stages() -> None:
    request = RunRequested(name="outside", stages=["data", "train"], config={"train": {"max_steps": 3}},
                           config_hash="0" * 64)
    assert request_config(request) == {"name": "outside", "stages": ["data", "train"], "train": {"max_steps": 3}}
