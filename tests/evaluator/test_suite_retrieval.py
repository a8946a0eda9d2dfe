"""Retrieval-conditioned suite items: prompts packed exactly as data prep packed the training
windows, both scores (with and without retrieved context) computed from the right token ids and
reported, and a run without retrieval skipping such items with a note."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts import RetrievalQuery
from services.evaluator.config import DEFAULT_SUITES_DIR, EvalConfig
from services.evaluator.heldout import dataset_tokenizer
from services.evaluator.retrieval_gain import RagPrompter, RetrievalGainError
from services.evaluator.suites import Suite, load_suite, run_suite
from shared.artifacts import ArtifactStore
from shared.data.config import (
    CorpusConfig,
    CorpusSource,
    DataPrepConfig,
    FilterConfig,
    MinHashConfig,
    RagConfig,
    ShardingConfig,
    TokenizerConfig,
)
from shared.data.manifest import MASK_BASE, MASK_PAD, load_manifest
from shared.model import Llama, model_preset
from shared.retrieval import LocalIndex
from tests.evaluator.test_retrieval_gain import _facts_corpus


@pytest.fixture(scope="module")
def rag_dataset(tmp_path_factory) -> Path:
    from services.data_prep.pipeline import prepare_dataset

    root = tmp_path_factory.mktemp("facts-suite")
    _facts_corpus(root, n_facts=40)
    cfg = DataPrepConfig(
        corpus=CorpusConfig(sources=[CorpusSource(path="corpus/facts", domain="facts")], roots=["corpus"]),
        filters=FilterConfig(min_doc_chars=16),
        minhash=MinHashConfig(enabled=False),
        tokenizer=TokenizerConfig(vocab_size=320),
        sharding=ShardingConfig(shard_tokens=20_000, val_fraction=0.15, workers=1),
        rag=RagConfig(retriever="local", seq_len=48, k=2, context_budget=0.5, chunk_tokens=8, query_chars=200),
    )
    return prepare_dataset(cfg, ArtifactStore(root / "store"), base_dir=root).manifest_path


@pytest.fixture(scope="module")
def model(rag_dataset) -> Llama:
    """An untrained tiny model: the figures are checked against hand computations, not quality."""
    torch.manual_seed(0)
    m = Llama(model_preset("tiny", vocab_size=load_manifest(rag_dataset).tokenizer.vocab_size, n_layer=1, d_model=32,
                           n_head=2, n_kv_head=2, ffn_hidden=64, max_seq_len=64))
    return m.eval()


def _suite(tmp_path: Path, body: str) -> Suite:
    (tmp_path / "s.yaml").write_text(body)
    return load_suite(tmp_path / "s.yaml")


def test_prompt_packing_reproduces_the_training_records(rag_dataset):
    """Every training record that got chunks, rebuilt from its base tokens and the chunks the
    retrieval report lists, equals the shard's record with its padding dropped."""
    sp = dataset_tokenizer(rag_dataset)
    rag, note = RagPrompter.of(rag_dataset, sp)
    assert rag is not None and "local index" in note and "k=2" in note
    m = load_manifest(rag_dataset)
    index = LocalIndex.load(rag_dataset.parent / m.rag.index.path)
    text_of = {c.chunk_id: c.text for c in index.chunks}
    report = {}
    for line in (rag_dataset.parent / m.rag.report.path).read_text().splitlines():
        rec = json.loads(line)
        report[rec["window"]] = [c["chunk_id"] for c in rec["chunks"]]
    w = m.rag.record_tokens
    checked = with_chunks = 0
    for shard in m.shards_for("train", "facts"):
        toks = np.fromfile(rag_dataset.parent / shard.path, dtype=shard.dtype).astype(np.int64).reshape(-1, w)
        kinds = np.fromfile(rag_dataset.parent / shard.mask.path, dtype=np.uint8).reshape(-1, w)
        for n, (t, k) in enumerate(zip(toks, kinds, strict=True), start=checked):
            chunk_ids = report[f"train/facts/{n}"]
            ids, used = rag.pack_base(t[k == MASK_BASE], [sp.encode(text_of[c]) for c in chunk_ids])
            assert ids == t[k != MASK_PAD].tolist(), f"record {n}"
            assert used == len(chunk_ids)
            with_chunks += used > 0
        checked += len(toks)
    assert checked > 20 and with_chunks > 0.8 * checked


def test_an_item_prompt_is_laid_out_by_hand_as_training_packs(rag_dataset):
    sp = dataset_tokenizer(rag_dataset)
    rag, _ = RagPrompter.of(rag_dataset, sp)
    m = load_manifest(rag_dataset)
    b = m.rag.boundary_ids
    eos = m.tokenizer.eos_id
    # The layout: 49-token records, a context budget of int(0.5 * 49) = 24 tokens.
    assert (rag.layout.record_tokens, rag.layout.context_tokens, rag.k) == (49, 24, 2)
    found = rag.retrieve(["record item3 holds"])[0]
    hits = LocalIndex.load(rag_dataset.parent / m.rag.index.path).search(
        [RetrievalQuery(query_id="q", text="record item3 holds", k=2)])[0]
    assert [c for c, _ in found] == [c.chunk_id for c, _ in hits] and len(found) == 2
    assert [ids for _, ids in found] == [sp.encode(c.text) for c, _ in hits]
    prompt = sp.encode("record item3 holds:")
    (c1, ids1), _ = found
    # pack_record by hand: a fact's line is one chunk of more than the 24 - 2 tokens left inside the
    # first <ctx> ... </ctx>, so it is cut to 22 tokens and packing stops there (no second chunk).
    assert len(ids1) > 22
    expected = [b["<ctx>"], *ids1[:22], b["</ctx>"], b["<doc>"], eos, *prompt]
    p = rag.pack(prompt, found)
    assert p.with_ids == expected
    assert p.without_ids == [b["<doc>"], eos, *prompt]
    assert p.chunk_ids == [c1] and p.context_tokens == 24
    # The text of the retrieved part is the start of the top chunk.
    assert sp.decode(p.with_ids[1:23]) == sp.decode(ids1[:22])
    with pytest.raises(ValueError, match="more than the 24"):
        rag.pack(list(range(5, 30)), found)  # 26 base tokens with EOS: the layout leaves 49 - 1 - 24 = 24


def _logprob(model, ids: list[int], cont: list[int]) -> float:
    x = torch.tensor([ids + cont])
    with torch.no_grad():
        logp = model(x[:, :-1]).float().log_softmax(-1)[0]
    n = len(ids)
    return float(sum(logp[n - 1 + j, t] for j, t in enumerate(cont)))


def test_both_scores_come_from_the_right_prompts_and_are_reported(rag_dataset, model, tmp_path):
    sp = dataset_tokenizer(rag_dataset)
    rag, note = RagPrompter.of(rag_dataset, sp)
    suite = _suite(tmp_path, (
        "name: facts_rag\n"
        "items:\n"
        "  - {id: mc, retrieval: true, query: 'record item3 holds', prompt: 'record item3 holds:', "
        "scorer: loglik_choice, choices: [' red', ' blue', ' moon'], answer: 1}\n"
        "  - {id: gen, retrieval: true, prompt: 'the item5 entry reads:', scorer: contains, expected: 'zzz', "
        "max_new_tokens: 4}\n"
        "  - {id: plain, prompt: 'copy of item1 says:', scorer: loglik_choice, choices: [' red', ' blue'], answer: 0}\n"))
    eos = load_manifest(rag_dataset).tokenizer.eos_id
    res = run_suite(model, sp, suite, EvalConfig(suites_dir=None), eos_id=eos, rag=rag, rag_note=note)
    items = {r.id: r for r in res.items}
    assert res.n == 3 and not res.skipped

    # The multiple-choice item: both log-prob vectors recomputed by a plain forward pass on the
    # hand-packed ids.
    b = load_manifest(rag_dataset).rag.boundary_ids
    found = rag.retrieve(["record item3 holds"])[0]
    ctx = sp.encode("record item3 holds:")
    with_ids = rag.pack(ctx, found).with_ids
    assert with_ids[0] == b["<ctx>"] and with_ids[-len(ctx) - 2:] == [b["<doc>"], eos, *ctx]
    mc = items["mc"]
    conts = [sp.encode("record item3 holds: " + c.strip())[len(ctx):] for c in [" red", " blue", " moon"]]
    assert mc.choice_logprobs == pytest.approx([_logprob(model, with_ids, c) for c in conts], abs=1e-4)
    assert mc.choice_logprobs_without_retrieval == pytest.approx(
        [_logprob(model, [b["<doc>"], eos, *ctx], c) for c in conts], abs=1e-4)
    assert mc.score == float(int(np.argmax(mc.choice_logprobs)) == 1)
    assert mc.score_without_retrieval == float(int(np.argmax(mc.choice_logprobs_without_retrieval)) == 1)
    assert mc.retrieved == rag.pack(ctx, found).chunk_ids and mc.retrieval
    # The plain item: EOS + prompt, as before.
    pctx = sp.encode("copy of item1 says:")
    pconts = [sp.encode("copy of item1 says: " + c.strip())[len(pctx):] for c in [" red", " blue"]]
    assert items["plain"].choice_logprobs == pytest.approx([_logprob(model, [eos, *pctx], c) for c in pconts],
                                                           abs=1e-4)
    assert not items["plain"].retrieval and items["plain"].score_without_retrieval is None
    # Generation: the item's query defaults to its prompt; outputs of both prompts kept.
    gen = items["gen"]
    assert gen.output is not None and gen.output_without_retrieval is not None and gen.retrieved
    # The suite's aggregates: the retrieval items' means with and without, and their difference.
    r = res.retrieval
    assert r["n"] == 2
    assert r["score_with"] == pytest.approx((mc.score + gen.score) / 2)
    assert r["score_without"] == pytest.approx((mc.score_without_retrieval + gen.score_without_retrieval) / 2)
    assert r["gain"] == pytest.approx(r["score_with"] - r["score_without"])
    assert res.score == pytest.approx((mc.score + gen.score + items["plain"].score) / 3)


def test_evaluate_reports_with_and_without_in_results_and_the_event(rag_dataset, model, tmp_path):
    from services.evaluator.evaluate import evaluate_checkpoint, evaluation_completed, format_report
    from shared.checkpoint import save_checkpoint

    suites = tmp_path / "suites"
    suites.mkdir()
    (suites / "facts_rag.yaml").write_text(
        "name: facts_rag\ndefaults: {retrieval: true, scorer: loglik_choice, answer: 0}\nitems:\n"
        + "".join(f"  - {{id: f{i}, query: 'item{i} holds', prompt: 'record item{i} holds:', "
                  f"choices: [' red', ' blue', ' moon', ' wolf']}}\n" for i in range(6)))
    (suites / "plain.yaml").write_text("name: plain\nitems:\n  - {id: a, prompt: 'record', scorer: loglik_choice, "
                                       "choices: [' item1', ' zzz'], answer: 0}\n")
    info = save_checkpoint(tmp_path / "ckpt", 1, {k: v.clone() for k, v in model.state_dict().items()},
                           {"step": 1, "model_config": model.config.model_dump(mode="json")}, metric=1.0,
                           meta={"reason": "final", "dataset_version": load_manifest(rag_dataset).version})
    cfg = EvalConfig(seq_len=48, suites_dir=suites, parity={"enabled": False}, retrieval={"enabled": False})
    report = evaluate_checkpoint(info.path, rag_dataset, cfg, out_dir=tmp_path / "out")
    saved = json.loads(Path(report.results_path).read_text())
    items = saved["measurement"]["suites"][0]["items"]
    assert [s["name"] for s in saved["measurement"]["suites"]] == ["facts_rag", "plain"]
    assert all(it["retrieval"] and it["retrieved"] and it["score_without_retrieval"] in (0.0, 1.0) for it in items)
    with_ = sum(it["score"] for it in items) / 6
    without = sum(it["score_without_retrieval"] for it in items) / 6
    assert report.suite_retrieval == {"facts_rag": pytest.approx(
        {"n": 6.0, "score_with": with_, "score_without": without, "gain": with_ - without,
         "context_tokens_per_item": sum(it["context_tokens"] for it in items) / 6})}
    assert report.suite_scores["facts_rag"] == pytest.approx(with_) and "plain" in report.suite_scores
    assert saved["report"]["suite_retrieval"] == report.suite_retrieval
    event = evaluation_completed(report)
    assert event.suite_retrieval == report.suite_retrieval and event.SCHEMA_VERSION == "1.3"
    assert "retrieval items:" in format_report(report) and "without" in format_report(report)


def test_a_run_without_retrieval_skips_retrieval_items_with_a_note(dataset, trained, tokenizer, checkpoint, tmp_path):
    """`dataset`/`trained`/`checkpoint`: the session's plain (no rag:) dataset and model."""
    rag, note = RagPrompter.of(dataset, tokenizer)
    assert rag is None and "no rag: section" in note and "RAG-trained run" in note
    suite = _suite(tmp_path, (
        "name: mixed\nitems:\n"
        "  - {id: r, retrieval: true, prompt: 'def ', scorer: loglik_choice, choices: [' a', ' b'], answer: 0}\n"
        "  - {id: p, prompt: 'def ', scorer: loglik_choice, choices: [' a', ' b'], answer: 0}\n"))
    eos = load_manifest(dataset).tokenizer.eos_id
    res = run_suite(trained, tokenizer, suite, EvalConfig(suites_dir=None), eos_id=eos, rag=None, rag_note=note)
    assert [r.id for r in res.items] == ["p"] and res.n == 1 and res.retrieval is None
    assert res.skipped == {"r": f"retrieval item skipped: {note}"}

    # Through evaluate_checkpoint, with the shipped suites: rag_stdlib (all retrieval items) is
    # reported as skipped, has no score, and the other suites are scored as before.
    from services.evaluator.evaluate import evaluate_checkpoint, format_report

    cfg = EvalConfig(seq_len=64, max_val_tokens=2000, parity={"enabled": False}, bootstrap_samples=100)
    report = evaluate_checkpoint(checkpoint, dataset, cfg, out_dir=tmp_path / "out")
    assert report.verdict != "error", report.error
    assert "rag_stdlib" not in report.suite_scores and "python_completion" in report.suite_scores
    assert report.suite_notes["rag_stdlib"].startswith("17 of 17 items skipped (retrieval item skipped: dataset ")
    assert report.suite_retrieval == {}
    assert "rag_stdlib" in format_report(report) and "skipped" in format_report(report)
    saved = json.loads(Path(report.results_path).read_text())
    rs = next(s for s in saved["measurement"]["suites"] if s["name"] == "rag_stdlib")
    assert rs["n"] == 0 and len(rs["skipped"]) == 17 and rs["items"] == []


def test_the_shipped_rag_suite_asks_for_retrieval_and_a_tampered_index_is_refused(rag_dataset, tmp_path):
    import shutil

    suite = load_suite(DEFAULT_SUITES_DIR / "rag_stdlib.yaml")
    assert suite.needs_retrieval and all(it.retrieval and it.query for it in suite.items)
    for it in suite.items:  # a query never gives the answer away
        answer = it.choices[it.answer] if it.choices else it.expected
        assert answer not in it.query, it.id
    copy = tmp_path / "ds"
    shutil.copytree(rag_dataset.parent, copy)
    chunks = copy / "rag_index" / "chunks.jsonl"
    chunks.write_text(chunks.read_text() + '{"chunk_id": "x#0", "source_id": "x", "text": "red blue"}\n')
    with pytest.raises(RetrievalGainError, match="digest"):
        RagPrompter.of(copy / "manifest.json", dataset_tokenizer(rag_dataset))
