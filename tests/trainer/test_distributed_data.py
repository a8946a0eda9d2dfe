"""The one factory (job.build_trainer) on a real TokenDataset built by data-prep, under torchrun
(2 gloo processes): ranks read disjoint slices that cover each global batch, the cursor moves
by the global batch, tokens_seen counts what was read, and the losses (train and validation)
are the one-process run's at the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.data_prep.pipeline import prepare_dataset
from services.trainer.distributed import DistContext
from services.trainer.job import build_trainer, train_config_for_manifest
from services.trainer.loop import TrainingError
from shared.artifacts import ArtifactStore
from tests.data_prep.conftest import make_config as data_config
from tests.data_prep.conftest import write_corpus

from .dataset_worker import BASE, record_run

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")
GLOBAL, SEQ, STEPS = 4, 32, 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dataset")
    write_corpus(root)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        return Path(prepare_dataset(data_config(), ArtifactStore(root / "store")).manifest_path)
    finally:
        os.chdir(cwd)


def torchrun_two(manifest: Path, out: Path, overrides: dict, *extra: str) -> list[dict]:
    """2 ranks of tests.trainer.dataset_worker; the whole process group is killed if it overruns."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--max-restarts=0", "-m", "tests.trainer.dataset_worker",
         "--manifest", str(manifest), "--out", str(out), "--overrides", json.dumps(overrides), *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail("torchrun overran 300 s: " + output[-3000:])
    assert proc.returncode == 0, output[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def one_and_two(manifest, tmp_path_factory):
    """The same global batch of 4: one process (one forward of 4) and two ranks of 2."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = record_run(manifest, tmp_path_factory.mktemp("one"), {})
    finally:
        torch.set_num_threads(before)
    two = torchrun_two(manifest, tmp_path_factory.mktemp("two"), {"batch": {"micro_batch_size": GLOBAL // 2}})
    return one, two


def test_ranks_read_disjoint_slices_that_make_up_the_global_batch(one_and_two):
    one, (r0, r1) = one_and_two
    assert sorted(map(int, r0["rows"])) == list(range(1, STEPS + 1))
    for step in r0["rows"]:
        a, b = r0["rows"][step], r1["rows"][step]
        assert len(a) == len(b) == GLOBAL // 2
        assert not set(map(tuple, a)) & set(map(tuple, b)), f"step {step}: both ranks trained on the same sample"
        assert a + b == one["rows"][step], f"step {step}: the ranks' samples are not the one-process batch"
    for m in r0["metrics"]:  # what each rank reports it read: [start, end) of the global sample index
        start = (m["step"] - 1) * GLOBAL
        assert m["sample_ranges"] == [[[start, start + 2]], [[start + 2, start + 4]]]
        assert m["data_cursor"] == m["step"] * GLOBAL
        assert m["tokens_seen"] == m["step"] * GLOBAL * SEQ
    assert [m["data_cursor"] for m in one["metrics"]] == [m["data_cursor"] for m in r0["metrics"]]
    assert [m["tokens_seen"] for m in one["metrics"]] == [m["tokens_seen"] for m in r0["metrics"]]


def test_two_ranks_train_and_validate_as_one_process_at_the_same_global_batch(one_and_two):
    one, (r0, r1) = one_and_two
    assert one["status"] == r0["status"] == "completed"
    assert r0["losses"] == r1["losses"]  # the loss is all-reduced: every rank reports the same
    assert one["losses"].keys() == r0["losses"].keys()
    for step, loss in one["losses"].items():
        assert r0["losses"][step] == pytest.approx(loss, abs=1e-5), step
    val_one = {m["step"]: m["val_loss"] for m in one["metrics"] if m["val_loss"] is not None}
    val_two = {m["step"]: m["val_loss"] for m in r0["metrics"] if m["val_loss"] is not None}
    assert sorted(val_one) == sorted(val_two) == [2, 4]  # eval.every 2
    for step, val in val_one.items():  # each rank evaluates its slice; the sums are all-reduced
        assert val_two[step] == pytest.approx(val, abs=1e-5), step


def test_a_global_batch_the_ranks_cannot_split_is_refused_naming_the_setting(manifest, tmp_path):
    cfg = train_config_for_manifest({**BASE, "batch": {"global_batch_size": 5, "micro_batch_size": 1, "seq_len": SEQ}},
                                    manifest)
    with pytest.raises(TrainingError, match=r"train\.batch\.global_batch_size \(5\) is not divisible by the world "
                       r"size \(2\)"):
        build_trainer(cfg, manifest, tmp_path, dist=DistContext(rank=0, world_size=2))


def test_ranks_reading_the_same_samples_stop_the_run_naming_the_cause(manifest, tmp_path):
    """The issue's bug, built by hand: a dataset without rank/world_size under two ranks."""
    r0, r1 = torchrun_two(manifest, tmp_path, {"batch": {"micro_batch_size": GLOBAL // 2}}, "--unsplit")
    for r in (r0, r1):
        assert "step 1: the ranks read 4 samples but the data cursor moved 2" in r["error"]
        assert "overlapping samples" in r["error"]
