"""torchrun with 2 processes on gloo/CPU: DDP (+ZeRO) and FSDP2 (+CPU offload) match one process,
and checkpoints move between world sizes (2 -> 1 -> 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.trainer.loop import Trainer

from .helpers import Recorder, make_config

REPO = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).parent / "torchrun"
pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to the interpreter")

# Two ranks x micro-batch 2 x accumulation 2 = the single process's global batch of 8.
TWO_RANKS = {"batch": {"micro_batch_size": 2}}


def torchrun(out: Path, overrides: dict, *extra: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "tests.trainer.worker", "--out", str(out),
         "--overrides", json.dumps(overrides), *extra],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    result = json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:])
    result["losses"] = {int(k): v for k, v in result["losses"].items()}
    return result


def assert_close(got: dict[int, float], want: dict[int, float]) -> None:
    assert got, "no losses"
    for step, loss in got.items():
        assert loss == pytest.approx(want[step], rel=1e-5, abs=1e-5), step


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 8 as 2 micro-batches of 4."""
    from services.trainer.data import InMemoryBatchSource

    from .helpers import make_domains

    out = tmp_path_factory.mktemp("ref")
    return Trainer(make_config(), InMemoryBatchSource(make_domains(), seq_len=32, batch_size=4), out).fit().losses


@pytest.mark.parametrize("zero", [False, True], ids=["ddp", "ddp-zero"])
def test_ddp_matches_one_process_and_resumes_on_one(reference, source, tmp_path, zero):
    over = {**TWO_RANKS, "distributed": {"strategy": "ddp", "zero": zero}, "checkpoint": {"every": 4}}
    result = torchrun(tmp_path / "ddp", over)
    assert result["status"] == "completed" and sorted(result["losses"]) == list(range(1, 9))
    assert_close(result["losses"], reference)
    resumed = Trainer(make_config(), source(), tmp_path / "one").fit(
        resume=tmp_path / "ddp" / "checkpoints" / "step-000000004")
    assert sorted(resumed.losses) == [5, 6, 7, 8]
    assert_close(resumed.losses, reference)


def test_fsdp2_with_cpu_offload_matches_one_process_and_moves_2_to_1_to_2(reference, source, tmp_path):
    over = {**TWO_RANKS, "distributed": {"strategy": "fsdp", "cpu_offload": True}, "checkpoint": {"every": 3}}
    two = torchrun(tmp_path / "two", over, "--stop-after", "3")
    assert two["status"] == "stopped" and sorted(two["losses"]) == [1, 2, 3]
    assert_close(two["losses"], reference)

    one = Trainer(make_config(), source(), tmp_path / "one",
                  callbacks=[Recorder(at={6: lambda t: t.request_stop()})]).fit(
        resume=tmp_path / "two" / "checkpoints" / "step-000000003")
    assert sorted(one.losses) == [4, 5, 6]
    assert_close(one.losses, reference)

    back = torchrun(tmp_path / "back", over, "--resume", str(tmp_path / "one" / "checkpoints" / "step-000000006"))
    assert back["status"] == "completed" and sorted(back["losses"]) == [7, 8]
    assert_close(back["losses"], reference)
