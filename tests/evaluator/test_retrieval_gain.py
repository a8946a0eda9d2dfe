"""Retrieval gain: the report's arithmetic against a hand computation, and a tiny model trained to
copy from its retrieved context, whose gain is clearly positive and above the random control."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from services.evaluator.heldout import dataset_tokenizer
from services.evaluator.retrieval_gain import (
    RetrievalGainError,
    retrieval_gain,
    summarize,
    validation_windows,
)
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
from shared.data.manifest import MASK_BASE, load_manifest
from shared.model import Llama, model_preset

WORDS = ["red", "blue", "green", "gold", "gray", "pink", "teal", "navy", "lime", "rose", "jade", "ruby", "opal", "onyx", "sand", "snow", "rain", "wind", "fire", "moon", "star", "lake", "hill", "cave", "rock", "leaf", "tree", "bird", "wolf", "bear"]
STEPS = 1200
FRAMES = ("record {n} holds", "the {n} entry reads", "copy of {n} says")


def test_summary_fields_match_a_hand_computation():
    without = np.array([2.0, 3.0, 1.0, 2.0])  # sum 8
    with_ = np.array([1.0, 1.0, 0.5, 0.5])  # sum 3
    random_ = np.array([2.0, 2.0, 1.0, 2.5])  # sum 7.5
    got = summarize(without, with_, random_, n_bytes=10, windows=2)
    assert got["loss_without"] == pytest.approx(2.0)
    assert got["loss_with"] == pytest.approx(0.75)
    assert got["loss_random"] == pytest.approx(1.875)
    assert got["gain"] == pytest.approx(1.25) and got["control_gain"] == pytest.approx(0.125)
    assert got["bpb_without"] == pytest.approx(8 / math.log(2) / 10)
    assert got["bpb_with"] == pytest.approx(3 / math.log(2) / 10)
    assert got["bpb_random"] == pytest.approx(7.5 / math.log(2) / 10)
    assert got["gain_bpb"] == pytest.approx(5 / math.log(2) / 10)
    assert got["control_gain_bpb"] == pytest.approx(0.5 / math.log(2) / 10)
    assert got["base_tokens"] == 4 and got["base_bytes"] == 10 and got["windows"] == 2
    with pytest.raises(ValueError, match="same non-zero number"):
        summarize(without, with_[:3], random_, n_bytes=10)


def _facts_corpus(root: Path, n_facts: int = 80) -> None:
    """Each fact: a random 8-word payload under a name, written three times in three framings (one
    document each). A window's payload is only predictable from another copy of the same fact."""
    rng = random.Random(0)
    d = root / "corpus" / "facts"
    d.mkdir(parents=True)
    for i in range(n_facts):
        payload = " ".join(rng.choice(WORDS) for _ in range(8))
        for j, frame in enumerate(FRAMES):
            (d / f"f{i:03d}_{j}.txt").write_text(f"{frame.format(n=f'item{i}')}: {payload}.\n", "utf-8")


@pytest.fixture(scope="module")
def facts_dataset(tmp_path_factory) -> Path:
    from services.data_prep.pipeline import prepare_dataset

    root = tmp_path_factory.mktemp("facts")
    _facts_corpus(root)
    cfg = DataPrepConfig(
        corpus=CorpusConfig(sources=[CorpusSource(path="corpus/facts", domain="facts")], roots=["corpus"]),
        filters=FilterConfig(min_doc_chars=16),
        minhash=MinHashConfig(enabled=False),  # the three copies of a fact are near-duplicates on purpose
        tokenizer=TokenizerConfig(vocab_size=320),
        sharding=ShardingConfig(shard_tokens=20_000, val_fraction=0.15, workers=1),
        rag=RagConfig(retriever="local", seq_len=48, k=2, context_budget=0.5, chunk_tokens=8, query_chars=200),
    )
    return prepare_dataset(cfg, ArtifactStore(root / "store"), base_dir=root).manifest_path


def _train_records(manifest_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    m = load_manifest(manifest_path)
    toks, kinds = [], []
    for s in m.shards_for("train"):
        toks.append(np.fromfile(manifest_path.parent / s.path, dtype=s.dtype).astype(np.int64))
        kinds.append(np.fromfile(manifest_path.parent / s.mask.path, dtype=np.uint8))
    w = m.rag.record_tokens
    return (torch.from_numpy(np.concatenate(toks).reshape(-1, w)),
            torch.from_numpy((np.concatenate(kinds) == MASK_BASE).reshape(-1, w).astype(np.float32)))


@pytest.fixture(scope="module")
def copy_model(facts_dataset: Path) -> Llama:
    """A tiny model trained on the packed training records (base tokens weigh 1, context 0)."""
    torch.set_num_threads(1)
    sp = dataset_tokenizer(facts_dataset)
    recs, weights = _train_records(facts_dataset)
    torch.manual_seed(0)
    model = Llama(model_preset("tiny", vocab_size=sp.vocab_size(), n_layer=2, d_model=64, n_head=4, n_kv_head=4,
                               ffn_hidden=128, max_seq_len=64))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        idx = torch.randint(0, recs.size(0), (16,), generator=g)
        x, y, wt = recs[idx, :-1], recs[idx, 1:], weights[idx, 1:]
        nll = F.cross_entropy(model(x).transpose(1, 2), y, reduction="none")
        loss = (nll * wt).sum() / wt.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def test_copy_model_gains_from_retrieved_context_beyond_the_random_control(facts_dataset, copy_model):
    sp = dataset_tokenizer(facts_dataset)
    figures, note = retrieval_gain(copy_model, facts_dataset, sp, max_windows=None)
    assert figures is not None, note
    print(json.dumps({k: round(v, 4) for k, v in figures.items()}))
    assert figures["retrieved_windows"] >= 0.8 * figures["windows"]
    assert figures["gain"] > 0.3, figures
    assert figures["gain"] > figures["control_gain"] + 0.15, figures
    assert figures["gain_bpb"] > figures["control_gain_bpb"]
    assert figures["loss_with"] < figures["loss_random"] - 0.15
    # The same model, same windows, same seed: the same figures (deterministic).
    again, _ = retrieval_gain(copy_model, facts_dataset, sp, max_windows=None)
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in figures.items() if k != "seconds"}


def test_windows_never_retrieve_their_own_documents(facts_dataset):
    from contracts import RetrievalQuery
    from services.evaluator.retrieval_gain import load_index

    m = load_manifest(facts_dataset)
    windows = validation_windows(facts_dataset.parent, m, None)
    assert windows and all(w.exclude for w in windows)
    index = load_index(facts_dataset.parent, m)
    sp = dataset_tokenizer(facts_dataset)
    qs = [RetrievalQuery(query_id=w.window_id, text=sp.decode(w.base.tolist()), k=4,
                         exclude_source_ids=sorted(w.exclude)) for w in windows]
    for w, hits in zip(windows, index.search(qs), strict=True):
        assert not {c.source_id for c, _ in hits} & w.exclude


def test_a_tampered_index_is_refused_and_a_plain_dataset_is_skipped(facts_dataset, copy_model, tmp_path):
    import shutil

    from tests.data_prep.conftest import make_config, write_corpus

    copy = tmp_path / "ds"
    shutil.copytree(facts_dataset.parent, copy)
    chunks = copy / "rag_index" / "chunks.jsonl"
    chunks.write_text(chunks.read_text() + '{"chunk_id": "x#0", "source_id": "x", "text": "red blue"}\n')
    sp = dataset_tokenizer(facts_dataset)
    with pytest.raises(RetrievalGainError, match="digest"):
        retrieval_gain(copy_model, copy / "manifest.json", sp)

    write_corpus(tmp_path, n_prose=20, n_code=10)
    from services.data_prep.pipeline import prepare_dataset

    plain = prepare_dataset(make_config(), ArtifactStore(tmp_path / "store"), base_dir=tmp_path).manifest_path
    figures, note = retrieval_gain(copy_model, plain, dataset_tokenizer(plain))
    assert figures is None and "no rag: section" in note


def test_evaluate_checkpoint_puts_the_gain_in_the_report_and_in_evaluation_completed(facts_dataset, copy_model,
                                                                                    tmp_path):
    from services.evaluator.config import EvalConfig
    from services.evaluator.evaluate import evaluate_checkpoint, evaluation_completed, format_report
    from shared.checkpoint import save_checkpoint

    state = {k: v.detach().clone() for k, v in copy_model.state_dict().items()}
    info = save_checkpoint(tmp_path / "ckpt", STEPS, state,
                           {"step": STEPS, "model_config": copy_model.config.model_dump(mode="json")}, metric=1.0,
                           meta={"reason": "final", "dataset_version": load_manifest(facts_dataset).version})
    cfg = EvalConfig(seq_len=48, suites_dir=None, parity={"enabled": False}, retrieval={"max_windows": 16})
    report = evaluate_checkpoint(info.path, facts_dataset, cfg, out_dir=tmp_path)
    assert report.retrieval is not None and report.retrieval["windows"] == 16
    assert report.retrieval["gain"] > report.retrieval["control_gain"]
    event = evaluation_completed(report)
    assert event.retrieval == report.retrieval and event.SCHEMA_VERSION == "1.3"
    assert "retrieval gain +" in format_report(report) and "random-context control" in format_report(report)
    saved = json.loads(Path(report.results_path).read_text())["report"]
    assert saved["retrieval"] == report.retrieval and "16 validation windows" in saved["retrieval_note"]
    off = evaluate_checkpoint(info.path, facts_dataset, cfg.model_copy(update={"retrieval": cfg.retrieval.model_copy(
        update={"enabled": False})}), out_dir=tmp_path / "off")
    assert off.retrieval is None and "disabled" not in (off.retrieval_note or "") and "false" in off.retrieval_note


def test_the_html_report_shows_the_gain_and_the_control():
    from datetime import UTC, datetime

    from contracts import ArtifactRef, EvaluationCompleted
    from helox.report import RunView, _evaluations_table

    ref = ArtifactRef(uri="file:///x/manifest.json", sha256="a" * 64, size_bytes=1)
    figures = summarize(np.array([2.0, 2.0]), np.array([1.0, 0.5]), np.array([2.0, 1.5]), n_bytes=4)
    view = RunView("run-1", evaluations=[
        (datetime.now(UTC), EvaluationCompleted(checkpoint=ref, checkpoint_digest="a" * 64, step=5, verdict="pass",
                                                gates_passed=True, retrieval=figures)),
        (datetime.now(UTC), EvaluationCompleted(checkpoint=ref, checkpoint_digest="b" * 64, step=9, verdict="pass",
                                                gates_passed=True))])
    html = _evaluations_table(view)
    assert "retrieval gain (nats/token)" in html
    assert "1.25 vs control 0.25" in html and "<td>-</td>" in html
