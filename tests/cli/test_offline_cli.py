"""`helox train|eval|export|verify|data` without the bus, and their error paths: a user error is
one line on stderr naming what is at fault and exit 2, never a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from helox.cli import main
from shared.data.manifest import load_manifest
from tests.evaluator.helpers import build_dataset

REPO = Path(__file__).resolve().parents[2]

# 2 layers of width 64 for 6 steps, a checkpoint every 3: about a second of training.
TRAIN = {
    "model": "tiny",
    "model_overrides": {"n_layer": 2, "d_model": 64, "ffn_hidden": 192, "n_head": 2, "n_kv_head": 1, "max_seq_len": 128},
    "max_steps": 6,
    "device": "cpu",
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "batch": {"global_batch_size": 4, "micro_batch_size": 4, "seq_len": 32},
    "probes": {"enabled": False},
    "log": {"every": 2, "structlog": False, "wandb": {"mode": "disabled"}},
    "checkpoint": {"every": 3, "background": False},
}


@dataclass
class Workspace:
    root: Path
    version: str
    config: Path
    checkpoint: Path

    def run_config(self, name: str, **train: object) -> Path:
        path = self.root / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"name": name, "train": {**TRAIN, **train}}))
        return path


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return self.err.strip().splitlines()


def helox(capsys: pytest.CaptureFixture[str], *args: str | Path) -> Result:
    """`helox ARGS` in this process, through the real entry point (its error boundary included)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    got = capsys.readouterr()
    code = exit_.value.code
    return Result(code if isinstance(code, int) else 1, got.out, got.err)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: other processes share the 2 cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Workspace]:
    """A prepared dataset in the store HELOX_ARTIFACTS names, and one 6-step run trained on it."""
    root = tmp_path_factory.mktemp("offline-cli")
    with pytest.MonkeyPatch.context() as mp:
        for key in ("HELOX_REDIS_URL", "HELOX_CONFIG", "HELOX_SIGNING_KEY"):
            mp.delenv(key, raising=False)
        mp.setenv("HELOX_ARTIFACTS", str(root / "store"))
        mp.setenv("HELOX_STATE_DIR", str(root / "state"))
        torch.set_num_threads(1)
        version = load_manifest(build_dataset(root, n_prose=60, n_code=40, val_fraction=0.2)).version
        w = Workspace(root, version, root / "run.yaml", root / "run" / "checkpoints" / "step-000000006")
        w.config.write_text(yaml.safe_dump({"name": "cli", "train": TRAIN}))
        with pytest.raises(SystemExit) as exit_:
            main(["train", str(w.config), "--dataset", version, "--out", str(root / "run")])
        assert exit_.value.code == 0
        yield w


def test_train_runs_to_its_last_step_and_resume_latest_continues_from_the_checkpoint(ws, capsys) -> None:
    assert (ws.checkpoint / "manifest.json").is_file()
    longer = ws.run_config("cli-longer", max_steps=8)
    shutil.copytree(ws.root / "run", ws.root / "run-longer")
    res = helox(capsys, "train", longer, "--dataset", ws.version, "--out", ws.root / "run-longer", "--resume", "latest")
    assert res.code == 0, res.err
    assert "completed: step 8" in res.out and "step 8: loss" in res.out
    assert "step 2: loss" not in res.out  # it went on from step 6, not from the start
    assert (ws.root / "run-longer" / "checkpoints" / "step-000000008").is_dir()


def test_resume_latest_with_no_checkpoint_is_one_line_and_exit_2_without_traceback(ws) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "80"}
    proc = subprocess.run(
        [sys.executable, "-m", "helox.cli", "train", str(ws.config), "--dataset", ws.version,
         "--out", str(ws.root / "never-trained"), "--resume", "latest"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr
    assert line.startswith("error: no valid checkpoint") and "never-trained" in line


def test_train_with_a_bad_config_field_names_the_field(ws, capsys) -> None:
    res = helox(capsys, "train", ws.run_config("bad-lr", optim={"lr": -1.0}), "--dataset", ws.version)
    assert res.code == 2
    (line,) = res.err_lines
    assert "train.optim.lr" in line and "bad-lr.yaml" in line
    typo = helox(capsys, "train", ws.run_config("typo", max_stepz=3), "--dataset", ws.version)
    assert typo.code == 2
    (line,) = typo.err_lines
    assert "train.max_stepz" in line


def test_train_on_an_unknown_dataset_version_names_it(ws, capsys) -> None:
    res = helox(capsys, "train", ws.config, "--dataset", "ds-nope")
    assert res.code == 2
    (line,) = res.err_lines
    assert "no dataset 'ds-nope'" in line and str(ws.root / "store") in line


def test_data_inspect_and_verify_of_an_unknown_version_exit_2(ws, capsys) -> None:
    for command in ("inspect", "verify"):
        res = helox(capsys, "data", command, "ds-missing")
        assert res.code == 2, command
        (line,) = res.err_lines
        assert "no dataset 'ds-missing'" in line
    ok = helox(capsys, "data", "verify", ws.version)
    assert ok.code == 0 and "ok" in ok.out


def test_eval_of_a_checkpoint_writes_its_results_on_the_checkpoints_dataset(ws, capsys) -> None:
    out = ws.root / "eval-out"
    res = helox(capsys, "eval", ws.checkpoint, "--out", out)
    assert res.code == 0, res.out + res.err
    assert (out / "results.json").is_file() and "parity" in res.out
    missing = helox(capsys, "eval", ws.root / "no-such-checkpoint")
    assert missing.code == 2
    (line,) = missing.err_lines
    assert "no-such-checkpoint" in line


def test_export_then_verify_passes_and_a_tampered_export_fails_naming_the_file(ws, capsys) -> None:
    res = helox(capsys, "export", ws.checkpoint, "--out", ws.root / "exports", "--format", "native")
    assert res.code == 0, res.out + res.err
    (export,) = [p for p in (ws.root / "exports").iterdir() if p.is_dir()]
    good = helox(capsys, "verify", export)
    assert good.code == 0 and good.out.strip().endswith("OK"), good.out
    config = export / "native" / "config.json"
    config.write_text(config.read_text().replace('"format"', '"formats"', 1))
    bad = helox(capsys, "verify", export)
    assert bad.code == 1
    assert "FAILED: digests" in bad.out and "native/config.json" in bad.out


def test_export_of_a_corrupt_checkpoint_is_one_line_naming_the_file(ws, capsys) -> None:
    corrupt = ws.root / "corrupt-checkpoint"
    shutil.copytree(ws.checkpoint, corrupt)
    weights = corrupt / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    res = helox(capsys, "export", corrupt, "--out", ws.root / "exports-bad", "--format", "native")
    assert res.code == 2
    (line,) = res.err_lines
    assert "corrupt-checkpoint is corrupt" in line and "model.safetensors" in line
    assert not (ws.root / "exports-bad").exists() or not any((ws.root / "exports-bad").rglob("manifest.json"))


def test_an_unexpected_exception_keeps_its_traceback(ws, monkeypatch) -> None:
    import helox.common

    def broken(*_a: object) -> Path:
        raise RuntimeError("a bug, not a user error")

    monkeypatch.setattr(helox.common, "manifest_path", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["data", "inspect", ws.version])


def test_the_run_sample_comes_from_the_verified_export_and_a_tampered_one_is_refused(ws, capsys) -> None:
    import sentencepiece as spm

    from helox import common
    from helox.sample import SampleError, sample_export

    res = helox(capsys, "export", ws.checkpoint, "--out", ws.root / "exports-sample", "--format", "native")
    assert res.code == 0, res.out + res.err
    (export,) = [p for p in (ws.root / "exports-sample").iterdir() if p.is_dir()]
    key = common.signing_key(common.settings())
    text = sample_export(export, key, "def ", max_new_tokens=8)
    assert text == sample_export(export, key, "def ", max_new_tokens=8)  # greedy: the same every time
    sp = spm.SentencePieceProcessor(model_file=str(export / "native" / "tokenizer.model"))
    assert len(sp.encode(text)) <= 8
    with pytest.raises(SampleError, match="signature"):
        sample_export(export, "not-the-key", "def ")
    weights = export / "native" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(SampleError, match="digests"):
        sample_export(export, key, "def ")
