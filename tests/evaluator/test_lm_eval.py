"""The lm-evaluation-harness adapter runs local tasks (JSONL data, no hub) end to end, and its
numbers agree with direct computations."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from services.evaluator.lm_eval_adapter import HeloxLM, run_lm_eval

TASKS = Path(__file__).parent / "lm_eval_tasks"


class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """The task YAMLs with the data file and a private datasets cache filled in."""
    out = tmp_path / "tasks"
    out.mkdir()
    for y in TASKS.glob("*.yaml"):
        text = y.read_text().replace("__DATA__", str(TASKS / "python_items.jsonl"))
        (out / y.name).write_text(text.replace("__CACHE__", str(tmp_path / "hf-cache")))
    return out


def test_local_tasks_run_end_to_end(trained, tokenizer, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    lm = HeloxLM(trained, tokenizer, batch_size=4)
    res = run_lm_eval(lm, ["helox_python_mc", "helox_python_gen", "helox_python_ppl"], include_path=task_dir)
    r = res["results"]
    assert 0.0 <= r["helox_python_mc"]["acc,none"] <= 1.0
    assert 0.0 <= r["helox_python_mc"]["acc_norm,none"] <= 1.0
    assert 0.0 <= r["helox_python_gen"]["exact_match,none"] <= 1.0
    assert 0 < r["helox_python_ppl"]["bits_per_byte,none"] < 10
    assert len(res["samples"]["helox_python_mc"]) == 4
    gens = [s["resps"][0][0] for s in res["samples"]["helox_python_gen"]]
    assert all("\n" not in g for g in gens)


def test_checkpoint_and_dataset_arguments_build_the_model(checkpoint, dataset):
    lm = HeloxLM.create_from_arg_string(f"checkpoint={checkpoint},dataset={dataset},batch_size=2")
    assert lm.batch_size == 2 and lm.max_length == 256
    [(lp, _)] = lm.loglikelihood([_Req("x = ", "1")])
    assert math.isfinite(lp) and lp < 0


@torch.no_grad()
def test_rolling_loglikelihood_is_the_sum_over_the_document(trained, tokenizer):
    lm = HeloxLM(trained, tokenizer)
    text = "def add(a, b):\n    return a + b\n" * 3
    [rolling] = lm.loglikelihood_rolling([_Req(text)])
    ids = torch.tensor([3] + tokenizer.encode(text))
    direct = -F.cross_entropy(trained(ids[None, :-1])[0], ids[1:], reduction="sum").item()
    assert rolling == pytest.approx(direct, abs=1e-3)
    # longer than the context: windows of max_length, each token still scored once
    lm.max_length = 16
    [chunked] = lm.loglikelihood_rolling([_Req(text)])
    assert math.isfinite(chunked) and chunked != pytest.approx(direct, abs=1e-3)


def test_generate_until_stops_at_until_strings(trained, tokenizer):
    lm = HeloxLM(trained, tokenizer)
    free, cut = lm.generate_until([_Req("class A:\n", {"max_gen_toks": 16, "until": []}),
                                   _Req("class A:\n", {"max_gen_toks": 16, "until": [" "]})])
    assert " " not in cut and free.startswith(cut)
