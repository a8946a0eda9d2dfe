"""Suites: file formats and validation, each scorer type end to end on the model, generation with
the KV cache (batched = one by one), continuation log-probs against a direct computation."""

from __future__ import annotations

import json

import pytest
import torch

from services.evaluator.config import DEFAULT_SUITES_DIR, EvalConfig
from services.evaluator.suites import (
    Suite,
    SuiteError,
    cut_at_stop,
    generate_texts,
    load_suite,
    load_suites,
    run_suite,
    split_continuation,
    token_logprobs,
)

EOS = 3


def test_default_suites_load_and_cover_every_scorer():
    suites = load_suites(DEFAULT_SUITES_DIR)
    scorers = {it.scorer for s in suites for it in s.items}
    assert scorers == {"exact", "contains", "similarity", "loglik_choice"}
    assert len({s.name for s in suites}) == len(suites)


def test_yaml_defaults_apply_and_jsonl_names_the_suite_after_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "name: alpha\ndefaults: {scorer: contains, case_fold: true}\n"
        "items:\n  - {id: one, prompt: 'x = ', expected: '1'}\n  - {id: two, prompt: 'y', expected: z, scorer: exact}\n"
    )
    (tmp_path / "beta.jsonl").write_text(
        json.dumps({"id": "q", "prompt": "p", "scorer": "loglik_choice", "choices": ["a", "b"], "answer": 1}) + "\n\n"
    )
    alpha, beta = load_suites(tmp_path)
    assert alpha.name == "alpha" and beta.name == "beta"
    assert alpha.items[0].scorer == "contains" and alpha.items[0].case_fold
    assert alpha.items[1].scorer == "exact"
    assert beta.items[0].answer == 1


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ('{"id": "q", "prompt": "p", "scorer": "loglik_choice", "choices": ["a"], "answer": 3}', "answer index"),
        ('{"id": "q", "prompt": "p", "scorer": "exact"}', "needs 'expected'"),
        ('{"id": "q", "prompt": "p", "expected": "x", "bogus": 1}', "bogus"),
        ('{"id": "q", "prompt": "p", "expected": "x"}\n{"id": "q", "prompt": "r", "expected": "y"}', "repeats item ids"),
        ("not json", "invalid suite file"),
    ],
)
def test_invalid_suite_files_are_refused_with_the_reason(tmp_path, body, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(body)
    with pytest.raises(SuiteError, match=match):
        load_suite(path)


def test_missing_suite_directory_is_refused(tmp_path):
    with pytest.raises(SuiteError, match="does not exist"):
        load_suites(tmp_path / "nope")


def test_cut_at_stop_takes_the_earliest_stop():
    assert cut_at_stop("abc\ndef)", ["\n", ")"]) == "abc"
    assert cut_at_stop("abc", ["\n"]) == "abc"
    assert cut_at_stop("abc", [""]) == "abc"


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(trained, tokenizer):
    prompts = ["def __init__(self", "import os\nimport ", "    return ", "class A:\n    def __len__(self):\n        "]
    together = generate_texts(trained, tokenizer, prompts, max_new_tokens=8, prefix_id=EOS, eos_id=EOS, batch_size=4)
    alone = [generate_texts(trained, tokenizer, [p], max_new_tokens=8, prefix_id=EOS, eos_id=EOS)[0] for p in prompts]
    assert together == alone
    assert any(together)


@torch.no_grad()
def test_token_logprobs_equal_a_direct_log_softmax(trained, tokenizer):
    ctx, cont = split_continuation(tokenizer, "def add(a, b):\n    return ", "a + b")
    assert tokenizer.decode(ctx + cont) == "def add(a, b):\n    return a + b"
    [(lp, greedy)] = token_logprobs(trained, [([EOS] + ctx, cont)])
    full = torch.tensor([EOS] + ctx + cont)
    logp = trained(full[None, :-1])[0].log_softmax(-1)
    n = len(cont)
    direct = logp[-n:].gather(-1, full[-n:, None]).sum().item()
    assert lp == pytest.approx(direct, abs=1e-4)
    assert greedy == bool((logp[-n:].argmax(-1) == full[-n:]).all())
    # batching with right padding changes nothing
    many = token_logprobs(trained, [([EOS] + ctx, cont), ([EOS], tokenizer.encode("x")), ([EOS] + ctx, cont)],
                          batch_size=3)
    assert many[0][0] == pytest.approx(lp, abs=1e-4) and many[2][0] == pytest.approx(lp, abs=1e-4)


def test_split_continuation_moves_trailing_spaces_into_the_continuation(tokenizer):
    ctx, cont = split_continuation(tokenizer, "x = ", "1")
    assert tokenizer.decode(ctx) == "x ="
    assert tokenizer.decode(cont).startswith(" ") or tokenizer.decode(ctx + cont) == "x = 1"


def test_each_scorer_type_scores_the_models_own_outputs(trained, tokenizer):
    cfg = EvalConfig(generation={"max_new_tokens": 8, "stop": []})
    prompts = {"p1": "def __init__(self", "p2": "    return ", "p3": "import "}
    outs = generate_texts(trained, tokenizer, list(prompts.values()), max_new_tokens=8, prefix_id=EOS, eos_id=EOS)
    got = dict(zip(prompts, outs, strict=True))
    # the model's own output, re-spaced and upper-cased: exact with case folding must accept it
    shouted = "  " + "  ".join(got["p1"].split()).upper() + "\n"
    items = [
        {"id": "exact_fold", "prompt": prompts["p1"], "expected": shouted, "case_fold": True},
        {"id": "exact_nofold", "prompt": prompts["p1"], "expected": shouted + "x"},
        {"id": "contains_hit", "scorer": "contains", "prompt": prompts["p2"], "expected": got["p2"].split()[0][:3]},
        {"id": "contains_miss", "scorer": "contains", "prompt": prompts["p2"], "expected": "\u2603 snowman"},
        {"id": "sim_same", "scorer": "similarity", "prompt": prompts["p3"], "expected": got["p3"]},
        {"id": "sim_other", "scorer": "similarity", "prompt": prompts["p3"], "expected": "zzzz qqqq"},
        {"id": "mc", "scorer": "loglik_choice", "prompt": "if __name__ == ", "choices": ['"__main__":', "@@@@"],
         "answer": 0},
    ]
    suite = Suite(name="t", items=items)
    res = run_suite(trained, tokenizer, suite, cfg, eos_id=EOS)
    by = {r.id: r for r in res.items}
    assert all("".join(o.split()) for o in got.values()), f"the test model should produce some text: {got}"
    assert by["exact_fold"].score == 1.0
    assert by["exact_nofold"].score == 0.0
    assert by["contains_hit"].score == 1.0
    assert by["contains_miss"].score == 0.0
    assert by["sim_same"].score == pytest.approx(1.0)
    assert by["sim_other"].score < 0.5
    assert by["mc"].choice_logprobs is not None and len(by["mc"].choice_logprobs) == 2
    assert by["mc"].score == float(by["mc"].choice_logprobs[0] > by["mc"].choice_logprobs[1])
    assert "acc_norm" in by["mc"].extra and set(res.metrics) == {"acc", "acc_norm"}
    assert res.score == pytest.approx(sum(r.score for r in res.items) / len(items))
    assert res.n == len(items) and set(res.by_scorer) == {"exact", "contains", "similarity", "loglik_choice"}
    assert by["exact_fold"].output == got["p1"]


def test_similarity_items_can_use_embeddings(trained, tokenizer):
    pytest.importorskip("sentence_transformers")
    suite = Suite(name="e", items=[{"id": "a", "scorer": "similarity", "similarity": "embedding",
                                    "prompt": "    def close(self):\n        ", "expected": "Close the file."}])
    res = run_suite(trained, tokenizer, suite, EvalConfig(), eos_id=EOS)
    assert 0.0 <= res.items[0].score <= 1.0 and "cosine" in res.items[0].extra
